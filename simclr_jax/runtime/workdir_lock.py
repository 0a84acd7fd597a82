"""One run per workdir: a lock file naming its owner, with stale-lock detection.

Two runs writing checkpoints into the same workdir would interleave steps and
retention deletes, so the second one must refuse to start. The lock file holds
the owner's host, pid and start time. A lock is stale, and is taken over, when
  * its owner is on this host and the pid is no longer alive (kill -9, OOM), or
  * its owner is on another host and it has not been refreshed for
    `stale_after_s` seconds (the owner refreshes it every `heartbeat_s`).
On a pod only process 0 takes the lock: the other hosts are part of the same run.

Local workdirs: the lock file is created with O_EXCL (atomic on local disks and
NFS) and refreshed by touching its mtime.

Remote workdirs (a URL such as gs://bucket/run; tf.io.gfile does the I/O):
there is no exclusive create through gfile or etils.epath (GCS has one, an
`ifGenerationMatch=0` precondition, but only through its own client, which is
not a dependency). So the lock is write-then-verify: read the lock file and
refuse if a live owner holds it; write our record (host, pid, a random token,
a `heartbeat` time); wait `settle_s`; read it back and hold the lock only if
our token is still there. Of two runs starting together, the later write wins
and the other one sees that at its read-back and refuses. This is NOT a
mutual exclusion guarantee: a starter that stalls for more than `settle_s`
between its read and its write can overwrite a lock that another run has
already verified, and then both run. It catches the case that matters in
practice (a second launch, minutes later, on a workdir still in use). A
remote owner's liveness is its `heartbeat` field (rewritten every
`heartbeat_s`, judged against this host's clock: skew must stay well below
`stale_after_s`); the pid check applies only when the owner is on this host.
"""
import json
import os
import socket
import threading
import time
import uuid

from absl import logging

