"""Golden trajectories: kd_jax's train step reproduces RepDistiller's `train_distill` loop.

tests/fixtures/train/trajectory_golden.npz (written by make_trajectory_golden.py with torch)
holds five float32 steps of RepDistiller's loop for a resnet14 teacher and a resnet8 student,
batch 16, 10 classes, for KD ("ce:0.1,kd:0.9", T = 4), SP ("ce:1,sp:3000" on `pre_pool`) and
CRD ("ce:1,crd:0.8": its heads, memory banks and Z), SGD lr 0.05, momentum 0.9, weight decay
5e-4, PyTorch batch norm. SP's student is the shared one with every convolution kernel times
`meta/sp/kernel_scale` (8: the same function, as each convolution feeds a batch norm, with SP's
large steps 64x smaller relative to the kernels, so that a ReLU decision flipped by float32
rounding does not separate the trajectories). This test converts the initial weights with
`kd_jax.models.torch_convert`, runs kd_jax's step five times in float32 on one device and checks
every step's losses and, after the fifth step, every student parameter, every batch-norm
statistic and CRD's heads, memory banks and normalisers.

Tolerance: |kd_jax - reference| <= 1e-4 |reference| + atol, with absolute floors atol = 1e-6
for parameters, statistics, heads and memory rows (entries below 1e-2 are held to 1e-6, about
1e-4 of a typical weight) and atol = 1e-5 for losses (the KD term falls to 4e-3 by step 5, and
a float32 KL between nearly equal distributions carries ~1e-6 of cancellation error).

The tolerance is tight enough to see one-line changes of the recipe: `test_perturbed_recipe_fails`
runs the same comparison with Nesterov momentum, dampened momentum, decoupled weight decay,
PyTorch's BN momentum passed to flax unconverted, and the biased batch variance in the running
variance, and requires each to fail.
"""

import os

import jax
import numpy as np
import optax
import pytest
from flax import nnx

FIXTURE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures",
                       "train", "trajectory_golden.npz")
RTOL = 1e-4
ATOL = 1e-6
LOSS_ATOL = 1e-5
METHODS = ("kd", "sp", "crd")
TERM = {"kd": "kd", "sp": "sp", "crd": "crd"}


@pytest.fixture(scope="module")
def golden():
  with np.load(FIXTURE) as f:
    return {k: f[k] for k in f.files}


def _sd(g, prefix):
  return {k[len(prefix):]: g[k] for k in g if k.startswith(prefix)}


def _meta(g, key):
  return g[f"meta/{key}"].item()


def _init_student_sd(g, method):
  """The method's initial student state dict: SP's convolution kernels x meta/sp/kernel_scale."""
  sd = _sd(g, "init/student/sd/")
  if method == "sp":
    scale = np.float16(_meta(g, "sp/kernel_scale"))
    sd = {k: v * scale if v.ndim == 4 else v for k, v in sd.items()}
  return sd


# ------------------------------------------------------------------ the kd_jax side, in one place

