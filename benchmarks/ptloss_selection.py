"""Benchmark: PTLoss coefficient selection time, and PTLoss vs KD forward+backward cost.

Prints medians measured in this run (and their ratio); nothing is hard-coded. Issue targets: a
selection over 1,000 candidates x 10,000 validation examples x 100 classes in under a minute on
a CPU, and PTLoss within 1.3x of KD's cost on the same batch.

  python benchmarks/ptloss_selection.py            # the issue's sizes
  python benchmarks/ptloss_selection.py --quick    # 100 candidates x 2,000 examples, fewer reps
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from kd_jax.losses import kd, proxy_teacher, ptloss
from kd_jax.ptloss import select_coefficients


def _median_time(fn, repeats, cpu_times=None):
  """Median wall time of `fn` over `repeats` calls; appends each call's process CPU time."""
  times = []
  for _ in range(repeats):
    start, cpu_start = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
    if cpu_times is not None:
      cpu_times.append(time.process_time() - cpu_start)
  return statistics.median(times), times


def bench_selection(num_candidates, num_examples, num_classes, repeats, chunk_size, per_class):
  rng = np.random.default_rng(0)
  labels = rng.integers(0, num_classes, size=num_examples)
  # A plausible, somewhat over-confident teacher that is right ~70% of the time.
  logits = rng.normal(size=(num_examples, num_classes)) * 2.0
  correct = rng.random(num_examples) < 0.7
  target = np.where(correct, labels, rng.integers(0, num_classes, size=num_examples))
  logits[np.arange(num_examples), target] += 6.0
  logits, labels = jnp.asarray(logits, jnp.float32), jnp.asarray(labels)

  def run(seed):
    return select_coefficients(logits, labels, key=jax.random.key(seed), order=5,
                               num_candidates=num_candidates, per_class=per_class,
                               chunk_size=chunk_size)

  start, cpu_start = time.perf_counter(), time.process_time()
  sel = jax.block_until_ready(run(0))
  first, first_cpu = time.perf_counter() - start, time.process_time() - cpu_start
  seeds = iter(range(1, 1000))
  cpu_times = []
  median, times = _median_time(lambda: run(next(seeds)).scores, repeats, cpu_times)
  print(f"selection  C={num_candidates} N={num_examples} K={num_classes} "
        f"per_class={per_class} chunk={chunk_size}")
  print(f"  first call (compile + run): {first:.2f} s wall, {first_cpu:.2f} s CPU")
  print(f"  median of {repeats} runs: {median:.2f} s wall  (all: "
        f"{', '.join(f'{t:.2f}' for t in times)}); CPU time of the process per run: median "
        f"{statistics.median(cpu_times):.2f} s (on an idle machine, wall ~ CPU / busy cores)")
  print(f"  triples/s: {num_candidates * num_examples * num_classes / median:.3g}")
  print(f"  selected index {int(sel.index)}, score {float(sel.scores[sel.index]):.4f} vs vanilla "
        f"{float(sel.scores[0]):.4f}; rejected {int(sel.num_invalid)} "
        f"(epsilon-invalid {int(np.sum(~np.asarray(sel.epsilon_valid)))}); solver iterations "
        f"max {int(sel.max_iterations.max())}, median over candidates "
        f"{float(np.median(sel.max_iterations)):.0f}; max residual "
        f"{float(np.max(np.where(sel.valid, sel.max_residual, 0))):.2e}")
  return median


