"""One run per workdir: a lock file naming its owner, with stale-lock detection.

Two runs writing checkpoints into the same workdir would interleave steps and
retention deletes, so the second one must refuse to start. The lock file is
created with O_EXCL (atomic on local disks and NFS) and holds the owner's host,
pid and start time. A lock is stale, and is taken over, when
  * its owner is on this host and the pid is no longer alive (kill -9, OOM), or
  * its owner is on another host and it has not been refreshed for
    `stale_after_s` seconds (the owner refreshes it every `heartbeat_s`).
On a pod only process 0 takes the lock: the other hosts are part of the same run.
"""
import json
import os
import socket
import threading
import time

from absl import logging

LOCK_NAME = "simclr_jax.lock"
# Lock files this process holds (absolute paths): a lock naming this pid that
# is not in here was left by an earlier, dead process whose pid was reused.
_HELD = set()


class WorkdirLockedError(RuntimeError):
  """Another live run owns the workdir."""


def _pid_alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Exists, owned by another user.
    return True
  return True


class WorkdirLock:
  """Exclusive ownership of a workdir; use as a context manager."""

  def __init__(self, workdir, *, stale_after_s=600.0, heartbeat_s=60.0):
    self.path = os.path.join(workdir, LOCK_NAME)
    self.stale_after_s = stale_after_s
    self.heartbeat_s = heartbeat_s
    self._owner = {"host": socket.gethostname(), "pid": os.getpid(),
                   "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    self._stop = threading.Event()
    self._thread = None

  def _read_owner(self):
    try:
      with open(self.path) as f:
        return json.load(f)
    except (OSError, ValueError):
      return None  # Vanished, or half-written by a writer that died.

  def _stale_reason(self, owner):
    if owner is None:
      return "unreadable lock file"
    if owner.get("host") == self._owner["host"]:
      pid = int(owner.get("pid", -1))
      if pid == os.getpid():
        if os.path.abspath(self.path) in _HELD:
          return None  # Held by this process already (e.g. a notebook).
        return f"pid {pid} is this process: the pid was reused"
      if not _pid_alive(pid):
        return f"pid {owner.get('pid')} is not running"
      return None
    try:
      age = time.time() - os.path.getmtime(self.path)
    except OSError:
      return "lock file vanished"
    if age > self.stale_after_s:
      return f"not refreshed for {age:.0f} s (> {self.stale_after_s:.0f} s)"
    return None

  def _create(self):
    fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    with os.fdopen(fd, "w") as f:
      json.dump(self._owner, f)

  def acquire(self):
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    for _ in range(3):  # A concurrent starter may win a takeover race.
      try:
        self._create()
        break
      except FileExistsError:
        owner = self._read_owner()
        reason = self._stale_reason(owner)
        if reason is None:
          raise WorkdirLockedError(
              f"workdir {os.path.dirname(self.path)} is in use by pid "
              f"{owner.get('pid')} on host {owner.get('host')} (since "
              f"{owner.get('started')}); lock file {self.path}. Stop that run "
              "or use another --workdir.") from None
        logging.warning("Taking over stale lock %s (%s): %s", self.path,
                        reason, owner)
        try:
          os.remove(self.path)
        except FileNotFoundError:
          pass
    else:
      raise WorkdirLockedError(f"could not take the lock {self.path}")
    _HELD.add(os.path.abspath(self.path))
    if self.heartbeat_s:
      self._thread = threading.Thread(target=self._heartbeat, daemon=True)
      self._thread.start()
    return self

  def _heartbeat(self):
    while not self._stop.wait(self.heartbeat_s):
      try:
        os.utime(self.path)
      except OSError:
        pass

  def release(self):
    self._stop.set()
    _HELD.discard(os.path.abspath(self.path))
    owner = self._read_owner()
    if owner and owner.get("pid") == self._owner["pid"] and (
        owner.get("host") == self._owner["host"]):
      os.remove(self.path)

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()
