"""Benchmark: PTLoss coefficient selection time, and PTLoss vs KD forward+backward cost.

Prints medians measured in this run (and their ratio); nothing is hard-coded. Issue targets: a
selection over 1,000 candidates x 10,000 validation examples x 100 classes in under a minute on
a CPU, and PTLoss within 1.3x of KD's cost on the same batch.

  python benchmarks/ptloss_selection.py            # the issue's sizes
  python benchmarks/ptloss_selection.py --quick    # 100 candidates x 2,000 examples, fewer reps
  python benchmarks/ptloss_selection.py --loss-cost-only   # PTLoss vs KD: B x K = 256 x 100,
                                                           # 4096 x 100, 16 x 32000
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
  """Newton vs the damped fixed point (docs/ptloss.md) on the same proxy-teacher problems."""
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


def _kd_plain(s, t):
  """KL(softmax(t) || softmax(s)) written the plain way (`jax.nn.log_softmax`, `jnp.sum`)."""
  log_pt, log_ps = jax.nn.log_softmax(t), jax.nn.log_softmax(s)
  return jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps), axis=-1)


def bench_loss_cost(batch, num_classes, order, repeats, in_program=16):
  """Value + gradient w.r.t. the student logits of kd, ptloss and a plain-jax KD, interleaved.

  Two timings: per call of a jitted value_and_grad (the dispatch included), and per evaluation
  inside one compiled program (`lax.scan` over `in_program` batches: no dispatch, as in a train
  step). Returns the per-call wall ratio ptloss / kd.
  """
  rng = np.random.default_rng(1)
  shape = (in_program, batch, num_classes)
  s_all = jnp.asarray(rng.normal(size=shape), jnp.float32)
  t_all = jnp.asarray(rng.normal(size=shape) * 3, jnp.float32)
  s, t = s_all[0], t_all[0]
  eps = jnp.asarray(rng.uniform(-1, 1, size=(num_classes, order)) / np.arange(1, order + 1),
                    jnp.float32)
  losses = {"kd": lambda s, t: kd(s, t, temperature=1.0).mean(),
            "ptloss": lambda s, t: ptloss(s, t, eps).mean(),
            "kd_plain": lambda s, t: _kd_plain(s, t).mean()}

  def in_program_fn(loss):
    value_and_grad = jax.value_and_grad(loss)

    def body(carry, st):
      value, grad = value_and_grad(*st)
      return carry + value + grad[0, 0], None  # every evaluation's value and gradient are used

    return jax.jit(lambda s_all, t_all: jax.lax.scan(body, 0.0, (s_all, t_all))[0])

  per_call = {k: jax.jit(jax.value_and_grad(f)) for k, f in losses.items()}
  scanned = {k: in_program_fn(f) for k, f in losses.items()}
  jax.block_until_ready([f(s, t) for f in per_call.values()])
  jax.block_until_ready([f(s_all, t_all) for f in scanned.values()])
  # Interleaved blocks so that a busy machine slows every contestant alike; medians over blocks
  # of the wall time and the process CPU time per call / per evaluation.
  walls = {(m, k): [] for m in ("call", "program") for k in losses}
  cpus = {key: [] for key in walls}
  calls = max(1, 20 * 256 * 100 // (batch * num_classes))
  for r in range(repeats):
    for k in (list(losses) if r % 2 == 0 else list(losses)[::-1]):
      for mode, fn, args, n, per in (("call", per_call[k], (s, t), calls, calls),
                                     ("program", scanned[k], (s_all, t_all), 1, in_program)):
        cpu_start, start = time.process_time(), time.perf_counter()
        for _ in range(n):
          out = fn(*args)
        jax.block_until_ready(out)
        walls[mode, k].append((time.perf_counter() - start) / per)
        cpus[mode, k].append((time.process_time() - cpu_start) / per)
  med = {key: statistics.median(v) for key, v in walls.items()}
  cpu = {key: statistics.median(v) for key, v in cpus.items()}

  def ratio(mode, a, b, table=walls):
    return statistics.median([x / y for x, y in zip(table[mode, a], table[mode, b])])

  print(f"loss value+gradient (student logits)  B={batch} K={num_classes} M={order} "
        "(per-class epsilon)")
  for k in losses:
    print(f"  {k:8s} per call: wall {med['call', k] * 1e6:8.1f} us  CPU "
          f"{cpu['call', k] * 1e6:8.1f} us | in one program: wall "
          f"{med['program', k] * 1e6:8.1f} us  CPU {cpu['program', k] * 1e6:8.1f} us")
  print(f"  ratio ptloss / kd: per call wall {ratio('call', 'ptloss', 'kd'):.2f} (CPU "
        f"{ratio('call', 'ptloss', 'kd', cpus):.2f}), in one program wall "
        f"{ratio('program', 'ptloss', 'kd'):.2f} (CPU {ratio('program', 'ptloss', 'kd', cpus):.2f})"
        "  (target <= 1.3)")
  print(f"  ratio kd / kd_plain (the library's row sums vs jnp.sum): per call "
        f"{ratio('call', 'kd', 'kd_plain'):.2f}, in one program "
        f"{ratio('program', 'kd', 'kd_plain'):.2f}")
  return ratio("call", "ptloss", "kd")


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
  parser.add_argument("--loss-cost-only", action="store_true",
                      help="only the loss-cost comparison (no selection, no solvers)")
  args = parser.parse_args()
  candidates = args.candidates or (100 if args.quick else 1000)
  examples = args.examples or (2000 if args.quick else 10000)
  repeats = args.repeats or (3 if args.quick else 2)
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f} (measurements are slower on a busy machine)")
  if not (args.skip_selection or args.loss_cost_only):
    bench_selection(candidates, examples, args.classes, repeats, args.chunk_size, args.per_class)
  if not args.loss_cost_only:
    bench_solvers(1000 if args.quick else 10000, args.classes, 4 if args.quick else 16)
  # The last shape has a language model's vocabulary.
  shapes = ((256, args.classes),) if args.quick else (
      (256, args.classes), (4096, args.classes), (16, 32000))
  for batch, classes in shapes:
    bench_loss_cost(batch, classes, 5, 5 if args.quick else 15)


if __name__ == "__main__":
  main()
