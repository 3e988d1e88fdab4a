"""benchmarks/device.py in its dry run on the CPU: every stage runs and reports.

The GPU/TPU measurements themselves need a device; here the script's own code runs end to end
on a tiny pair (lowering check by export for cuda and tpu, float32 and bfloat16 steps with
their cost analysis, scaling over 2 of the 8 simulated devices), and the lowering check is shown
to catch the CPU paths of a CPU program.
"""

import os
import re
import sys

import jax
import numpy as np
import pytest
from flax import nnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import device  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

from kd_jax import models  # noqa: E402
from kd_jax.train.state import TrainState, sgd  # noqa: E402
from kd_jax.train.step import make_train_step  # noqa: E402


def test_dry_run_reports_every_stage(capsys):
  assert device.main(["--dry-run"]) == 0
  out = capsys.readouterr().out
  for target in ("cuda", "tpu"):
    assert re.search(rf"lowering check \({target}, exported from CPU\): ok: CPU-only paths: "
                     r"interleave 0, gemv 0, platform switch 0; XLA strided-conv input "
                     r"gradients: [1-9]", out), out
  for dtype in ("float32", "bfloat16"):
    row = re.search(rf"^{re.escape(device.DRY_NAME)}\s+8\s+{dtype}\s+([0-9.]+)\s+([0-9.]+)\s+"
                    r"([0-9.e+-]+)\s+n/a", out, re.M)
    assert row, out
    ms, ips, gflop = map(float, row.groups())
    np.testing.assert_allclose(ips, 8 / (ms / 1e3), rtol=0.01)
    assert gflop > 0  # compiled.cost_analysis() counted the step's FLOPs
  assert "MFU n/a: no peak for device kind 'cpu'" in out
  assert re.search(r"^\s+1 devices: .* efficiency 1\.00$", out, re.M), out
  assert re.search(r"^\s+2 devices: .* images/s", out, re.M), out


def test_lowering_check_catches_a_cpu_program():
  t_name, t_opts, s_name, s_opts, shape, classes = device.DRY_PAIR
  make = lambda name, opts, seed: nnx.jit(lambda: models.create(  # noqa: E731
      name, num_classes=classes, rngs=nnx.Rngs(jax.random.key(seed, impl="unsafe_rbg")),
      **opts))()
  t_graph, t_params, t_rest = nnx.split(make(t_name, t_opts, 1), nnx.Param, ...)
  state = TrainState.create(make(s_name, s_opts, 2), sgd(0.1), rng=jax.random.key(0))
  batch = {"image": np.zeros((4,) + shape, np.float32), "label": np.zeros((4,), np.int32)}
  step = jax.jit(make_train_step(device.LOSS, teacher_graphdef=t_graph, axis_name=None))
  args = (state, batch, {"params": t_params, "batch_stats": t_rest})
  ok, found = device.check_lowering(jax.export.export(step, platforms=["cpu"])(*args)
                                    .mlir_module())
  assert not ok and found["interleave"] > 0 and found["gemv"] > 0 and found["lhs_dilate"] == 0
  ok, found = device.check_lowering(jax.export.export(step, platforms=["cuda"])(*args)
                                    .mlir_module())
  assert ok, found


@pytest.mark.parametrize("kind,dtype,peak", [("NVIDIA H100 80GB HBM3", "bfloat16", 989.4),
                                             ("NVIDIA H200", "float32", 494.7),
                                             ("NVIDIA A100-SXM4-40GB", "bfloat16", 312.0),
                                             ("TPU v5 lite", "float32", 197.0),
                                             ("TPU v4", "bfloat16", 275.0),
                                             ("cpu", "float32", None)])
def test_peak_table(kind, dtype, peak):
  assert device.peak_tflops(kind, dtype) == peak
  assert device.peak_tflops(kind, dtype, 100.0) == 100.0
