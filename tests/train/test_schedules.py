"""Learning-rate and loss-weight schedules against the references' per-epoch formulas.

RepDistiller `helper/util.py: adjust_learning_rate`, called at the start of every 1-based epoch e
(`for epoch in range(1, epochs + 1)` in `train_student.py`):

    lr(e) = 0.05 * 0.1 ** #{d in (150, 180, 210) : e > d}.

mdistiller `distillers/DKD.py`: the DKD loss is multiplied by `min(e / warmup, 1)` for the
1-based epoch e (`trainer.py` counts epochs from 1), warmup = 20.
"""

import numpy as np
import pytest

from kd_jax.train import parse_terms
from kd_jax.train import step_decay_schedule


def _repdistiller_lr(epoch, base=0.05, decay_epochs=(150, 180, 210), rate=0.1):
  return base * rate ** sum(epoch > d for d in decay_epochs)


@pytest.mark.parametrize("steps_per_epoch", [1, 781, 782])
def test_step_decay_equals_adjust_learning_rate_every_step(steps_per_epoch):
  schedule = step_decay_schedule(0.05, steps_per_epoch=steps_per_epoch,
                                 decay_epochs=(150, 180, 210))
  epochs = np.arange(1, 241)
  # Every step of epoch e (0-based steps (e - 1) * spe .. e * spe - 1) uses lr(e).
  for offset in sorted({0, steps_per_epoch // 2, steps_per_epoch - 1}):
    steps = (epochs - 1) * steps_per_epoch + offset
    got = np.array([float(schedule(s)) for s in steps])
    want = np.array([_repdistiller_lr(e) for e in epochs])
    np.testing.assert_allclose(got, want, rtol=1e-6)
  # The boundaries themselves: last step of epoch 150 at 0.05, first of epoch 151 at 0.005.
  np.testing.assert_allclose(float(schedule(150 * steps_per_epoch - 1)), 0.05, rtol=1e-6)
  np.testing.assert_allclose(float(schedule(150 * steps_per_epoch)), 0.005, rtol=1e-6)
  np.testing.assert_allclose(float(schedule(240 * steps_per_epoch - 1)), 5e-5, rtol=1e-5)


def test_dkd_warmup_equals_mdistiller_per_epoch():
  """With one step per epoch the term's weight is mdistiller's min(e / 20, 1) at epoch e."""
  term, = parse_terms("ce:1,dkd:1(warmup_steps=20)")[1:]
  got = np.array([float(term.weight_at(e - 1)) for e in range(1, 41)])
  want = np.array([min(e / 20, 1.0) for e in range(1, 41)])
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_dkd_warmup_per_step_reaches_each_epoch_value_at_its_last_step():
  """With warmup_steps = 20 * spe kd_jax ramps per step: the weight equals mdistiller's e / 20 at
  the last step of epoch e and lies in ((e - 1) / 20, e / 20] inside it (mdistiller holds e / 20
  for the whole epoch)."""
  spe = 7
  term, = parse_terms(f"dkd:1(warmup_steps={20 * spe})")
  for e in range(1, 25):
    steps = np.arange((e - 1) * spe, e * spe)
    w = np.array([float(term.weight_at(s)) for s in steps])
    np.testing.assert_allclose(w[-1], min(e / 20, 1.0), rtol=1e-6)
    assert np.all(w <= min(e / 20, 1.0) + 1e-7)
    assert np.all(w > (e - 1) / 20) if e <= 20 else np.all(w == 1.0)