from simclr_jax.runtime import files

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

  def __init__(self, workdir, *, stale_after_s=600.0, heartbeat_s=60.0,
               settle_s=2.0):
    self.remote = files.is_remote(workdir)
    if self.remote:
      workdir = workdir.rstrip("/")
    self.path = os.path.join(workdir, LOCK_NAME)
    self.stale_after_s = stale_after_s
    self.heartbeat_s = heartbeat_s
    self.settle_s = settle_s  # Remote only: write -> read-back delay.
    self._owner = {"host": socket.gethostname(), "pid": os.getpid(),
                   "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if self.remote:
      self._owner.update(token=uuid.uuid4().hex, heartbeat=time.time())
    self._key = self.path if self.remote else os.path.abspath(self.path)
    self._stop = threading.Event()
    self._thread = None

  def _read_owner(self):
    if self.remote:
      gfile = files.gfile()
      try:
        with gfile.GFile(self.path) as f:
          return json.loads(f.read())
      except ValueError:
        return None
      except Exception as e:  # pylint: disable=broad-except
        # Vanished: None. Anything else (network, permissions) must not
        # pass for a stale lock.
        if type(e).__name__ == "NotFoundError":
          return None
        raise
    try:
      with open(self.path) as f:
        return json.load(f)
    except (OSError, ValueError):
      return None  # Vanished, or half-written by a writer that died.

  def _foreign_file(self):
    """The lock path holds something that is not a lock record of ours.

    Such a file is never taken over (deleted or overwritten): only an empty
    file (a writer that died between creating and writing it) or a record
    naming a host and pid is a lock this module wrote.
    """
    try:
      if self.remote:
        with files.gfile().GFile(self.path) as f:
          text = f.read()
      else:
        with open(self.path) as f:
          text = f.read()
    except Exception:  # pylint: disable=broad-except
      return False  # Vanished (or unreadable: handled as before).
    if not text.strip():
      return False
    try:
      record = json.loads(text)
    except ValueError:
      return True
    return not (isinstance(record, dict) and "pid" in record
                and "host" in record)

  def _foreign_error(self):
    return WorkdirLockedError(
        f"{self.path} exists and is not a simclr_jax lock file; not "
        "replacing it. Move it away or use another --workdir.")

  def _age(self, owner):
    """Seconds since the owner last refreshed the lock."""
    if self.remote:
      try:
        return time.time() - float(owner.get("heartbeat", 0))
      except (TypeError, ValueError):
        return float("inf")  # No usable heartbeat: never refreshed.
    return time.time() - os.path.getmtime(self.path)

  def _stale_reason(self, owner):
    if owner is None:
      return "unreadable lock file"
    if owner.get("host") == self._owner["host"]:
      pid = int(owner.get("pid", -1))
      if pid == os.getpid():
        if self._key in _HELD:
          return None  # Held by this process already (e.g. a notebook).
        return f"pid {pid} is this process: the pid was reused"
      if not _pid_alive(pid):
        return f"pid {owner.get('pid')} is not running"
      return None
    try:
      age = self._age(owner)
    except OSError:
      return "lock file vanished"
    if age > self.stale_after_s:
      return f"not refreshed for {age:.0f} s (> {self.stale_after_s:.0f} s)"
    return None

  def _locked_error(self, owner):
    return WorkdirLockedError(
        f"workdir {os.path.dirname(self.path)} is in use by pid "
        f"{owner.get('pid')} on host {owner.get('host')} (since "
        f"{owner.get('started')}); lock file {self.path}. Stop that run "
        "or use another --workdir.")

  def _create(self):
    fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    with os.fdopen(fd, "w") as f:
      json.dump(self._owner, f)

  def acquire(self):
    if self.remote:
      self._acquire_remote()
    else:
      self._acquire_local()
    _HELD.add(self._key)
    if self.heartbeat_s:
      self._thread = threading.Thread(target=self._heartbeat, daemon=True)
      self._thread.start()
    return self

  def _acquire_local(self):
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    for _ in range(3):  # A concurrent starter may win a takeover race.
      try:
        self._create()
        return
      except FileExistsError:
        if self._foreign_file():
          raise self._foreign_error() from None
        owner = self._read_owner()
        reason = self._stale_reason(owner)
        if reason is None:
          raise self._locked_error(owner) from None
        logging.warning("Taking over stale lock %s (%s): %s", self.path,
                        reason, owner)
        try:
          os.remove(self.path)
        except FileNotFoundError:
          pass
    raise WorkdirLockedError(f"could not take the lock {self.path}")

  # --- Remote: write, then verify (see the module docstring for the race). --
  def _write_owner(self):
    # Whole record to a file of our own, then moved over the lock: readers
    # never see a partial record, and this works on filesystems whose "w"
    # does not truncate (TensorFlow's ram://).
    gfile = files.gfile()
    tmp = f"{self.path}.{self._owner['token']}.tmp"
    with gfile.GFile(tmp, "w") as f:
      f.write(json.dumps(self._owner))
    gfile.rename(tmp, self.path, overwrite=True)

  def _settle(self):
    time.sleep(self.settle_s)

  def _acquire_remote(self):
    gfile = files.gfile()
    gfile.makedirs(os.path.dirname(self.path))
    if gfile.exists(self.path):
      if self._foreign_file():
        raise self._foreign_error()
      owner = self._read_owner()
      reason = self._stale_reason(owner)
      if reason is None:
        raise self._locked_error(owner)
      logging.warning("Taking over stale lock %s (%s): %s", self.path,
                      reason, owner)
    self._owner["heartbeat"] = time.time()
    self._write_owner()
    self._settle()
    owner = self._read_owner()
    if not owner or owner.get("token") != self._owner["token"]:
      # Another run wrote after us: it holds the lock.
      raise self._locked_error(owner or {})

  def _owns_file(self, owner):
    if self.remote:
      return owner.get("token") == self._owner["token"]
    return owner.get("pid") == self._owner["pid"] and (
        owner.get("host") == self._owner["host"])

  def _heartbeat(self):
    while not self._stop.wait(self.heartbeat_s):
      if not self.remote:
        try:
          os.utime(self.path)
        except OSError:
          pass
        continue
      try:  # GCS objects cannot be touched: rewrite the record.
        owner = self._read_owner()
        if not owner or not self._owns_file(owner):
          logging.error("Lock %s no longer names this run (%s); stopped "
                        "refreshing it.", self.path, owner)
          return
        self._owner["heartbeat"] = time.time()
        self._write_owner()
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("Could not refresh lock %s: %s", self.path, e)

  def release(self):
    self._stop.set()
    if self._thread is not None:
      # A remote refresh in flight must not rewrite the file after removal.
      self._thread.join(timeout=30)
    _HELD.discard(self._key)
    owner = self._read_owner()
    if owner and self._owns_file(owner):
      if self.remote:
        files.gfile().remove(self.path)
      else:
        os.remove(self.path)

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()
