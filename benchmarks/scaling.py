"""The data-parallel distillation step on 1, 2, 4, 8 devices: same loss, and how it scales.

The one idea: `kd_jax.parallel.data_parallel` maps the per-device step over a mesh; mapping it
must not change the arithmetic and should divide the time. For each device count n this

  * checks the mapping: the first step's loss on n devices equals the mean of the per-shard
    losses computed by the unmapped single-device step (each device normalises batch norm with
    its own shard's statistics, as PyTorch DDP without SyncBN, so this is the exact reference);
  * times the step (median of interleaved rounds) and reports images/s and the scaling
    efficiency t_1 / (n * t_n) at a fixed global batch (RepDistiller's CIFAR-100 recipe is
    single-GPU batch 64), or t_1 / t_n with `--weak` (fixed per-device batch).

On a CPU host the devices are simulated (`jax_num_cpu_devices`): the check is meaningful, the
timings are not (all "devices" share the same cores). On GPUs/TPUs the efficiency is real.

    python benchmarks/scaling.py                          # KD, resnet32x4 -> resnet8x4, batch 64
    python benchmarks/scaling.py --pair resnet56:resnet20 --devices 1,2,4,8 --method sp
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _timing  # pylint: disable=g-import-not-at-top
from train_step import METHODS  # pylint: disable=g-import-not-at-top


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--pair", default="resnet32x4:resnet8x4")
  p.add_argument("--method", default="kd")
  p.add_argument("--devices", default="1,2,4,8")
  p.add_argument("--batch", type=int, default=64, help="global batch (per device with --weak)")
  p.add_argument("--weak", action="store_true", help="fixed per-device batch")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--steps", type=int, default=2)
  p.add_argument("--rtol", type=float, default=2e-4)
  args = p.parse_args(argv)
  counts = [int(n) for n in args.devices.split(",")]

  import jax  # pylint: disable=g-import-not-at-top
  # Only the CPU backend reads it (simulated devices); must precede any JAX operation.
  jax.config.update("jax_num_cpu_devices", max(counts))
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from kd_jax import compile_options  # pylint: disable=g-import-not-at-top
  from kd_jax import models, parallel  # pylint: disable=g-import-not-at-top
  from kd_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  from kd_jax.train import step as step_lib  # pylint: disable=g-import-not-at-top

  print(_timing.machine_line())
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, {jax.device_count()} devices"
        f"{' (simulated on the host CPU: timings are not scaling numbers)' if jax.default_backend() == 'cpu' else ''}")
  if max(counts) > jax.device_count():
    raise SystemExit(f"asked for {max(counts)} devices, {jax.device_count()} visible")
  teacher, student = args.pair.split(":")
  spec = METHODS.get(args.method, args.method)
  t_model = models.create(teacher, num_classes=100, rngs=nnx.Rngs(1))
  t_gd, t_params, t_stats = nnx.split(t_model, nnx.Param, ...)
  t_vars = {"params": t_params, "batch_stats": t_stats}
  tx = state_lib.sgd(0.05, momentum=0.9, weight_decay=5e-4)

  def fresh_state():
    return state_lib.TrainState.create(models.create(student, num_classes=100, rngs=nnx.Rngs(2)),
                                       tx, rng=jax.random.key(0))

  per_dev_fn = step_lib.make_train_step(spec, teacher_graphdef=t_gd)
  single = compile_options.jit(
      step_lib.make_train_step(spec, teacher_graphdef=t_gd, axis_name=None))
  rng = np.random.default_rng(0)

  cs, checks = [], []
  for n in counts:
    gb = args.batch * n if args.weak else args.batch
    if gb % n:
      raise SystemExit(f"global batch {gb} is not divisible by {n} devices")
    host = {"image": rng.standard_normal((gb, 32, 32, 3), np.float32),
            "label": rng.integers(0, 100, gb).astype(np.int32)}
    # Reference: the unmapped step on each shard, losses averaged.
    shard_losses = []
    for i in range(n):
      sl = slice(i * gb // n, (i + 1) * gb // n)
      _, m = single(fresh_state(), {k: jnp.asarray(v[sl]) for k, v in host.items()}, t_vars)
      shard_losses.append(float(m["loss"]))
    mesh = parallel.make_mesh(n)
    mapped = parallel.data_parallel(per_dev_fn, mesh)
    batch = parallel.shard_batch(host, mesh)
    tv = parallel.replicate(t_vars, mesh)
    box = {"state": parallel.replicate(fresh_state(), mesh)}
    box["state"], m = mapped(box["state"], batch, tv)
    got, want = float(m["loss"]), float(np.mean(shard_losses))
    ok = abs(got - want) <= args.rtol * abs(want)
    checks.append(ok)
    print(f"  {n} device(s), global batch {gb}: loss {got:.6f} vs mean of per-shard single-device "
          f"losses {want:.6f} -> {'OK' if ok else 'MISMATCH'}", flush=True)

    def one(mapped=mapped, box=box, batch=batch, tv=tv):
      box["state"], metrics = mapped(box["state"], batch, tv)
      jax.block_until_ready((box["state"], metrics))

    c = _timing.Contestant(f"{n} dev", lambda k, one=one: _timing.time_steps(one, k))
    c.global_batch = gb
    cs.append(c)

  _timing.interleave(cs, args.rounds, args.steps, warmup=1)
  base = cs[0]
  print(f"\n| devices | global batch | ms/step | images/s | efficiency |")
  print("|---|---|---|---|---|")
  for n, c in zip(counts, cs):
    r = _timing.paired_ratio(base, c)  # t_1 / t_n
    eff = r if args.weak else r / n * (counts[0])
    print(f"| {n} | {c.global_batch} | {1e3 * c.median_s:.1f} | {c.global_batch / c.median_s:.1f} "
          f"| {eff:.2f} |")
  if not all(checks):
    raise SystemExit("data-parallel loss does not match the per-shard reference")
  print("mapping check: OK on", ", ".join(str(n) for n in counts), "devices")


if __name__ == "__main__":
  main()
