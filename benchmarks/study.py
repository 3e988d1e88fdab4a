"""A distillation study (many students, one teacher) in kd_jax against PyTorch eager run by run.

The one idea: a KD paper's table is many students distilled from one teacher on the same data.
kd_jax trains them in one compiled program with one teacher forward per batch
(`kd_jax.train.make_multi_student_step`), or with no teacher forward at all when the teacher's
top-k outputs come from a cache written once (`--cached`, `kd_jax.data.topk_cache`); PyTorch
eager (RepDistiller's loop, `torch_baseline.py` mode "study") runs the students one after
another, each with its own teacher forward. Both are interleaved round by round on the same
machine (`_timing.interleave`).

    python benchmarks/study.py --quick            # 8 students: KD at T = 1, 2, 4, 8 x 2 seeds
    python benchmarks/study.py --quick --cached   # the teacher's top-16 read from the cache

Study: resnet32x4 -> resnet8x4, batch 64, CIFAR-100 shapes, CE 0.1 + KD 0.9 at four temperatures
x 2 seeds (with `--cached`: `kd_topk` at the same temperatures, k = 16, over the cache's
augmented views read through Grain, so the kd_jax time includes the input pipeline). A study step
is one step of every student. Printed: the median time of a study step per contestant, the
FLOP bound from XLA's cost analysis,

    bound = S (F_teacher + F_student) / (F_teacher + S F_student)      (teacher in the step)
    bound = S (F_teacher + F_student) / (S F_student)                  (--cached)

with F_teacher the teacher forward and F_student one student train step, and the compiled
memory of the multi-student step against one single-student KD step. The last line is
`kd_jax_study_s=<x> pytorch_study_s=<y> ratio=<y/x> bound=<b>`, the times of `--study-steps`
study steps at the median (ratio > 1: kd_jax is faster).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _timing  # pylint: disable=g-import-not-at-top

TEMPERATURES = (1.0, 2.0, 4.0, 8.0)


def _flops(compiled) -> float:
  ca = compiled.cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  return float(ca.get("flops", float("nan")))


def _peak_bytes(compiled) -> int:
  """Arguments + outputs + temporaries - donated (aliased) buffers: the program's peak."""
  m = compiled.memory_analysis()
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)


