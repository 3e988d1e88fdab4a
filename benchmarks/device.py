"""The KD step on a GPU or TPU: images/s, bfloat16, PyTorch eager, MFU, scaling, lowering check.

One script to run the day an accelerator is available; it installs nothing (it uses what
`pip install -e ".[test]"` gives, plus torch if that environment has it) and keeps to a time
budget (default 450 s, within 8 minutes with start-up):

  python benchmarks/device.py                 # on the GPU/TPU machine
  python benchmarks/device.py --dry-run       # anywhere (CPU): a tiny pair, every stage once

It prints, in order:

1. The device line (platform, device kind, count) and the lowering check: the benchmarked
   step's StableHLO for this platform must contain none of the CPU-only paths of
   `kd_jax.backends.cpu` (polyphase interleave, row-sum GEMV, platform switch), and XLA's own
   strided-convolution input gradients instead (`kd_jax.backends.cpu.cpu_paths`). On a CPU
   host (the dry run) the CPU program has them by design, so the step is exported for "cuda" and
   "tpu" with `jax.export` and those programs are checked.
2. For resnet32x4 -> resnet8x4 and wrn_40_2 -> wrn_16_2 (CIFAR-100, 32x32), batch 64 and 256,
   float32 and bfloat16 (`dtype=` of both models; parameters float32): the jitted one-device
   KD step (CE 0.1 + KD 0.9 at T = 4, SGD momentum 0.9, state donated): ms/step, images/s,
   the step's FLOPs from `compiled.cost_analysis()` and the model FLOPs utilisation
   MFU = FLOPs / step time / peak (PEAK_TFLOPS below, by device kind), and, when torch with CUDA
   is importable, the same step in PyTorch eager (benchmarks/torch_baseline.py in a
   subprocess; bfloat16 through `torch.autocast`) and the ratio.
3. Scaling over the local devices: the data-parallel step (`kd_jax.parallel.data_parallel`) on
   1, 2, 4, ... devices at a fixed per-device batch: images/s and efficiency
   ips(n) / (n * ips(1)).

Exit status 1 when the lowering check fails. Numbers are medians of `--rounds` rounds of
`--steps` steps after `--warmup` steps (the device is synchronised once per round).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# This checkout's kd_jax, whatever an installed copy points to.
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import _timing  # pylint: disable=g-import-not-at-top

# Dense (no sparsity) peak TFLOP/s per JAX device, (bfloat16, float32), from the vendors'
# datasheets; the first name contained in the device kind wins. float32 on NVIDIA Ampere and
# later is the TF32 tensor-core peak: at JAX's default precision XLA runs float32 convolutions
# and matrix products in TF32 there. On TPU, default-precision float32 products run as one
# bfloat16 pass, so both entries are the bfloat16 peak.
PEAK_TFLOPS = (
    ("H200", 989.4, 494.7),        # H100/H200 SXM: BF16 989.4, TF32 494.7
    ("H100", 989.4, 494.7),
    ("A100", 312.0, 156.0),
    ("L40S", 362.05, 183.0),
    ("L4", 121.0, 60.0),
    ("A10", 125.0, 62.5),
    ("V100", 125.0, 15.7),         # no bf16 tensor cores: the fp16 peak
    ("T4", 65.0, 8.1),             # idem
    ("TPU v6 lite", 918.0, 918.0),  # Trillium (v6e), per chip
    ("TPU v5 lite", 197.0, 197.0),  # v5e, per chip
    ("TPU v5", 459.0, 459.0),       # v5p, per chip
    ("TPU v4", 275.0, 275.0),       # per chip (one JAX device)
    ("TPU v3", 61.5, 61.5),         # per core (one JAX device)
)
PAIRS = ("resnet32x4:resnet8x4", "wrn_40_2:wrn_16_2")
LOSS = "ce:0.1,kd:0.9(temperature=4)"   # RepDistiller's KD
BATCHES = (64, 256)
DTYPES = ("float32", "bfloat16")
# The dry run: a tiny pair with batch norm and strided convolutions, 8x8 RGB inputs, 10 classes.
DRY_NAME = "cnn_digits:cnn_digits"
DRY_PAIR = ("cnn_digits", {"width": 8, "in_channels": 3}, "cnn_digits",
            {"width": 4, "in_channels": 3}, (8, 8, 3), 10)


def peak_tflops(device_kind: str, dtype: str, override: float | None = None) -> float | None:
  """The table's dense peak for `device_kind` (None when unknown)."""
  if override:
    return override
  for name, bf16, f32 in PEAK_TFLOPS:
    if name.lower() in device_kind.lower():
      return bf16 if dtype == "bfloat16" else f32
  return None


