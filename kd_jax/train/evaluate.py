"""Evaluation: accuracy, cross-entropy and distillation diagnostics over padded, masked batches.

Batches come from `kd_jax.data.eval_batches` (fixed size, boolean "mask" for the padding). Each
device sums correct predictions, losses and valid rows over its shard; the sums are `psum`-med
over the batch axis, so the result is exact whatever the padding and the number of devices.

`make_distill_eval_step` / `evaluate_distillation` run a student and its teacher on the same
batches and report, besides the student's accuracy and loss, what a distillation study looks at
(as big_vision's distillation evaluators do): the teacher's accuracy, top-1 agreement between
student and teacher, the mean KL(teacher || student) at T = 1, the expected calibration error
of both, and the linear CKA between a student and a teacher feature map.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import PartitionSpec as P

from kd_jax import compile_options
from kd_jax import losses
from kd_jax import parallel


def _sums(graphdef, variables, batch, axis_name, input_key):
  model = nnx.merge(graphdef, variables["params"], variables["batch_stats"])
  logits, _ = model(batch[input_key], train=False)
  logits = logits.astype(jnp.float32)
  mask = batch.get("mask")
  valid = jnp.ones(logits.shape[:1], jnp.float32) if mask is None else mask.astype(jnp.float32)
  labels = batch["label"]
  correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32) * valid
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels) * valid
  sums = {"correct": jnp.sum(correct), "loss": jnp.sum(ce), "count": jnp.sum(valid)}
  if axis_name is not None:
    sums = jax.lax.psum(sums, axis_name)
  return sums


@functools.lru_cache(maxsize=32)
def make_eval_step(graphdef: nnx.GraphDef, mesh: jax.sharding.Mesh | None = None, *,
                   input_key: str = "image"):
  """A jitted `eval_step(variables, batch) -> {"correct", "loss", "count"}` (sums).

  Cached per (graphdef, mesh), so runs of the same architecture share one compilation. With a
  mesh the batch is split over its devices (batch size divisible by the device count) and
  the variables must be replicated on it; without one it runs on the default device.
  """
  if mesh is None:
    return compile_options.jit(lambda v, b: _sums(graphdef, v, b, None, input_key))

  def per_device(v, b):
    return _sums(graphdef, v, b, parallel.BATCH_AXIS, input_key)

  mapped = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(parallel.BATCH_AXIS)),
                         out_specs=P(), check_vma=False)
  return compile_options.jit(mapped)


def evaluate(eval_step, variables: Mapping[str, Any], batches: Iterable[Mapping[str, Any]], *,
             mesh: jax.sharding.Mesh | None = None) -> dict[str, float]:
  """Top-1 accuracy and mean cross-entropy over every valid example of `batches`.

  accuracy = sum(correct * mask) / max(sum(mask), 1), loss likewise.
  """
  total = {"correct": 0.0, "loss": 0.0, "count": 0.0}
  for batch in batches:
    if mesh is not None:  # every host reads the full batch and contributes its block of rows
      batch = parallel.shard_batch(parallel.host_block(batch), mesh)
    sums = jax.device_get(eval_step(variables, batch))
    for k in total:
      total[k] += float(sums[k])
  count = max(total["count"], 1.0)
  return {"accuracy": total["correct"] / count, "loss": total["loss"] / count,
          "count": int(total["count"])}


def predict_logits(graphdef: nnx.GraphDef, variables, batches, *, input_key: str = "image"):
  """Concatenated inference-mode logits over the valid rows of `batches` (for analysis)."""
  apply = compile_options.jit(lambda v, x: nnx.merge(graphdef, v["params"], v["batch_stats"])(
      x, train=False)[0])
  out = []
  for batch in batches:
    logits = np.asarray(apply(variables, batch[input_key]))
    mask = batch.get("mask")
    out.append(logits if mask is None else logits[np.asarray(mask)])
  return np.concatenate(out)


# ---------------------------------------------------------------------------- diagnostics

def _confidence_bins(probs, correct, valid, num_bins):
  """Per-bin count, confidence sum and correct sum of the top-1 confidence (equal-width bins
  on [0, 1], bin b = (b/B, (b+1)/B], as `kd_jax.ptloss.expected_calibration_error`)."""
  conf = jnp.max(probs, axis=-1)
  bins = jnp.clip(jnp.ceil(conf * num_bins).astype(jnp.int32) - 1, 0, num_bins - 1)
  onehot = jax.nn.one_hot(bins, num_bins, dtype=jnp.float32) * valid[:, None]
  return {"count": jnp.sum(onehot, 0), "conf": onehot.T @ conf, "correct": onehot.T @ correct}


def _centred_gram(f, valid):
  """`F_c F_c^T` of the valid rows of `f` (flattened to [b, d], float32), centred over them; the
  rows and columns of invalid examples are zero."""
  f = f.reshape(f.shape[0], -1).astype(jnp.float32)
  n = jnp.maximum(jnp.sum(valid), 1.0)
  f = (f - (valid @ f) / n) * valid[:, None]
  return f @ f.T


def hsic_unbiased(k, l, n):
  r"""Song et al.'s unbiased HSIC estimator of two [b, b] Gram matrices over n examples.

  .. math:: \mathrm{HSIC}_1(K, L) = \frac{1}{n(n-3)}\Big[\operatorname{tr}(\tilde K \tilde L)
     + \frac{\mathbf 1^\top \tilde K \mathbf 1\, \mathbf 1^\top \tilde L \mathbf 1}{(n-1)(n-2)}
     - \frac{2}{n-2} \mathbf 1^\top \tilde K \tilde L \mathbf 1\Big]

  with :math:`\tilde K, \tilde L` the Grams with zeroed diagonals (Song et al., "Feature
  Selection via Dependence Maximization", JMLR 2012). Rows and columns of padding must be zero
  and `n` is the number of the others; below 4 examples the estimator is undefined and 0 is
  returned.
  """
  k = k - jnp.diag(jnp.diag(k))
  l = l - jnp.diag(jnp.diag(l))
  m = jnp.maximum(n, 4.0)
  value = (jnp.sum(k * l) + jnp.sum(k) * jnp.sum(l) / ((m - 1) * (m - 2))
           - 2.0 / (m - 2) * jnp.sum(jnp.sum(k, 0) * jnp.sum(l, 0))) / (m * (m - 3))
  return jnp.where(n >= 4, value, 0.0)


def _distill_sums(s_graphdef, t_graphdef, s_vars, t_vars, batch, axis_name, input_key,
                  features, num_bins):
  x = batch[input_key]
  s_logits, s_feats = nnx.merge(s_graphdef, s_vars["params"], s_vars["batch_stats"])(
      x, train=False)
  t_logits, t_feats = nnx.merge(t_graphdef, t_vars["params"], t_vars["batch_stats"])(
      x, train=False)
  s_logits = s_logits.astype(jnp.float32)
  t_logits = jax.lax.stop_gradient(t_logits).astype(jnp.float32)
  mask = batch.get("mask")
  valid = jnp.ones(s_logits.shape[:1], jnp.float32) if mask is None else mask.astype(jnp.float32)
  labels = batch["label"]
  s_pred, t_pred = jnp.argmax(s_logits, -1), jnp.argmax(t_logits, -1)
  s_correct = (s_pred == labels).astype(jnp.float32)
  t_correct = (t_pred == labels).astype(jnp.float32)
  sums = {
      "count": jnp.sum(valid),
      "correct": jnp.sum(s_correct * valid),
      "loss": jnp.sum(optax.softmax_cross_entropy_with_integer_labels(s_logits, labels) * valid),
      "teacher_correct": jnp.sum(t_correct * valid),
      "agree": jnp.sum((s_pred == t_pred).astype(jnp.float32) * valid),
      "kl": jnp.sum(losses.kd(s_logits, t_logits, temperature=1.0, where=valid > 0)),
      "bins": _confidence_bins(jax.nn.softmax(s_logits, -1), s_correct, valid, num_bins),
      "teacher_bins": _confidence_bins(jax.nn.softmax(t_logits, -1), t_correct, valid, num_bins),
  }
  if axis_name is not None:
    sums = jax.lax.psum(sums, axis_name)
  if features is not None:
    s_name, t_name = features
    for who, name, feats in (("student", s_name, s_feats), ("teacher", t_name, t_feats)):
      if name not in feats:
        raise ValueError(f"CKA diagnostic: the {who} has no feature {name!r}; its features: "
                         f"{sorted(feats)}")
    fs, ft, v = s_feats[s_name], jax.lax.stop_gradient(t_feats[t_name]), valid
    if axis_name is not None:  # the Grams cover the global eval batch, whatever the devices
      fs, ft, v = (jax.lax.all_gather(a, axis_name, tiled=True) for a in (fs, ft, v))
    k, l, n = _centred_gram(fs, v), _centred_gram(ft, v), jnp.sum(v)
    sums["hsic"] = {"st": hsic_unbiased(k, l, n), "ss": hsic_unbiased(k, k, n),
                    "tt": hsic_unbiased(l, l, n)}
  return sums


@functools.lru_cache(maxsize=32)
def make_distill_eval_step(student_graphdef: nnx.GraphDef, teacher_graphdef: nnx.GraphDef,
                           mesh: jax.sharding.Mesh | None = None, *,
                           student_feature: str | None = "pre_pool",
                           teacher_feature: str | None = "pre_pool", num_bins: int = 15,
                           input_key: str = "image"):
  """A jitted `step(student_variables, teacher_variables, batch) -> sums` for the diagnostics.

  Both models run in inference mode on the same batch. The sums (count, correct, loss, teacher
  correct, agreement, KL, per-bin confidence statistics of both and, when both feature names
  are given, the unbiased HSIC terms of the CKA) are turned into metrics by
  `evaluate_distillation`. With a mesh the batch is split over its devices and both variable
  trees must be replicated on it; the CKA's Gram matrices are taken over the all-gathered
  global batch. Cached per arguments, like `make_eval_step`.
  """
  features = None
  if student_feature and teacher_feature:
    features = (student_feature, teacher_feature)
  if num_bins < 1:
    raise ValueError(f"num_bins must be >= 1, got {num_bins}")
  fn = functools.partial(_distill_sums, student_graphdef, teacher_graphdef,
                         input_key=input_key, features=features, num_bins=num_bins)
  if mesh is None:
    return compile_options.jit(lambda s, t, b: fn(s, t, b, None))
  mapped = jax.shard_map(lambda s, t, b: fn(s, t, b, parallel.BATCH_AXIS), mesh=mesh,
                         in_specs=(P(), P(), P(parallel.BATCH_AXIS)), out_specs=P(),
                         check_vma=False)
  return compile_options.jit(mapped)


def _ece(bins, count):
  return float(np.sum(np.abs(bins["correct"] - bins["conf"])) / max(count, 1.0))


def evaluate_distillation(step, student_variables: Mapping[str, Any],
                          teacher_variables: Mapping[str, Any],
                          batches: Iterable[Mapping[str, Any]], *,
                          mesh: jax.sharding.Mesh | None = None) -> dict[str, float]:
  r"""A student's accuracy and its distillation diagnostics against the teacher.

  Over the N valid examples of `batches` (s, t: student and teacher logits; p = softmax):

  - accuracy, loss: the student's top-1 accuracy and mean cross-entropy (as `evaluate`);
  - teacher_accuracy: the teacher's top-1 accuracy;
  - agreement: :math:`\frac1N\sum_i [\arg\max s_i = \arg\max t_i]`;
  - kl: :math:`\frac1N\sum_i KL(p(t_i) \| p(s_i))` at temperature 1;
  - ece, teacher_ece: expected calibration error :math:`\sum_b \frac{n_b}{N}|acc_b - conf_b|`
    over `num_bins` equal-width bins of the top-1 confidence (Guo et al., ICML 2017);
  - cka: minibatch linear CKA of the two feature maps (each flattened per example),
    :math:`\sum_j \mathrm{HSIC}_1(K_j, L_j) / \sqrt{\sum_j \mathrm{HSIC}_1(K_j, K_j)
    \sum_j \mathrm{HSIC}_1(L_j, L_j)}` over the batches j with linear Grams
    :math:`K_j = X_j X_j^\top, L_j = Y_j Y_j^\top` and Song et al.'s unbiased HSIC
    (`hsic_unbiased`): Kornblith et al., "Similarity of Neural Network Representations
    Revisited" (ICML 2019), in the minibatch form of Nguyen et al., "Do Wide and Deep Networks
    Learn the Same Things?" (ICLR 2021). It depends on the eval batch size (not on the device
    count); batches with fewer than 4 valid examples do not contribute.

  Args:
    step: from `make_distill_eval_step`.
    student_variables, teacher_variables: `{"params", "batch_stats"}` of each (replicated on
      the mesh when there is one).
    batches: eval batches with "image", "label" and optionally "mask".
    mesh: the step's mesh (each host reads full batches and contributes its block of rows).

  Returns:
    The metrics above as floats, and "count" (N).
  """
  total = None
  for batch in batches:
    if mesh is not None:
      batch = parallel.shard_batch(parallel.host_block(batch), mesh)
    sums = jax.device_get(step(student_variables, teacher_variables, batch))
    sums = jax.tree.map(lambda a: np.asarray(a, np.float64), sums)
    total = sums if total is None else jax.tree.map(np.add, total, sums)
  if total is None:
    raise ValueError("evaluate_distillation got no batches")
  count = float(total["count"])
  n = max(count, 1.0)
  out = {"accuracy": float(total["correct"]) / n, "loss": float(total["loss"]) / n,
         "teacher_accuracy": float(total["teacher_correct"]) / n,
         "agreement": float(total["agree"]) / n, "kl": float(total["kl"]) / n,
         "ece": _ece(total["bins"], count), "teacher_ece": _ece(total["teacher_bins"], count),
         "count": int(count)}
  if "hsic" in total:
    h = total["hsic"]
    denom = float(np.sqrt(max(float(h["ss"]), 0.0) * max(float(h["tt"]), 0.0)))
    out["cka"] = float(h["st"]) / denom if denom > 0 else float("nan")
  return out
