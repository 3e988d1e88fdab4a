"""Workdirs: one run at a time (a PID lock, stale locks taken over), one configuration (changes
refused unless overwritten), relative paths."""

import json
import os
import subprocess
import sys

import ml_collections
import pytest

from kd_jax import workdir as wd


def _config(**teacher):
  c = ml_collections.ConfigDict({"seed": 0, "progress": True,
                                 "teacher": {"model": "cnn_digits", "num_steps": 40}})
  c.teacher.update(teacher)
  return c


def test_second_run_is_refused_and_a_stale_lock_is_taken_over(tmp_path):
  with wd.lock(str(tmp_path)):
    info = json.loads((tmp_path / wd.LOCK_FILE).read_text())
    assert info["pid"] == os.getpid()
    # Another live process holding the lock: this one is refused, naming the PID.
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
      (tmp_path / wd.LOCK_FILE).write_text(json.dumps(dict(info, pid=sleeper.pid)))
      with pytest.raises(wd.WorkdirError, match=rf"in use by a running process \(PID "
                         rf"{sleeper.pid}, since .*refusing a second concurrent run"):
        with wd.lock(str(tmp_path)):
          pass
    finally:
      sleeper.kill()
      sleeper.wait()
  # The sleeper is gone: its lock is stale and is taken over with a warning, then released.
  with pytest.warns(UserWarning, match=rf"stale lock of process {sleeper.pid}"):
    with wd.lock(str(tmp_path)):
      assert json.loads((tmp_path / wd.LOCK_FILE).read_text())["pid"] == os.getpid()
  assert not (tmp_path / wd.LOCK_FILE).exists()
  (tmp_path / wd.LOCK_FILE).write_text('{"pid": 12')  # torn by a kill: stale too
  with pytest.warns(UserWarning, match="stale lock"):
    with wd.lock(str(tmp_path)):
      pass


def test_changed_config_is_refused_unless_overwritten(tmp_path):
  path = str(tmp_path)
  assert wd.check_config(path, _config()) is False  # recorded
  (tmp_path / "students").mkdir()
  assert wd.check_config(path, _config()) is True  # the same: resumed
  c = _config()
  c.progress = False  # runtime keys may change
  assert wd.check_config(path, c) is True
  with pytest.raises(wd.WorkdirError, match=r"another configuration \(teacher.num_steps: 40 -> "
                     r"80\).*--overwrite"):
    wd.check_config(path, _config(num_steps=80))  # a changed teacher config included
  assert (tmp_path / "students").exists()
  assert wd.check_config(path, _config(num_steps=80), overwrite=True) is False
  assert not (tmp_path / "students").exists()  # the old run is gone, the new one recorded
  assert wd.check_config(path, _config(num_steps=80)) is True


def test_overwrite_never_empties_a_foreign_directory(tmp_path):
  (tmp_path / "thesis.tex").write_text("precious")
  with pytest.raises(wd.WorkdirError, match="not recognisably a kd_jax workdir"):
    wd.check_config(str(tmp_path), _config(), overwrite=True)
  assert (tmp_path / "thesis.tex").exists()


def test_relative_paths():
  assert wd.relative_path("/w/run/teacher/checkpoint", "/w/run") == "teacher/checkpoint"
  assert wd.relative_path("/elsewhere/t", "/w/run") == "/elsewhere/t"
  assert wd.relative_path(None, "/w") is None