def _flops(compiled) -> float | None:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost:
    return None
  value = cost.get("flops")
  return float(value) if value and value > 0 else None


def check_lowering(stablehlo: str) -> tuple[bool, dict[str, int]]:
  """(no CPU-only path and XLA's own strided-conv input gradients present, the counts) of a
  step's StableHLO (`kd_jax.backends.cpu.cpu_paths`; the pairs all have strided convolutions)."""
  from kd_jax.backends import cpu as cpu_backend  # pylint: disable=g-import-not-at-top
  found = cpu_backend.cpu_paths(stablehlo)
  ok = (found["interleave"] == found["gemv"] == found["platform_switch"] == 0
        and found["lhs_dilate"] > 0)
  return ok, found


class Budget:
  """Seconds left of the run's time budget."""

  def __init__(self, seconds: float):
    self.end = time.monotonic() + seconds

  def left(self) -> float:
    return self.end - time.monotonic()


def _time(run, steps: int, rounds: int, warmup: int) -> float:
  """Median seconds per step over `rounds` rounds of `steps` steps (one sync per round)."""
  for _ in range(warmup):
    run()
  per_step = []
  for _ in range(rounds):
    t0 = time.perf_counter()
    for _ in range(steps):
      out = run()
    out.block_until_ready()
    per_step.append((time.perf_counter() - t0) / steps)
  return statistics.median(per_step)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--dry-run", action="store_true",
                 help="tiny pair, batch 8, one step per stage (a CPU check of the script)")
  p.add_argument("--pairs", default=",".join(PAIRS))
  p.add_argument("--batches", default=",".join(map(str, BATCHES)))
  p.add_argument("--dtypes", default=",".join(DTYPES))
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--scaling-batch", type=int, default=64, help="per-device batch")
  p.add_argument("--budget-s", type=float, default=450.0,
                 help="stop starting new measurements after this many seconds")
  p.add_argument("--peak-tflops", type=float, default=None,
                 help="peak TFLOP/s for MFU when the device kind is not in the table")
  p.add_argument("--torch-python", default=None, help="interpreter with torch (default: this one)")
  p.add_argument("--torch-device", default="cuda",
                 help="device of the PyTorch step (cuda; cpu only to check the protocol)")
  p.add_argument("--no-torch", action="store_true")
  args = p.parse_args(argv)
  budget = Budget(args.budget_s)
  if args.dry_run:
    args.steps, args.rounds, args.warmup, args.scaling_batch = 1, 1, 1, 4
    args.batches, args.pairs, args.no_torch = "8", DRY_NAME, True

  # JAX keeps most of the GPU's memory from its first allocation; leave room for PyTorch.
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  import jax  # pylint: disable=g-import-not-at-top
  if args.dry_run and jax.config.jax_num_cpu_devices < 2:
    # Two simulated CPU devices for the scaling stage (read by the CPU backend only).
    jax.config.update("jax_num_cpu_devices", 2)
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from kd_jax import compile_options, models, parallel  # pylint: disable=g-import-not-at-top
  from kd_jax.train.state import TrainState, sgd  # pylint: disable=g-import-not-at-top
  from kd_jax.train.step import make_train_step  # pylint: disable=g-import-not-at-top

  devices = jax.local_devices()
  platform, kind = devices[0].platform, devices[0].device_kind
  print(_timing.machine_line())
  print(f"device: {platform}, {kind}, {len(devices)} local device(s); jax {jax.__version__}"
        f"{' (dry run)' if args.dry_run else ''}", flush=True)

  def specs(pair: str):
    if args.dry_run:
      return DRY_PAIR
    teacher, student = pair.split(":")
    return teacher, {}, student, {}, (32, 32, 3), 100

  made = {}

  def build(pair: str, dtype: str, batch: int):
    """(teacher graphdef, student state, teacher variables, batch): random rbg-keyed weights,
    created once per pair and dtype."""
    t_name, t_opts, s_name, s_opts, shape, classes = specs(pair)
    options = {} if dtype == "float32" else {"dtype": jnp.dtype(dtype)}

    def make(name, opts, seed):
      return nnx.jit(lambda: models.create(
          name, num_classes=classes, rngs=nnx.Rngs(jax.random.key(seed, impl="unsafe_rbg")),
          **opts, **options))()

    if (pair, dtype) not in made:
      made[pair, dtype] = (nnx.split(make(t_name, t_opts, 1), nnx.Param, ...),
                           nnx.split(make(s_name, s_opts, 2)))
    (t_graph, t_params, t_rest), (s_graph, s_state) = made[pair, dtype]
    fresh = lambda tree: jax.tree.map(lambda x: jnp.array(x, copy=True), tree)  # noqa: E731
    state = TrainState.create(nnx.merge(s_graph, fresh(s_state)),
                              sgd(0.05, momentum=0.9, weight_decay=5e-4), rng=jax.random.key(0))
    rng = np.random.default_rng(0)
    data = {"image": rng.normal(size=(batch,) + shape).astype(np.float32),
            "label": rng.integers(0, classes, size=batch).astype(np.int32)}
    return t_graph, state, {"params": t_params, "batch_stats": t_rest}, data

  def kd_step(t_graph, axis_name):
    return make_train_step(LOSS, teacher_graphdef=t_graph, axis_name=axis_name)

  failures = []

  # 1. Lowering check, on the first pair's one-device float32 step.
  pairs = [x for x in args.pairs.split(",") if x]
  t_graph, state, t_vars, data = build(pairs[0], "float32", int(args.batches.split(",")[0]))
  one_device = jax.jit(kd_step(t_graph, None))
  if platform == "cpu":
    targets = ("cuda", "tpu")
    texts = {t: jax.export.export(one_device, platforms=[t])(state, data, t_vars).mlir_module()
             for t in targets}
  else:
    targets = (platform,)
    texts = {platform: one_device.lower(state, data, t_vars).as_text()}
  for target, text in texts.items():
    ok, found = check_lowering(text)
    print(f"lowering check ({target}{', exported from CPU' if platform == 'cpu' else ''}): "
          f"{'ok' if ok else 'FAIL'}: CPU-only paths: interleave {found['interleave']}, "
          f"gemv {found['gemv']}, platform switch {found['platform_switch']}; XLA strided-conv "
          f"input gradients: {found['lhs_dilate']}", flush=True)
    if not ok:
      failures.append(f"lowering for {target}")

  # 2. Throughput, MFU, PyTorch.
  torch_python = None if args.no_torch else _timing.find_torch_python(args.torch_python)
  worker = None
  if torch_python is not None:
    try:
      worker = _timing.TorchWorker(torch_python)
      if args.torch_device == "cuda" and not worker.info.get("cuda"):
        print(f"PyTorch {worker.info['torch']}: no CUDA device, PyTorch columns skipped")
        worker.close()
        worker = None
    except (OSError, RuntimeError) as e:
      print(f"PyTorch worker did not start ({e}); PyTorch columns skipped")
      worker = None
  else:
    print("PyTorch: " + ("off (--no-torch or dry run)" if args.no_torch else
                         "not importable here") + "; PyTorch columns skipped")

  header = (f"{'pair':24s} {'batch':>5s} {'dtype':>8s} {'ms/step':>9s} {'images/s':>10s} "
            f"{'GFLOP/step':>11s} {'MFU':>7s} {'torch img/s':>12s} {'jax/torch':>9s}")
  print(header)
  print("-" * len(header))
  batches = [int(b) for b in args.batches.split(",") if b]
  dtypes = [d for d in args.dtypes.split(",") if d]
  try:
    for pair in pairs:
      for batch in batches:
        for dtype in dtypes:
          if budget.left() <= 0:
            print(f"{pair:24s} {batch:5d} {dtype:>8s}  skipped: time budget spent")
            continue
          t_graph, state, t_vars, data = build(pair, dtype, batch)
          jitted = compile_options.jit(kd_step(t_graph, None), donate_argnums=(0,))
          compiled = jitted.lower(state, data, t_vars).compile()
          flops = _flops(compiled)
          holder = {"state": jax.tree.map(lambda x: jnp.array(x, copy=True), state)}
          data_dev = jax.device_put(data)

          def run(holder=holder, compiled=compiled, data_dev=data_dev, t_vars=t_vars):
            holder["state"], metrics = compiled(holder["state"], data_dev, t_vars)
            return metrics["loss"]

          sec = _time(run, args.steps, args.rounds, args.warmup)
          peak = peak_tflops(kind, dtype, args.peak_tflops)
          mfu = (f"{100 * flops / sec / (peak * 1e12):6.1f}%" if flops and peak else "    n/a")
          gflop = f"{flops / 1e9:11.4g}" if flops else f"{'n/a':>11s}"
          torch_cell, ratio = f"{'-':>12s}", f"{'-':>9s}"
          if worker is not None:
            teacher, student = pair.split(":")
            try:
              worker.setup(teacher=teacher, student=student, batch=batch, mode="kd",
                           device=args.torch_device,
                           amp=None if dtype == "float32" else dtype)
              worker.run(max(args.warmup, 1))
              t_sec = statistics.median(worker.run(args.steps * args.rounds))
              torch_cell = f"{batch / t_sec:12.1f}"
              ratio = f"{t_sec / sec:9.2f}"
            except RuntimeError as e:
              torch_cell = f"{'error':>12s}"
              print(f"  PyTorch {pair} {batch} {dtype}: {e}")
          print(f"{pair:24s} {batch:5d} {dtype:>8s} {1e3 * sec:9.2f} {batch / sec:10.1f} "
                f"{gflop} {mfu} {torch_cell} {ratio}", flush=True)
  finally:
    if worker is not None:
      worker.close()
  if not any(peak_tflops(kind, d, args.peak_tflops) for d in dtypes):
    print(f"MFU n/a: no peak for device kind {kind!r} in PEAK_TFLOPS (pass --peak-tflops)")

  # 3. Scaling over the local devices (first pair, last dtype, fixed per-device batch).
  counts = [n for n in (1, 2, 4, 8, 16, 32, 64, 128, 256)
            if n <= len(devices) and (n <= 2 or not args.dry_run)]
  if len(counts) < 2:
    print(f"scaling: {len(devices)} local device, nothing to scale over")
  else:
    dtype = dtypes[-1]
    print(f"scaling ({pairs[0]}, {dtype}, {args.scaling_batch} per device):")
    base = None
    for n in counts:
      if budget.left() <= 0:
        print(f"  {n:3d} devices: skipped: time budget spent")
        continue
      mesh = parallel.make_mesh(n, devices=devices)
      t_graph, state, t_vars, data = build(pairs[0], dtype, args.scaling_batch * n)
      mapped = parallel.data_parallel(kd_step(t_graph, parallel.BATCH_AXIS), mesh)
      holder = {"state": parallel.replicate(state, mesh)}
      t_dev = parallel.replicate(t_vars, mesh)
      batch_dev = parallel.shard_batch(data, mesh)

      def run(holder=holder, mapped=mapped, batch_dev=batch_dev, t_dev=t_dev):
        holder["state"], metrics = mapped(holder["state"], batch_dev, t_dev)
        return metrics["loss"]

      sec = _time(run, args.steps, args.rounds, args.warmup)
      ips = args.scaling_batch * n / sec
      base = base or ips
      print(f"  {n:3d} devices: {1e3 * sec:9.2f} ms/step {ips:10.1f} images/s  "
            f"efficiency {ips / (n * base):.2f}", flush=True)
  if platform == "cpu" and not args.dry_run:
    print("(CPU host: devices share the same cores; these are not accelerator numbers)")
  if failures:
    print(f"FAILED: {', '.join(failures)}")
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
