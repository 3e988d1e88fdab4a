"""Bad input to the entry points is one line naming the culprit (`error: ...`, exit status 1),
with the traceback only under --verbose; each case feeds the bad input itself."""

import json
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from experiments import _cli
from experiments import runner as experiment
from experiments.configs import digits
from kd_jax import data
from kd_jax import losses
from kd_jax.train import loop
from kd_jax.train.state import TrainState
from kd_jax.train.step import make_train_step
from tests.train._toy import ToyNet, toy_batch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = "experiments/configs/digits.py"


def _cli_run(module, *args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=120)


def test_missing_config_file_and_unknown_key_are_one_line_before_anything_runs(tmp_path):
  proc = _cli_run("experiments.main", "--config=experiments/configs/nope.py",
                  f"--workdir={tmp_path}")
  assert proc.returncode == 1
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: --config file "
                                                 "'experiments/configs/nope.py' does not exist")
  assert "digits.py" in lines[0]  # the configs that do exist
  # The default config (no --config) with an unknown key, in another entry point; --verbose
  # adds the traceback above the same line.
  proc = _cli_run("experiments.refilled", "--config.teacher.lr=1", "--verbose")
  assert proc.returncode == 1 and "Traceback" in proc.stderr
  assert proc.stderr.strip().splitlines()[-1].startswith(
      "error: unknown config key 'config.teacher.lr' (in '--config.teacher.lr=1'); the keys "
      "of config.teacher are: ")
  assert "learning_rate" in proc.stderr.splitlines()[-1]


def test_config_key_checks_in_process():
  with pytest.raises(_cli.UsageError, match=r"unknown config key 'config.fooo'.*keys of config "
                     r"are: .*batch_size"):
    _cli.check_config_args(["--config=" + DIGITS, "--config.fooo=1"], DIGITS)
  with pytest.raises(_cli.UsageError, match=r"config.seed is a value, not a group of keys"):
    _cli.check_config_args(["--config", DIGITS, "--config.seed.x=1"], DIGITS)
  _cli.check_config_args(["--config=" + DIGITS, "--config.loss_options.kd.temperature=2",
                          "--config.student.num_steps=50"], DIGITS)  # known keys pass
  # Every message becomes one line.
  assert _cli.one_line(ValueError("a\n  b\n")) == "error: a; b"
  assert _cli.one_line(ZeroDivisionError("x")) == "error: ZeroDivisionError: x"


def test_negative_temperature_in_loss_options_is_caught_by_validate():
  c = digits.get_config()
  c.loss_options.kd.temperature = -1.0
  with pytest.raises(ValueError, match=r"method 'kd': loss term 'kd': temperature must be > 0, "
                     r"got -1.0"):
    experiment.validate(c)  # what run() calls before any model is built


def test_corrupt_ptloss_selection_is_named(tmp_path):
  c = digits.get_config()
  fake = types.SimpleNamespace(workdir=str(tmp_path))
  (tmp_path / "ptloss_selection.json").write_text('{"settings": {"teacher": ')
  with pytest.raises(ValueError, match=r"ptloss_selection.json \(the cached PTLoss selection\) "
                     r"is not valid JSON"):
    experiment._ptloss_epsilon(fake, c, types.SimpleNamespace(path="t"))
  (tmp_path / "ptloss_selection.json").write_text('{"settings": {}}')
  with pytest.raises(ValueError, match=r"lacks its 'settings', 'epsilon' or 'info'"):
    experiment._ptloss_epsilon(fake, c, types.SimpleNamespace(path="t"))


ARRAYS = toy_batch(16, seed=7)


STEP = make_train_step("ce:1", axis_name=None)  # one compiled program for every run here


def _fit(workdir, run_info=None):
  state = TrainState.create(ToyNet(width=4, rngs=nnx.Rngs(0)), optax.sgd(0.1),
                            rng=jax.random.key(0))
  return loop.fit(state, STEP,
                  lambda s: data.batches(ARRAYS, batch_size=8, seed=0, start_step=s),
                  num_steps=2, mode="none", workdir=str(workdir), checkpoint_every=1,
                  progress=False, run_info=run_info)


def test_corrupt_run_json_and_truncated_or_flipped_student_checkpoint_are_named(tmp_path):
  _fit(tmp_path / "a", run_info={"loss": "ce:1"})
  (tmp_path / "a" / "run.json").write_text('{"loss": ')
  with pytest.raises(ValueError, match=r"run.json \(the run description\) is not valid JSON"):
    _fit(tmp_path / "a", run_info={"loss": "ce:1"})
  step2 = tmp_path / "a" / "checkpoints" / "2" / "default"
  (data_file,) = [step2 / "d" / f for f in os.listdir(step2 / "d")]
  good = data_file.read_bytes()
  data_file.write_bytes(good[:len(good) // 2])  # truncated
  with pytest.raises(ValueError, match=r"checkpoints/2 is truncated or corrupt .*delete that "
                     r"step's directory"):
    _fit(tmp_path / "a")
  flipped = bytearray(good)
  flipped[len(flipped) // 2] ^= 0xFF
  data_file.write_bytes(bytes(flipped))
  with pytest.raises(ValueError, match=r"checkpoints/2 is (truncated or )?corrupt"):
    _fit(tmp_path / "a")
  data_file.write_bytes(good)
  final, _ = _fit(tmp_path / "a")  # restored intact
  assert int(final.step) == 2


def test_sp_on_an_empty_batch_is_zero_not_zero_division():
  s, t = jnp.zeros((0, 4, 4, 2)), jnp.zeros((0, 4, 4, 3))
  assert float(losses.sp(s, t)) == 0.0
  assert jax.grad(lambda s: losses.sp(s, t))(s).shape == (0, 4, 4, 2)
  assert np.isfinite(float(losses.sp(jnp.ones((1, 3)), jnp.ones((1, 5)))))
