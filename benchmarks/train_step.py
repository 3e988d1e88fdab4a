"""Images/s of kd_jax's full distillation step, side by side with the anchors' PyTorch step.

The one idea: time the library's own jitted step (`kd_jax.train.step.make_train_step`: teacher
forward in inference mode + student forward/backward + SGD update, state donated) for every
method, next to its parts, (a) the student-only step (CE) and (b) the teacher forward alone,
and (c) the same KD step in eager PyTorch (`torch_baseline.py`, RepDistiller's loop), all
interleaved round by round so that the ratios are measured under the same machine load.

    python benchmarks/train_step.py --quick      # KD, resnet32x4 -> resnet8x4, batch 64
    python benchmarks/train_step.py              # both pairs, batch 64 and 256, every method
    python benchmarks/train_step.py --methods kd,sp --batches 64 --pairs resnet32x4:resnet8x4

Printed: per contestant the median ms/step and images/s; the ratios kd_jax/PyTorch (images/s)
and KD/(student step + teacher forward) (time; <= 1.05 means distillation costs nothing beyond
its two forward/backward parts). With `--quick` the last line is exactly
`kd_jax_images_per_s=<x> pytorch_images_per_s=<y> ratio=<x/y>`.

PyTorch runs in a separate interpreter (`$KD_JAX_TORCH_PYTHON` or `--torch-python`); without
one the PyTorch column is skipped with a message (torch is not a kd_jax dependency).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _timing  # pylint: disable=g-import-not-at-top

# Loss specs of RepDistiller's / mdistiller's CIFAR-100 recipes (experiments/configs/cifar100.py);
# PTLoss as KD with a perturbation.
METHODS = {
    "kd": "ce:0.1,kd:0.9(temperature=4.0)",
    "sp": "ce:1,sp:3000",
    "ptloss": "ce:0.1,ptloss:0.9(epsilon=0.1,temperature=4.0)",
    "dkd": "ce:1,dkd:1(alpha=1.0,beta=8.0,temperature=4.0)",
    "rkd": "ce:1,rkd:1",
    "crd": "ce:1,crd:0.8",
}
# Extra specs selectable with --methods (not in the default matrix).
EXTRA_METHODS = {
    "crd_gather": "ce:1,crd:0.8(scoring=gather)",  # RepDistiller's [b, K, d] row gather
}
PAIRS = ("resnet32x4:resnet8x4", "wrn_40_2:wrn_16_2")


class JaxSetup:
  """Models, state and jitted steps of one (teacher, student, batch) configuration."""

  def __init__(self, teacher: str, student: str, batch: int, *, num_classes: int = 100,
               teacher_dtype: str | None = None, seed: int = 0):
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    from flax import nnx  # pylint: disable=g-import-not-at-top
    from kd_jax import compile_options  # pylint: disable=g-import-not-at-top
    from kd_jax import models  # pylint: disable=g-import-not-at-top
    from kd_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
    from kd_jax.train import step as step_lib  # pylint: disable=g-import-not-at-top

    self.jax, self.step_lib, self.state_lib = jax, step_lib, state_lib
    self.jit = compile_options.jit  # what the library's train loop compiles with
    self.batch_size = batch
    rng = np.random.default_rng(seed)
    self.batch = {
        "image": jnp.asarray(rng.standard_normal((batch, 32, 32, 3), np.float32)),
        "label": jnp.asarray(rng.integers(0, num_classes, batch), jnp.int32),
    }
    opts = {} if teacher_dtype in (None, "float32") else {"dtype": jnp.dtype(teacher_dtype)}
    t_model = models.create(teacher, num_classes=num_classes, rngs=nnx.Rngs(seed + 1), **opts)
    self.t_graphdef, t_params, t_stats = nnx.split(t_model, nnx.Param, ...)
    self.t_vars = {"params": t_params, "batch_stats": t_stats}
    self._student = lambda: models.create(student, num_classes=num_classes,
                                          rngs=nnx.Rngs(seed + 2))
    self.tx = state_lib.sgd(0.05, momentum=0.9, weight_decay=5e-4)

  def fresh_state(self):
    return self.state_lib.TrainState.create(self._student(), self.tx,
                                            rng=self.jax.random.key(0))

  def _stepping(self, jitted, state, batch, *args):
    """`run(n)` for `jitted(state, batch, *args) -> (state, metrics)`, the state carried over
    (and donated) from call to call."""
    jax = self.jax
    box = {"state": state}

    def one():
      box["state"], metrics = jitted(box["state"], batch, *args)
      jax.block_until_ready((box["state"], metrics))

    return lambda n: _timing.time_steps(one, n)

  def step_runner(self, loss: str | None, donate: bool = True, library_options: bool = True,
                  cached_teacher: bool = False, nonfinite: str = "stop"):
    """`run(n) -> seconds per step` for the library step with `loss` (None: student-only CE).

    `library_options=False` compiles with plain `jax.jit` (jaxlib's default XLA:CPU options)
    instead of `kd_jax.compile_options.jit`, the way the library's train loop compiles.
    `cached_teacher=True` times the step that reads the teacher's logits from the batch (a
    teacher-output cache, `make_train_step(..., cached_teacher="teacher_")`): the teacher ran
    once, beforehand. `nonfinite="off"` builds the step without its NaN guard (the finiteness
    reduction over the loss and the gradients, `make_train_step(..., nonfinite=...)`).
    """
    jax = self.jax
    state, batch = self.fresh_state(), self.batch
    args = ()
    if loss is None:
      fn = self.step_lib.make_train_step("ce:1", axis_name=None)
    elif cached_teacher:
      fn = self.step_lib.make_train_step(loss, cached_teacher="teacher_", axis_name=None)
      logits = jax.jit(lambda v, x: self.step_lib.teacher_outputs(self.t_graphdef, v, x).logits)
      batch = {**batch, "teacher_logits": logits(self.t_vars, batch["image"])}
    else:
      fn = self.step_lib.make_train_step(loss, teacher_graphdef=self.t_graphdef, axis_name=None,
                                         nonfinite=nonfinite)
      args = (self.t_vars,)
    if loss is not None and "crd" in loss:
      state, batch = self._with_crd(state, batch)
    jit = self.jit if library_options else jax.jit
    return self._stepping(jit(fn, donate_argnums=(0,) if donate else ()), state, batch, *args)

  def _with_crd(self, state, batch, num_data: int = 50_000):
    """CRD's heads and memory banks in the state (`step.init`, CIFAR-100's 50k examples), and
    dataset indices in the batch, as the main job sets them up."""
    jnp = self.jax.numpy
    batch = {**batch, "index": jnp.arange(self.batch_size, dtype=jnp.int32)}
    step = self.step_lib.make_train_step("ce:1,crd:0.8", teacher_graphdef=self.t_graphdef,
                                         axis_name=None)
    return step.init(state, batch, self.t_vars, num_data=num_data), batch

  def parallel_runner(self, loss: str, num_devices: int):
    """`run(n)` for the library's data-parallel step (`kd_jax.parallel.data_parallel`) over
    `num_devices` devices, the global batch split among them (on a CPU host: simulated devices,
    one per core, each running its shard on its own thread)."""
    jax = self.jax
    from kd_jax import parallel  # pylint: disable=g-import-not-at-top
    mesh = parallel.make_mesh(num_devices)
    fn = parallel.data_parallel(
        self.step_lib.make_train_step(loss, teacher_graphdef=self.t_graphdef), mesh)
    batch = parallel.shard_batch(jax.tree.map(lambda x: jax.device_get(x), self.batch), mesh)
    t_vars = parallel.replicate(self.t_vars, mesh)
    return self._stepping(fn, parallel.replicate(self.fresh_state(), mesh), batch, t_vars)

  def teacher_runner(self):
    """`run(n)` for the teacher forward alone (inference mode, logits + pre_pool features)."""
    jax = self.jax
    gd = self.t_graphdef

    def fwd(t_vars, x):
      out = self.step_lib.teacher_outputs(gd, t_vars, x)
      return out.logits, out.features["pre_pool"]

    fwd = self.jit(fwd)

    def one():
      jax.block_until_ready(fwd(self.t_vars, self.batch["image"]))

    return lambda n: _timing.time_steps(one, n)

  def student_runner(self, backward: bool):
    """`run(n)` for the student forward (train mode) alone, or forward + backward (no update)."""
    jax, jnp = self.jax, self.jax.numpy
    state = self.fresh_state()
    batch = self.batch

    def loss(params, stats):
      out, new_stats = self.step_lib.apply_model(state.graphdef, params, stats, batch["image"],
                                                 train=True)
      logz = jax.nn.log_softmax(out.logits)
      return -jnp.mean(jnp.take_along_axis(logz, batch["label"][:, None], -1)), new_stats

    fn = self.jit(jax.value_and_grad(loss, has_aux=True) if backward else loss)

    def one():
      jax.block_until_ready(fn(state.params, state.batch_stats))

    return lambda n: _timing.time_steps(one, n)


def _fmt(c: _timing.Contestant, batch: int) -> str:
  return (f"{c.name:32s} {1e3 * c.median_s:9.1f} ms/step {batch / c.median_s:9.1f} images/s"
          f"   (CPU time {1e3 * c.cpu_median_s:9.1f} ms/step)")


def run_config(pair: str, batch: int, methods, args, torch_python) -> dict:
  teacher, student = pair.split(":")
  print(f"\n== {teacher} -> {student}, batch {batch} ({_timing.machine_line()})", flush=True)
  setup = JaxSetup(teacher, student, batch, teacher_dtype=args.teacher_dtype)
  cs = {}
  for m in methods:
    spec = METHODS.get(m) or EXTRA_METHODS.get(m, m)
    try:
      run = setup.step_runner(spec)
      run(1)  # compile here so that an unsupported method is reported, not fatal
    except (ValueError, KeyError, NotImplementedError) as e:
      print(f"  kd_jax {m}: skipped ({type(e).__name__}: {str(e).splitlines()[0][:160]})")
      continue
    cs[f"kd_jax {m}"] = _timing.Contestant(f"kd_jax {m}", run)
  variants = [v for v in (args.variants or "").split(",") if v]
  if "jaxlib_default" in variants:
    name = "kd_jax kd (jaxlib default options)"
    cs[name] = _timing.Contestant(name, setup.step_runner(METHODS["kd"], library_options=False))
  if "cached_teacher" in variants:
    name = "kd_jax kd (cached teacher)"
    cs[name] = _timing.Contestant(name, setup.step_runner(METHODS["kd"], cached_teacher=True))
  if "no_guard" in variants:
    name = "kd_jax kd (no NaN guard)"
    cs[name] = _timing.Contestant(name, setup.step_runner(METHODS["kd"], nonfinite="off"))
  if "no_donate" in variants:
    cs["kd_jax kd (no donation)"] = _timing.Contestant(
        "kd_jax kd (no donation)", setup.step_runner(METHODS["kd"], donate=False))
  if "bf16_teacher" in variants:
    bf = JaxSetup(teacher, student, batch, teacher_dtype="bfloat16")
    cs["kd_jax kd (bf16 teacher)"] = _timing.Contestant("kd_jax kd (bf16 teacher)",
                                                        bf.step_runner(METHODS["kd"]))
  if args.cpu_devices > 1:
    name = f"kd_jax kd (data-parallel, {args.cpu_devices} devices)"
    cs[name] = _timing.Contestant(name, setup.parallel_runner(METHODS["kd"], args.cpu_devices))
  if "breakdown" in variants:
    cs["kd_jax student fwd"] = _timing.Contestant("kd_jax student fwd",
                                                  setup.student_runner(False))
    cs["kd_jax student fwd+bwd"] = _timing.Contestant("kd_jax student fwd+bwd",
                                                      setup.student_runner(True))
  if not args.no_parts:
    cs["kd_jax student step (CE)"] = _timing.Contestant("kd_jax student step (CE)",
                                                        setup.step_runner(None))
    cs["kd_jax teacher forward"] = _timing.Contestant("kd_jax teacher forward",
                                                      setup.teacher_runner())
  if torch_python is not None:
    for mode in ("kd",) + (() if args.no_parts or not args.torch_parts else ("student", "teacher")):
      w = _timing.TorchWorker(torch_python, threads=args.threads)
      w.setup(teacher=teacher, student=student, batch=batch, mode=mode)
      name = {"kd": "pytorch kd", "student": "pytorch student step (CE)",
              "teacher": "pytorch teacher forward"}[mode]
      cs[name] = _timing.Contestant(name, w.run)
      cs[name].worker = w
  try:
    _timing.interleave(list(cs.values()), args.rounds, args.steps, args.warmup)
  finally:
    for c in cs.values():
      if hasattr(c, "worker"):
        c.worker.close()
  for c in cs.values():
    print(_fmt(c, batch))
  res = {"pair": pair, "batch": batch, "ips": {k: batch / c.median_s for k, c in cs.items()}}
  if "pytorch kd" in cs:
    for k, c in cs.items():
      if k.startswith("kd_jax ") and (k[7:] in methods or k.startswith("kd_jax kd (")):
        r = _timing.paired_ratio(cs["pytorch kd"], c)
        rc = _timing.paired_ratio(cs["pytorch kd"], c, cpu=True)
        print(f"  ratio {k} / pytorch kd (images/s): {r:.3f} wall-clock, {rc:.3f} CPU time  "
              f"(of medians: {cs['pytorch kd'].median_s / c.median_s:.3f})")
  if "kd_jax kd" in cs and "kd_jax student step (CE)" in cs:
    kd, st, te = cs["kd_jax kd"], cs["kd_jax student step (CE)"], cs["kd_jax teacher forward"]
    parts = [a + b for a, b in zip(st.round_medians, te.round_medians)]
    over = _timing.median([k / p for k, p in zip(kd.round_medians, parts)])
    print(f"  KD / (student step + teacher forward) = {over:.3f}  (target <= 1.05)")
    res["overhead"] = over
  if "kd_jax kd" in cs and "kd_jax kd (no NaN guard)" in cs:
    cost = _timing.paired_ratio(cs["kd_jax kd (no NaN guard)"], cs["kd_jax kd"])
    print(f"  NaN guard: KD images/s with / without the guard = {cost:.4f} "
          f"(guard cost {100 * (1 / cost - 1):+.2f} % of the step time)")
    res["guard_ratio"] = cost
  if "kd_jax kd" in cs and "kd_jax kd (cached teacher)" in cs:
    speedup = _timing.paired_ratio(cs["kd_jax kd"], cs["kd_jax kd (cached teacher)"])
    print(f"  teacher-output cache: KD step / cached-teacher KD step = {speedup:.2f}x images/s")
    res["cache_speedup"] = speedup
  if "pytorch kd" in cs and "kd_jax kd" in cs:
    res["ratio"] = _timing.paired_ratio(cs["pytorch kd"], cs["kd_jax kd"])
    res["cpu_ratio"] = _timing.paired_ratio(cs["pytorch kd"], cs["kd_jax kd"], cpu=True)
  return res


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--quick", action="store_true", help="KD, resnet32x4 -> resnet8x4, batch 64")
  p.add_argument("--pairs", default=",".join(PAIRS))
  p.add_argument("--batches", default="64,256")
  p.add_argument("--methods", default=",".join(METHODS), help=f"of {sorted(METHODS)}, {sorted(EXTRA_METHODS)} or specs")
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--steps", type=int, default=3, help="timed steps per contestant per round")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--threads", type=int, default=os.cpu_count(), help="PyTorch threads")
  p.add_argument("--torch-python", default=None, help=f"default: ${_timing.TORCH_ENV}")
  p.add_argument("--no-torch", action="store_true")
  p.add_argument("--torch-parts", action="store_true",
                 help="also time PyTorch's student step and teacher forward")
  p.add_argument("--no-parts", action="store_true", help="skip the student/teacher part timings")
  p.add_argument("--teacher-dtype", default=None, help="compute dtype of the teacher (bfloat16)")
  p.add_argument("--cpu-devices", type=int, default=1,
                 help="also time the data-parallel KD step over this many (simulated CPU) devices")
  p.add_argument("--variants", default="",
                 help="extra KD contestants: jaxlib_default (plain jax.jit instead of "
                      "kd_jax.compile_options), cached_teacher (teacher logits read from the "
                      "batch, kd_jax.data.teacher_cache), no_guard (the step without its NaN guard), "
                      "no_donate, bf16_teacher, breakdown (student fwd, "
                      "student fwd+bwd)")
  args = p.parse_args(argv)
  if args.quick:
    args.pairs, args.batches, args.methods = PAIRS[0], "64", "kd"
  import jax  # pylint: disable=g-import-not-at-top
  if args.cpu_devices > 1:  # before any JAX operation; only the CPU backend reads it
    jax.config.update("jax_num_cpu_devices", args.cpu_devices)
  print(_timing.machine_line())
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.device_count()}, "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  torch_python = None
  if not args.no_torch:
    torch_python = _timing.find_torch_python(args.torch_python)
    if torch_python is None:
      print(_timing.NO_TORCH_MESSAGE)
  methods = [m for m in args.methods.split(",") if m]
  results = []
  for pair in args.pairs.split(","):
    for batch in (int(b) for b in args.batches.split(",")):
      results.append(run_config(pair, batch, methods, args, torch_python))
  print("\nsummary (images/s):")
  for r in results:
    line = ", ".join(f"{k} {v:.1f}" for k, v in r["ips"].items())
    print(f"  {r['pair']} batch {r['batch']}: {line}")
  if args.quick:
    r = results[0]
    x = r["ips"].get("kd_jax kd", float("nan"))
    y = r["ips"].get("pytorch kd", float("nan"))
    print(f"kd_jax_images_per_s={x:.2f} pytorch_images_per_s={y:.2f} ratio={x / y:.3f}")


if __name__ == "__main__":
  main()