def run_kd_jax(g, method, *, tx=None, edit_student=None):
  """Runs kd_jax's train step on the fixture's batches; everything kd_jax-specific is here.

  Args:
    g: the fixture.
    method: "kd", "sp" or "crd".
    tx: the optimizer (default: the recipe, `kd_jax.train.sgd(lr, momentum=0.9,
      weight_decay=5e-4)`).
    edit_student: called on the converted student model before training (to perturb it).

  Returns:
    {"loss", "loss_ce", "loss_<term>": [steps] floats, "student": nnx.State of the final
    student (parameters and batch statistics), "crd": final CRD heads/memory/Z (method "crd"),
    "negatives": [steps, B, K] the negatives kd_jax draws (method "crd")}.
  """
  from kd_jax import train
  from kd_jax.data import augment
  from kd_jax.models import torch_convert
  from kd_jax.train.terms import crd as crd_lib

  num_classes = _meta(g, "num_classes")
  student = torch_convert.model_from_torch_state_dict(
      _meta(g, "student"), _init_student_sd(g, method), num_classes=num_classes)
  if edit_student is not None:
    edit_student(student)
  teacher = torch_convert.model_from_torch_state_dict(
      _meta(g, "teacher"), _sd(g, "init/teacher/sd/"), num_classes=num_classes)
  t_graph, t_params, t_stats = nnx.split(teacher, nnx.Param, ...)
  t_vars = {"params": t_params, "batch_stats": t_stats}
  if tx is None:
    tx = train.sgd(_meta(g, "lr"), momentum=_meta(g, "momentum"),
                   weight_decay=_meta(g, "weight_decay"))
  term_params = term_state = None
  if method == "crd":
    _, crd_state = crd_lib.init_crd_state(
        jax.random.key(_meta(g, "crd_seed")), num_data=_meta(g, "num_data"), student_dim=64,
        teacher_dim=64, feat_dim=_meta(g, "feat_dim"))
    # The heads and banks the PyTorch side started from (the generator took them from the same
    # call); Z unset, as `init_crd_state` leaves it.
    term_params = {"crd": {who: {k: g[f"crd/init/{who}_{k}"] for k in ("kernel", "bias")}
                           for who in ("student", "teacher")}}
    term_state = {"crd": {**crd_state, "memory_s": g["crd/init/memory_s"],
                          "memory_t": g["crd/init/memory_t"]}}
  state = train.TrainState.create(student, tx, rng=jax.random.key(_meta(g, "rng_seed")),
                                  term_params=term_params, term_state=term_state)
  step = jax.jit(train.make_train_step(_meta(g, f"spec/{method}"), teacher_graphdef=t_graph,
                                       axis_name=None))
  transform = augment.cifar_eval_transform("cifar100")
  inputs = np.stack([transform({"image": im})["image"] for im in g["data/images"]])
  out = {"loss": [], "loss_ce": [], f"loss_{TERM[method]}": [], "negatives": []}
  for idx in g["data/batch_index"]:
    if method == "crd":  # the draw the step makes from its per-step key
      out["negatives"].append(np.asarray(crd_lib.sample_negatives(
          jax.random.split(state.rng)[1], idx, num_data=_meta(g, "num_data"),
          num_negatives=_meta(g, "num_negatives"))))
    batch = {"image": inputs[idx], "label": g["data/labels"][idx], "index": idx}
    state, metrics = step(state, batch, t_vars)
    out["loss"].append(float(metrics["loss"]))
    out["loss_ce"].append(float(metrics["loss/ce"]))
    out[f"loss_{TERM[method]}"].append(float(metrics[f"loss/{TERM[method]}"]))
  out["student"] = nnx.state(nnx.merge(state.graphdef, state.params, state.batch_stats))
  if method == "crd":
    heads, mem = state.term_params["crd"], state.term_state["crd"]
    out["crd"] = {
        "embed_s.linear.weight": np.asarray(heads["student"]["kernel"]).T,
        "embed_s.linear.bias": np.asarray(heads["student"]["bias"]),
        "embed_t.linear.weight": np.asarray(heads["teacher"]["kernel"]).T,
        "embed_t.linear.bias": np.asarray(heads["teacher"]["bias"]),
        **{k: np.asarray(mem[k]) for k in ("memory_s", "memory_t", "z_s", "z_t")}}
  return out


# ------------------------------------------------------------------ comparison

