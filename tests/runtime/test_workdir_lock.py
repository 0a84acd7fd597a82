"""Two runs on one workdir: the second refuses; dead owners' locks are taken over."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from simclr_jax.runtime import workdir_lock


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
  code = ("import sys, time; from simclr_jax.runtime import workdir_lock; "
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


# ----------------------------------------------------------------------------
# Remote workdirs (gs://...): write-then-verify through tf.io.gfile, exercised
# on TensorFlow's in-memory `ram://` filesystem.
# ----------------------------------------------------------------------------
@pytest.fixture
def ram_workdir(tmp_path):
  from tensorflow.io import gfile  # pylint: disable=g-import-not-at-top
  url = f"ram://lock_test/{tmp_path.name}/run"
  yield url, gfile
  if gfile.exists(url):
    gfile.rmtree(url)


def _ram_owner(gfile, url):
  with gfile.GFile(f"{url}/{workdir_lock.LOCK_NAME}") as f:
    return json.loads(f.read())


def _ram_write_owner(gfile, url, owner):
  path = f"{url}/{workdir_lock.LOCK_NAME}"
  if gfile.exists(path):
    gfile.remove(path)  # ram:// "w" appends.
  with gfile.GFile(path, "w") as f:
    f.write(json.dumps(owner))


def test_remote_lock_refuses_a_live_owner_and_takes_over_a_stale_one(
    ram_workdir):
  url, gfile = ram_workdir
  lock = workdir_lock.WorkdirLock(url + "/", heartbeat_s=0, settle_s=0)
  lock.acquire()
  assert lock.path == f"{url}/{workdir_lock.LOCK_NAME}"
  assert not os.path.exists("ram:")  # No local directory named after the URL.
  owner = _ram_owner(gfile, url)
  assert owner["pid"] == os.getpid() and owner["token"]
  assert gfile.listdir(url) == [workdir_lock.LOCK_NAME]  # No temporary left.
  with pytest.raises(workdir_lock.WorkdirLockedError):  # Held by this process.
    workdir_lock.WorkdirLock(url, heartbeat_s=0, settle_s=0).acquire()
  lock.release()
  assert not gfile.exists(lock.path)

  other = {"host": "other-host", "pid": 1, "started": "x", "token": "t",
           "heartbeat": time.time() - 10}
  _ram_write_owner(gfile, url, other)
  with pytest.raises(workdir_lock.WorkdirLockedError, match="other-host"):
    workdir_lock.WorkdirLock(url, heartbeat_s=0, settle_s=0).acquire()
  other["heartbeat"] = time.time() - 700
  _ram_write_owner(gfile, url, other)
  with workdir_lock.WorkdirLock(url, stale_after_s=600, heartbeat_s=0,
                                settle_s=0):
    assert _ram_owner(gfile, url)["pid"] == os.getpid()
  assert not gfile.exists(f"{url}/{workdir_lock.LOCK_NAME}")


def test_remote_lock_lost_to_a_concurrent_writer_is_refused(ram_workdir):
  """Both starters saw no lock; the one whose write came last holds it."""
  url, gfile = ram_workdir
  rival = {"host": "other-host", "pid": 7, "started": "x", "token": "rival",
           "heartbeat": time.time()}
  lock = workdir_lock.WorkdirLock(url, heartbeat_s=0, settle_s=0)
  lock._settle = lambda: _ram_write_owner(gfile, url, rival)  # pylint: disable=protected-access
  with pytest.raises(workdir_lock.WorkdirLockedError, match="pid 7 on host "
                     "other-host"):
    lock.acquire()
  assert _ram_owner(gfile, url)["token"] == "rival"  # Left to its owner.


def test_remote_heartbeat_rewrites_the_record(ram_workdir):
  url, gfile = ram_workdir
  with workdir_lock.WorkdirLock(url, heartbeat_s=0.05, settle_s=0):
    first = _ram_owner(gfile, url)["heartbeat"]
    time.sleep(0.3)
    assert _ram_owner(gfile, url)["heartbeat"] > first
  assert not gfile.exists(f"{url}/{workdir_lock.LOCK_NAME}")


@pytest.mark.parametrize("content", ["my notes\n", '{"not": "a lock"}',
                                     "[1, 2]"])
def test_a_file_that_is_not_a_lock_is_never_taken_over(tmp_path, content):
  """Only what this module wrote is replaced: a user's file at the lock's
  path is refused, byte for byte untouched."""
  lock_file = tmp_path / workdir_lock.LOCK_NAME
  lock_file.write_text(content)
  with pytest.raises(workdir_lock.WorkdirLockedError,
                     match="is not a simclr_jax lock file"):
    workdir_lock.WorkdirLock(str(tmp_path), heartbeat_s=0).acquire()
  assert lock_file.read_text() == content
  # An empty one is a lock whose writer died before writing: taken over.
  lock_file.write_text("")
  with workdir_lock.WorkdirLock(str(tmp_path), heartbeat_s=0):
    assert json.loads(lock_file.read_text())["pid"] == os.getpid()


def test_remote_file_that_is_not_a_lock_is_never_overwritten(ram_workdir):
  url, gfile = ram_workdir
  path = f"{url}/{workdir_lock.LOCK_NAME}"
  with gfile.GFile(path, "w") as f:
    f.write("my notes")
  with pytest.raises(workdir_lock.WorkdirLockedError,
                     match="is not a simclr_jax lock file"):
    workdir_lock.WorkdirLock(url, heartbeat_s=0, settle_s=0).acquire()
  with gfile.GFile(path) as f:
    assert f.read() == "my notes"