def bench_solvers(num_examples, num_classes, num_eps):
  """Newton vs the damped fixed point of METHODS.md 1.4 on the same proxy-teacher problems."""
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(num_examples, num_classes)) * 2.0
  logits[np.arange(num_examples), rng.integers(0, num_classes, num_examples)] += 6.0
  probs = jax.nn.softmax(jnp.asarray(logits, jnp.float32))
  eps = jnp.asarray(rng.uniform(-1, 1, size=(num_eps, num_classes, 5)) / np.arange(1, 6),
                    jnp.float32)
  print(f"proxy-teacher solvers  N={num_examples} K={num_classes}, {num_eps} per-class epsilons "
        "~ U[-1/m, 1/m], tol 1e-5")
  for method in ("newton", "fixed_point"):
    solve = jax.jit(jax.vmap(lambda e, method=method: proxy_teacher(
        probs, e, method=method, strict=False)))
    out = jax.block_until_ready(solve(eps))
    cpu = []
    median, _ = _median_time(lambda: solve(eps).probs, 3, cpu)
    print(f"  {method:11s} iterations mean {float(out.iterations.mean()):5.2f} max "
          f"{int(out.iterations.max()):3d}; max residual {float(out.residual.max()):.1e}; "
          f"converged {float(out.converged.mean()):.4f}; {median:.2f} s wall, "
          f"{statistics.median(cpu):.2f} s CPU")


def bench_loss_cost(batch, num_classes, order, repeats):
  rng = np.random.default_rng(1)
  s = jnp.asarray(rng.normal(size=(batch, num_classes)), jnp.float32)
  t = jnp.asarray(rng.normal(size=(batch, num_classes)) * 3, jnp.float32)
  eps = jnp.asarray(rng.uniform(-1, 1, size=(num_classes, order)) / np.arange(1, order + 1),
                    jnp.float32)
  kd_step = jax.jit(jax.value_and_grad(lambda s, t: kd(s, t, temperature=1.0).mean()))
  pt_step = jax.jit(jax.value_and_grad(lambda s, t: ptloss(s, t, eps).mean()))
  jax.block_until_ready((kd_step(s, t), pt_step(s, t)))
  # Interleave the two so that a busy machine slows both alike. Each block: 20 calls; wall time
  # per call (median over blocks) and process CPU time per call (less sensitive to load).
  walls, cpus = {"kd": [], "ptloss": []}, {"kd": [], "ptloss": []}
  for _ in range(repeats):
    for name, step in (("kd", kd_step), ("ptloss", pt_step)):
      cpu_start, start = time.process_time(), time.perf_counter()
      for _ in range(20):
        out = step(s, t)
      jax.block_until_ready(out)
      walls[name].append((time.perf_counter() - start) / 20)
      cpus[name].append((time.process_time() - cpu_start) / 20)
  kd_med, pt_med = statistics.median(walls["kd"]), statistics.median(walls["ptloss"])
  kd_cpu, pt_cpu = statistics.median(cpus["kd"]), statistics.median(cpus["ptloss"])
  print(f"loss value+gradient (student logits)  B={batch} K={num_classes} M={order} "
        "(per-class epsilon), jit")
  print(f"  kd     wall {kd_med * 1e6:8.1f} us   CPU {kd_cpu * 1e6:8.1f} us")
  print(f"  ptloss wall {pt_med * 1e6:8.1f} us   CPU {pt_cpu * 1e6:8.1f} us")
  print(f"  ratio ptloss / kd: wall {pt_med / kd_med:.2f}, CPU {pt_cpu / kd_cpu:.2f} "
        "(target <= 1.3)")
  return pt_med / kd_med


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="small sizes, few repeats")
  parser.add_argument("--candidates", type=int, default=None)
  parser.add_argument("--examples", type=int, default=None)
  parser.add_argument("--classes", type=int, default=100)
  parser.add_argument("--repeats", type=int, default=None)
  parser.add_argument("--chunk-size", type=int, default=8)
  parser.add_argument("--per-class", action="store_true")
  parser.add_argument("--skip-selection", action="store_true")
  args = parser.parse_args()
  candidates = args.candidates or (100 if args.quick else 1000)
  examples = args.examples or (2000 if args.quick else 10000)
  repeats = args.repeats or (3 if args.quick else 2)
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f} (measurements are slower on a busy machine)")
  if not args.skip_selection:
    bench_selection(candidates, examples, args.classes, repeats, args.chunk_size, args.per_class)
  bench_solvers(1000 if args.quick else 10000, args.classes, 4 if args.quick else 16)
  for batch in (256,) if args.quick else (256, 4096):
    bench_loss_cost(batch, args.classes, 5, 5 if args.quick else 15)


if __name__ == "__main__":
  main()