class JaxStudy:
  """The teacher, S students (methods x seeds) and the compiled multi-student step."""

  def __init__(self, args):
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    from flax import nnx  # pylint: disable=g-import-not-at-top
    from kd_jax import compile_options, models  # pylint: disable=g-import-not-at-top
    from kd_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
    from kd_jax.train import step as step_lib  # pylint: disable=g-import-not-at-top

    self.jax, self.np, self.args = jax, np, args
    self.step_lib = step_lib
    b = args.batch
    rng = np.random.default_rng(0)
    self.batch = {"image": jnp.asarray(rng.standard_normal((b, 32, 32, 3), np.float32)),
                  "label": jnp.asarray(rng.integers(0, 100, b), jnp.int32)}
    t_model = models.create(args.teacher, num_classes=100, rngs=nnx.Rngs(1))
    self.t_graph, t_params, t_rest = nnx.split(t_model, nnx.Param, ...)
    self.t_vars = {"params": t_params, "batch_stats": t_rest}
    tx = state_lib.sgd(0.05, momentum=0.9, weight_decay=5e-4)
    self.fresh = lambda seed: state_lib.TrainState.create(
        models.create(args.student, num_classes=100, rngs=nnx.Rngs(100 + seed)), tx,
        rng=jax.random.key(seed))
    if args.cached:
      self.methods = {f"t{t:g}": f"ce:0.1,kd_topk:0.9(k={args.k},temperature={t})"
                      for t in TEMPERATURES}
    else:
      self.methods = {f"t{t:g}": f"ce:0.1,kd:0.9(temperature={t})" for t in TEMPERATURES}
    self.num_students = len(self.methods) * args.seeds
    self.jit = compile_options.jit

  def costs(self) -> dict:
    """FLOPs of the teacher forward, one student step, one KD step; compiled memory."""
    jax, step_lib = self.jax, self.step_lib
    fwd = self.jit(lambda v, x: step_lib.teacher_outputs(self.t_graph, v, x).logits)
    f_teacher = _flops(fwd.lower(self.t_vars, self.batch["image"]).compile())
    student = self.jit(step_lib.make_train_step("ce:1", axis_name=None), donate_argnums=(0,))
    f_student = _flops(student.lower(self.fresh(0), self.batch).compile())
    kd = self.jit(step_lib.make_train_step("ce:0.1,kd:0.9(temperature=4.0)",
                                           teacher_graphdef=self.t_graph, axis_name=None),
                  donate_argnums=(0,))
    kd_c = kd.lower(self.fresh(0), self.batch, self.t_vars).compile()
    del jax
    return {"teacher": f_teacher, "student": f_student, "kd": _flops(kd_c),
            "kd_peak": _peak_bytes(kd_c)}

  def states(self):
    return {m: self.step_lib.stack_states([self.fresh(10 * i + j) for j in range(self.args.seeds)])
            for i, m in enumerate(self.methods)}

  def write_cache(self, num_steps: int, path: str) -> dict:
    """A top-k cache over enough epochs of a small generated dataset for `num_steps` steps."""
    np = self.np
    from kd_jax import data  # pylint: disable=g-import-not-at-top
    from kd_jax.data import topk_cache  # pylint: disable=g-import-not-at-top
    b = self.args.batch
    n = 2 * b
    rng = np.random.default_rng(1)
    arrays = {"image": rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
              "label": rng.integers(0, 100, n).astype(np.int32)}
    augment = data.cifar_train_augment("cifar100")
    epochs = math.ceil(num_steps / data.steps_per_epoch(n, b))
    spec = topk_cache.make_spec(arrays, teacher_name=self.args.teacher,
                                teacher_variables=self.t_vars, augment=augment,
                                augment_config={"recipe": "cifar_train_augment"}, seed=0,
                                num_epochs=epochs, k=self.args.k, temperatures=TEMPERATURES)
    fwd = self.jit(lambda x: self.step_lib.teacher_outputs(self.t_graph, self.t_vars, x).logits)
    fwd(np.zeros((b, 32, 32, 3), np.float32)).block_until_ready()  # compile outside the timing
    t0 = time.perf_counter()
    topk_cache.write(path, spec, fwd, arrays, augment=augment, batch_size=b)
    seconds = time.perf_counter() - t0
    cache = topk_cache.load(path, expect=spec)
    self.batches = data.batches(arrays, batch_size=b, seed=0, augment=augment,
                                num_epochs=epochs, extras=cache.lookup, prefetch=2)
    return {"images": n * epochs, "seconds": seconds, "bytes": cache.size_bytes(),
            "records": len(cache)}

  def runner(self):
    """`run(n)` for the multi-student step, states carried over and donated."""
    jax, step_lib = self.jax, self.step_lib
    if self.args.cached:
      fn = step_lib.make_multi_student_step(self.methods, axis_name=None,
                                            student_map=self.args.student_map)
      args = ()
    else:
      fn = step_lib.make_multi_student_step(self.methods, teacher_graphdef=self.t_graph,
                                            axis_name=None, student_map=self.args.student_map)
      args = (self.t_vars,)
    jitted = self.jit(fn, donate_argnums=(0,))
    box = {"states": self.states()}
    first = next(self.batches) if self.args.cached else self.batch
    t0 = time.perf_counter()
    compiled = jitted.lower(box["states"], first, *args).compile()
    self.compile_s = time.perf_counter() - t0
    self.multi_flops, self.multi_peak = _flops(compiled), _peak_bytes(compiled)

    def one():
      batch = next(self.batches) if self.args.cached else self.batch
      box["states"], metrics = compiled(box["states"], batch, *args)
      jax.block_until_ready((box["states"], metrics))

    return lambda n: _timing.time_steps(one, n)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--quick", action="store_true", help="3 rounds x 1 study step, 1 warm-up")
  p.add_argument("--cached", action="store_true", help="teacher top-k from a topk_cache")
  p.add_argument("--teacher", default="resnet32x4")
  p.add_argument("--student", default="resnet8x4")
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--seeds", type=int, default=2, help="students per loss spec")
  p.add_argument("--k", type=int, default=16)
  p.add_argument("--rounds", type=int, default=None)
  p.add_argument("--steps", type=int, default=None, help="timed study steps per round")
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--study-steps", type=int, default=None,
                 help="steps of the study the last line's times are for (default: timed steps)")
  p.add_argument("--student-map", default="unroll", choices=("unroll", "vmap"))
  p.add_argument("--threads", type=int, default=os.cpu_count(), help="PyTorch threads")
  p.add_argument("--torch-python", default=None)
  p.add_argument("--no-torch", action="store_true")
  args = p.parse_args(argv)
  rounds = args.rounds or (3 if args.quick else 5)
  steps = args.steps or (1 if args.quick else 2)
  study_steps = args.study_steps or rounds * steps
  print(_timing.machine_line(), flush=True)

  study = JaxStudy(args)
  s = study.num_students
  print(f"study: {args.teacher} -> {args.student}, batch {args.batch}, {s} students "
        f"({', '.join(study.methods.values())}; {args.seeds} seeds each), "
        f"student_map={args.student_map}", flush=True)
  costs = study.costs()
  ft, fs = costs["teacher"], costs["student"]
  bound = s * (ft + fs) / (s * fs if args.cached else ft + s * fs)
  print(f"XLA cost analysis per image: teacher forward {ft / args.batch / 1e9:.3f} GFLOP, "
        f"student step {fs / args.batch / 1e9:.3f} GFLOP, KD step {costs['kd'] / args.batch / 1e9:.3f}"
        f" GFLOP; bound {bound:.2f}x ({'S students, no teacher' if args.cached else 'one teacher forward + S students'}"
        f" vs S x (teacher + student))", flush=True)

  tmp = None
  if args.cached:
    tmp = tempfile.mkdtemp(prefix="kd_jax_study_cache_")
    info = study.write_cache(args.warmup + rounds * steps + 1, tmp)
    print(f"cache written: {info['records']} records ({info['images']} augmented views), "
          f"{info['seconds']:.1f} s ({info['images'] / info['seconds']:.1f} views/s), "
          f"{info['bytes']} bytes on disk ({info['bytes'] / info['records']:.1f} B/record)",
          flush=True)
  try:
    run = study.runner()
    print(f"multi-student step compiled in {study.compile_s:.1f} s: "
          f"{study.multi_flops / args.batch / 1e9:.3f} GFLOP/image; compiled peak memory "
          f"{study.multi_peak / 2**20:.1f} MiB vs {costs['kd_peak'] / 2**20:.1f} MiB for one "
          f"KD run ({s} runs side by side: {s * costs['kd_peak'] / 2**20:.1f} MiB)", flush=True)
    contestants = [_timing.Contestant("kd_jax study step", run)]
    python = None if args.no_torch else _timing.find_torch_python(args.torch_python)
    worker = None
    if python is None:
      if not args.no_torch:
        print(_timing.NO_TORCH_MESSAGE)
    else:
      worker = _timing.TorchWorker(python, args.threads)
      worker.setup(teacher=args.teacher, student=args.student, batch=args.batch, mode="study",
                   temperatures=list(TEMPERATURES), num_seeds=args.seeds)
      print(f"PyTorch {worker.info['torch']}, {worker.info['threads']} threads", flush=True)
      contestants.append(_timing.Contestant(f"pytorch study step ({s} runs)", worker.run))
    try:
      _timing.interleave(contestants, rounds, steps, args.warmup)
    finally:
      if worker is not None:
        worker.close()
  finally:
    if tmp is not None:
      shutil.rmtree(tmp, ignore_errors=True)

  for c in contestants:
    print(f"{c.name:30s} {c.median_s:8.2f} s/study step  (CPU {c.cpu_median_s:8.2f} s; "
          f"rounds {', '.join(f'{x:.2f}' for x in c.round_medians)})")
  jax_s = contestants[0].median_s * study_steps
  if len(contestants) > 1:
    pt_s = contestants[1].median_s * study_steps
    per_round = _timing.paired_ratio(contestants[1], contestants[0])
    print(f"ratio per round (median): {per_round:.3f}; CPU-time ratio "
          f"{_timing.paired_ratio(contestants[1], contestants[0], cpu=True):.3f}")
    print(f"kd_jax_study_s={jax_s:.1f} pytorch_study_s={pt_s:.1f} ratio={pt_s / jax_s:.3f} "
          f"bound={bound:.2f}")
  else:
    print(f"kd_jax_study_s={jax_s:.1f} pytorch_study_s=nan ratio=nan bound={bound:.2f}")


if __name__ == "__main__":
  main()