def _ratio(got, want, atol=ATOL):
  """max |got - want| / (RTOL |want| + atol): at most 1 <=> within tolerance."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, (got.shape, want.shape)
  return float(np.max(np.abs(got - want) / (RTOL * np.abs(want) + atol)))


def _expected_student(g, method):
  from kd_jax.models import torch_convert
  return torch_convert.from_torch_state_dict(_meta(g, "student"), _sd(g, f"{method}/final/sd/"),
                                             num_classes=_meta(g, "num_classes"))


def compare(g, method, ours):
  """{quantity: worst ratio} over losses, student parameters, BN statistics (and CRD state)."""
  worst = {}

  def record(group, name, r):
    if r > worst.get(group, (-1.0, ""))[0]:
      worst[group] = (r, name)

  for k in ("loss", "loss_ce", f"loss_{TERM[method]}"):
    for i, (a, b) in enumerate(zip(ours[k], g[f"{method}/{k}"], strict=True)):
      record("losses", f"{k}[step {i + 1}]", _ratio(a, b, LOSS_ATOL))
  theirs = dict(nnx.to_flat_state(_expected_student(g, method)))
  mine = dict(nnx.to_flat_state(ours["student"]))
  assert sorted(theirs) == sorted(mine)
  for path, var in theirs.items():
    group = "batch_stats" if isinstance(var, nnx.BatchStat) else "params"
    record(group, ".".join(map(str, path)), _ratio(mine[path][...], var[...]))
  if method == "crd":
    for k, v in ours["crd"].items():
      record("crd_" + ("memory" if k.startswith("memory") else "z" if k.startswith("z")
                       else "heads"), k, _ratio(v, g[f"crd/final/{k}"]))
  return worst


def _assert_within(worst):
  bad = {k: v for k, v in worst.items() if v[0] > 1.0}
  assert not bad, ("outside |diff| <= 1e-4 |ref| + atol (worst ratio, entry): "
                   + ", ".join(f"{k}: {r:.3g} at {n}" for k, (r, n) in bad.items()))


@pytest.fixture(scope="module")
def trajectories(golden):
  return {m: run_kd_jax(golden, m) for m in METHODS}


# ------------------------------------------------------------------ tests

def test_fixture_is_the_recipe(golden):
  """The fixture's set-up is RepDistiller's: checked here so a regenerated fixture cannot drift."""
  assert (_meta(golden, "lr"), _meta(golden, "momentum"), _meta(golden, "weight_decay")) == (
      0.05, 0.9, 5e-4)
  assert _meta(golden, "spec/kd") == "ce:0.1,kd:0.9(temperature=4)"
  assert _meta(golden, "spec/sp") == "ce:1,sp:3000"
  assert _meta(golden, "spec/crd").startswith("ce:1,crd:0.8(")
  # SP's student differs only by a power-of-two kernel scale (exact; the same function).
  assert _meta(golden, "sp/kernel_scale") == 8.0
  # 5 batches of 16 over 64 examples: the fifth revisits examples (CRD memory rows written twice).
  idx = golden["data/batch_index"]
  assert idx.shape == (5, 16) and len(np.unique(idx)) == 64
  assert all(len(np.unique(b)) == 16 for b in idx)


def test_crd_negatives_are_kd_jax_draws(golden, trajectories):
  """The PyTorch CRD was fed the negatives kd_jax's step draws (same per-step keys)."""
  np.testing.assert_array_equal(np.stack(trajectories["crd"]["negatives"]),
                                golden["crd/negatives"])


@pytest.mark.parametrize("method", METHODS)
def test_trajectory_matches_repdistiller(golden, trajectories, method):
  worst = compare(golden, method, trajectories[method])
  print(f"\n{method}: worst |diff| / (1e-4 |ref| + atol): "
        + ", ".join(f"{k} {r:.3g} ({n})" for k, (r, n) in worst.items()))
  _assert_within(worst)


def _bn_modules(model):
  from kd_jax.models._layers import TorchBatchNorm
  return [m for _, m in nnx.iter_modules(model) if isinstance(m, TorchBatchNorm)]


def _bn_flax_momentum(model):
  """PyTorch's momentum=0.1 passed to flax as is (flax keeps 0.1 of the old statistic)."""
  for bn in _bn_modules(model):
    bn.momentum = 0.1


def _bn_biased_running_var(model):
  """Plain flax batch norm: the running variance averages the biased batch variance."""
  for bn in _bn_modules(model):
    bn.__class__ = nnx.BatchNorm


LR, WD = 0.05, 5e-4
PERTURBED = {
    "nesterov": dict(tx=optax.chain(optax.add_decayed_weights(WD),
                                    optax.sgd(LR, momentum=0.9, nesterov=True))),
    # Dampening 0.1 (buf <- 0.9 buf + 0.9 g), here from the first step on.
    "dampening": dict(tx=optax.chain(optax.add_decayed_weights(WD), optax.scale(0.9),
                                     optax.trace(0.9), optax.scale(-LR))),
    # Decay added after the momentum buffer (SGDW): not accumulated in the buffer.
    "decoupled_weight_decay": dict(tx=optax.chain(optax.trace(0.9), optax.add_decayed_weights(WD),
                                                  optax.scale(-LR))),
    "bn_momentum_convention": dict(edit_student=_bn_flax_momentum),
    "bn_biased_running_var": dict(edit_student=_bn_biased_running_var),
}


@pytest.mark.parametrize("name", sorted(PERTURBED))
def test_perturbed_recipe_fails(golden, name):
  """Each one-line change of the optimizer or batch-norm semantics leaves the tolerance."""
  worst = compare(golden, "kd", run_kd_jax(golden, "kd", **PERTURBED[name]))
  print(f"\n{name}: " + ", ".join(f"{k} {r:.3g} ({n})" for k, (r, n) in worst.items()))
  with pytest.raises(AssertionError):
    _assert_within(worst)
