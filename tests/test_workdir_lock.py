"""Two runs on one workdir: the second refuses; dead owners' locks are taken over."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from simclr_jax import workdir_lock


def test_second_owner_refused_while_first_alive(tmp_path):
  with workdir_lock.WorkdirLock(str(tmp_path), heartbeat_s=0):
    # A live process on this host (another pid) owns it.
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
      lock_file = tmp_path / workdir_lock.LOCK_NAME
      owner = json.loads(lock_file.read_text())
      owner["pid"] = proc.pid
      lock_file.write_text(json.dumps(owner))
      with pytest.raises(workdir_lock.WorkdirLockedError) as e:
        workdir_lock.WorkdirLock(str(tmp_path), heartbeat_s=0).acquire()
      assert str(proc.pid) in str(e.value) and owner["host"] in str(e.value)
    finally:
      proc.kill()
      proc.wait()


def test_lock_of_killed_process_is_taken_over(tmp_path):
  code = ("import sys, time; from simclr_jax import workdir_lock; "
          "workdir_lock.WorkdirLock(sys.argv[1], heartbeat_s=0).acquire(); "
          "print('locked', flush=True); time.sleep(60)")
  proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)],
                          stdout=subprocess.PIPE, text=True)
  assert proc.stdout.readline().strip() == "locked"
  with pytest.raises(workdir_lock.WorkdirLockedError):
    workdir_lock.WorkdirLock(str(tmp_path), heartbeat_s=0).acquire()
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  lock = workdir_lock.WorkdirLock(str(tmp_path), heartbeat_s=0).acquire()
  owner = json.loads((tmp_path / workdir_lock.LOCK_NAME).read_text())
  assert owner["pid"] == os.getpid()
  lock.release()
  assert not (tmp_path / workdir_lock.LOCK_NAME).exists()


def test_other_host_lock_stale_only_after_timeout(tmp_path):
  lock_file = tmp_path / workdir_lock.LOCK_NAME
  lock_file.write_text(json.dumps({"host": "other-host", "pid": 1, "started": "x"}))
  with pytest.raises(workdir_lock.WorkdirLockedError, match="other-host"):
    workdir_lock.WorkdirLock(str(tmp_path), stale_after_s=600, heartbeat_s=0).acquire()
  old = time.time() - 700
  os.utime(lock_file, (old, old))
  with workdir_lock.WorkdirLock(str(tmp_path), stale_after_s=600, heartbeat_s=0):
    assert json.loads(lock_file.read_text())["pid"] == os.getpid()


def test_heartbeat_refreshes_lock(tmp_path):
  lock_file = tmp_path / workdir_lock.LOCK_NAME
  with workdir_lock.WorkdirLock(str(tmp_path), heartbeat_s=0.05):
    old = time.time() - 1000
    os.utime(lock_file, (old, old))
    time.sleep(0.3)
    assert time.time() - os.path.getmtime(lock_file) < 100


def test_lock_naming_this_pid_from_a_dead_process_is_taken_over(tmp_path):
  """pid reuse: a killed run's lock names the pid this new process got."""
  import socket  # pylint: disable=g-import-not-at-top
  lock_file = tmp_path / workdir_lock.LOCK_NAME
  lock_file.write_text(json.dumps(
      {"host": socket.gethostname(), "pid": os.getpid(), "started": "x"}))
  with workdir_lock.WorkdirLock(str(tmp_path), heartbeat_s=0):
    # Held by this process now: a second acquisition here is refused.
    with pytest.raises(workdir_lock.WorkdirLockedError):
      workdir_lock.WorkdirLock(str(tmp_path), heartbeat_s=0).acquire()
  assert not lock_file.exists()
