"""PTLoss coefficient selection: pick epsilon by the proxy teacher's closeness to the labels.

Zhang et al., "Knowledge Distillation with Perturbed Loss" (KDD 2024; docs/ptloss.md): sample
candidate perturbations, compute each candidate's proxy teacher on a small labelled validation
set, score its mean distance to the one-hot labels (an unbiased stand-in for the Bayes
class-probabilities, after Menon et al., "A Statistical Perspective on Distillation", ICML
2021), keep the closest. No student is trained. All candidates are scored in one jitted
computation, vectorised over candidates in chunks.

    sel = select_coefficients(teacher_logits_val, labels_val, key=jax.random.key(0))
    loss = kd_jax.losses.ptloss(student_logits, teacher_logits, sel.epsilon)
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from kd_jax.losses import _numerics as nm
from kd_jax.losses import _ptloss
from kd_jax.losses import _validation as val

__all__ = ["Selection", "closeness", "expected_calibration_error", "sample_candidates",
           "select_coefficients"]

_DISTANCES = ("l2", "sq_l2", "tvd", "ce")
_PROB_FLOOR = 1e-12


class Selection(NamedTuple):
  """Result of `select_coefficients`.

  Attributes:
    epsilon: the selected coefficients, `[M]` (shared) or `[K, M]` (per class).
    index: index of the selected candidate (0 is the vanilla teacher, epsilon = 0).
    scores: `[C]` mean distance of each candidate's proxy teacher to the labels; `inf` for
      rejected candidates.
    valid: `[C]` bool, candidate accepted (epsilon valid and the solver converged everywhere).
    num_invalid: number of rejected candidates (`sum(~valid)`).
    epsilon_valid: `[C]` bool, the epsilon-only validity check (`epsilon_is_valid`).
    converged_fraction: `[C]` fraction of validation examples whose proxy solve converged.
    max_iterations: `[C]` most solver iterations any validation example needed.
    max_residual: `[C]` largest final residual over the validation examples.
    candidates: `[C, M]` or `[C, K, M]`, all candidates scored.
  """

  epsilon: jax.Array
  index: jax.Array
  scores: jax.Array
  valid: jax.Array
  num_invalid: jax.Array
  epsilon_valid: jax.Array
  converged_fraction: jax.Array
  max_iterations: jax.Array
  max_residual: jax.Array
  candidates: jax.Array


def sample_candidates(key, num_candidates: int, order: int = 5, num_classes: int | None = None,
                      *, scale: float = 1.0):
  r"""Candidate perturbations :math:`\epsilon_{k,m} \sim U[-a/m, a/m]`; candidate 0 is zero.

  The sampling law is ours (the paper's range and count were not available to us;
  docs/ptloss.md).

  Args:
    key: a `jax.random.key`.
    num_candidates: C, including the zero candidate.
    order: M, the number of perturbed orders (5 in the paper).
    num_classes: `None` for class-shared candidates `[C, M]`, else K for `[C, K, M]`.
    scale: a, the half-width of the order-1 range.

  Returns:
    float32 `[C, M]` or `[C, K, M]`.
  """
  return _sample_candidates(key, int(num_candidates), int(order),
                            None if num_classes is None else int(num_classes), scale)


@functools.partial(jax.jit, static_argnames=("num_candidates", "order", "num_classes"))
def _sample_candidates(key, num_candidates, order, num_classes, scale):
  shape = (num_candidates, order) if num_classes is None else (num_candidates, num_classes, order)
  half_width = scale / jnp.arange(1, order + 1, dtype=jnp.float32)
  eps = jax.random.uniform(key, shape, jnp.float32, -1.0, 1.0) * half_width
  return eps.at[0].set(0.0)


def closeness(probs, labels, *, distance: str = "l2", where=None):
  r"""Mean distance of distributions to one-hot labels (the paper's quality score, Eq. 11).

  `l2`: :math:`\|q - y\|_2` (the paper's); `sq_l2`: :math:`\|q - y\|_2^2` (the Brier score,
  a proper scoring rule: its validation estimate is unbiased for :math:`\|q - p^*\|^2` up to a
  constant); `ce`: :math:`-\log q_y` (the log score, proper too; probabilities floored at
  1e-12); `tvd`: :math:`\tfrac12 \|q - y\|_1`. `l2` and `tvd` are improper: they reward
  sharpening a distribution towards its arg-max. Averaged over the examples where `where` is
  True.

  Args:
    probs: `[N, K]` distributions.
    labels: `[N]` integer labels.
    distance: `"l2"`, `"sq_l2"`, `"ce"` or `"tvd"`.
    where: optional `[N]` boolean mask.

  Returns:
    float32 scalar.
  """
  if distance not in _DISTANCES:
    raise ValueError(f"distance must be one of {_DISTANCES}, got {distance!r}.")
  y = jax.nn.one_hot(labels, probs.shape[-1], dtype=jnp.float32)
  diff = nm.to_float32(probs) - y
  if distance == "tvd":
    per_example = 0.5 * jnp.sum(jnp.abs(diff), axis=-1)
  elif distance == "ce":
    q_y = jnp.sum(nm.to_float32(probs) * y, axis=-1)
    per_example = -jnp.log(jnp.maximum(q_y, _PROB_FLOOR))
  else:
    per_example = jnp.sum(jnp.square(diff), axis=-1)
    if distance == "l2":
      per_example = jnp.sqrt(per_example)
  per_example = nm.apply_where(per_example, where)
  return jnp.sum(per_example) / nm.masked_count(where, per_example.shape[0])


def select_coefficients(teacher_logits_val, labels_val, *, key, order: int = 5,
                        num_candidates: int = 1000, distance: str = "l2", per_class: bool = False,
                        temperature=1.0, scale: float = 1.0, candidates=None, where=None,
                        chunk_size: int = 8, method: str = "newton", max_iter: int | None = None,
                        tol: float = 1e-5, grid_size: int = 1025) -> Selection:
  r"""Chooses PTLoss coefficients by the proxy teacher's closeness to the validation labels.

  Zhang et al., KDD 2024, Eq. 11 and the random search of its Sec. 5; docs/ptloss.md: for each
  candidate epsilon, compute the proxy teacher (`kd_jax.losses.proxy_teacher`) of every
  validation example and score :math:`Q(\epsilon) = mean_x\, d(p^{t_{px}}(x; \epsilon), y(x))`;
  return the argmin. Candidate 0 is always epsilon = 0 (the vanilla teacher), so selection never
  does worse than KD on this score. A candidate is rejected (score `inf`, never selected, counted
  in `num_invalid`) when its epsilon fails `epsilon_is_valid` or its proxy solve does not
  converge on some validation example. Ties go to the lowest index.

  All candidates are scored in one jitted computation: `jax.lax.map` over chunks of
  `chunk_size` candidates, each chunk `vmap`-ed, so memory stays at about
  `chunk_size * N * K * 40` bytes.

  Args:
    teacher_logits_val: `[N, K]` teacher logits on the validation set.
    labels_val: `[N]` integer labels.
    key: `jax.random.key` for the candidates (ignored when `candidates` is given).
    order: M, number of perturbed orders (5 in the paper).
    num_candidates: C including the zero candidate (ignored when `candidates` is given).
    distance: `"l2"` (paper default), `"sq_l2"` (Brier), `"ce"` (log score) or `"tvd"`; see
      `closeness`.
    per_class: sample `[K, M]` candidates instead of class-shared `[M]` ones.
    temperature: teacher temperature; the proxy is computed from `softmax(t / T)`.
    scale: a in :math:`\epsilon_{k,m} \sim U[-a/m, a/m]`.
    candidates: optional explicit `[C, M]` or `[C, K, M]` candidates (then no sampling; put
      zeros first to keep the vanilla teacher in the search).
    where: optional `[N]` boolean mask of the validation examples to use.
    chunk_size: candidates solved together per step of the map.
    method, max_iter, tol, grid_size: passed to the proxy-teacher solver.

  Returns:
    a `Selection`.
  """
  val.check_rank(teacher_logits_val, 2, "teacher_logits_val")
  if jnp.ndim(teacher_logits_val) != 2:
    raise ValueError(f"teacher_logits_val must be [N, K], got shape "
                     f"{jnp.shape(teacher_logits_val)}.")
  n, num_classes = jnp.shape(teacher_logits_val)
  if tuple(jnp.shape(labels_val)) != (n,):
    raise ValueError(f"labels_val must have shape ({n},) to match teacher_logits_val.shape="
                     f"{jnp.shape(teacher_logits_val)}, got {jnp.shape(labels_val)}.")
  val.check_where(where, (n,))
  if distance not in _DISTANCES:
    raise ValueError(f"distance must be one of {_DISTANCES}, got {distance!r}.")
  if method not in ("newton", "fixed_point"):
    raise ValueError(f"method must be 'newton' or 'fixed_point', got {method!r}.")
  if candidates is None and key is None:
    raise ValueError("select_coefficients needs a `key` to sample candidates, or `candidates`.")
  if candidates is None:
    candidates = sample_candidates(key, int(num_candidates), int(order),
                                   num_classes if per_class else None, scale=scale)
  else:
    shape = tuple(jnp.shape(candidates))
    if len(shape) not in (2, 3) or (len(shape) == 3 and shape[1] != num_classes):
      raise ValueError(f"candidates must be [C, M] or [C, {num_classes}, M], got shape {shape}.")
  if max_iter is None:
    max_iter = 50 if method == "newton" else 500
  return _select(teacher_logits_val, labels_val, candidates, temperature, where, tol,
                 distance=distance, chunk_size=int(chunk_size), method=method,
                 max_iter=int(max_iter), grid_size=int(grid_size))


@functools.partial(jax.jit,
                   static_argnames=("distance", "chunk_size", "method", "max_iter", "grid_size"))
def _select(teacher_logits, labels, candidates, temperature, where, tol, *, distance,
            chunk_size, method, max_iter, grid_size):
  keep = jnp.ones(labels.shape, bool) if where is None else where
  # Masked examples get a uniform teacher: garbage there costs no solver iterations.
  teacher_logits = jnp.where(keep[:, None], nm.to_float32(teacher_logits), 0.0)
  pt = jax.nn.softmax(teacher_logits / temperature, axis=-1)

  def score_one(eps):
    res = _ptloss._proxy_teacher(pt, eps, tol, 0.5, method=method, max_iter=max_iter,
                                 grid_size=grid_size)
    converged = res.converged | ~keep
    score = closeness(res.probs, labels, distance=distance, where=where)
    kept = jnp.maximum(jnp.sum(keep), 1)
    return (score, res.valid, jnp.all(converged),
            jnp.sum(res.converged & keep) / kept,
            jnp.max(jnp.where(keep, res.iterations, 0)),
            jnp.max(jnp.where(keep, res.residual, 0.0)))

  score, eps_valid, all_converged, conv_frac, max_it, max_res = jax.lax.map(
      score_one, candidates, batch_size=chunk_size)
  valid = eps_valid & all_converged & jnp.isfinite(score)
  scores = jnp.where(valid, score, jnp.inf)
  index = jnp.argmin(scores)
  return Selection(
      epsilon=candidates[index], index=index, scores=scores, valid=valid,
      num_invalid=jnp.sum(~valid), epsilon_valid=eps_valid, converged_fraction=conv_frac,
      max_iterations=max_it, max_residual=max_res, candidates=candidates)


def expected_calibration_error(probs, labels, *, num_bins: int = 15, where=None) -> jax.Array:
  r"""ECE: :math:`\sum_b \tfrac{n_b}{N} |acc_b - conf_b|` over `num_bins` equal-width bins of the
  top-1 confidence (Guo et al., "On Calibration of Modern Neural Networks", ICML 2017).

  Args:
    probs: `[N, K]` distributions.
    labels: `[N]` integer labels.
    num_bins: number of confidence bins on [0, 1].
    where: optional `[N]` boolean mask.

  Returns:
    float32 scalar.
  """
  probs = nm.to_float32(probs)
  conf = jnp.max(probs, axis=-1)
  correct = (jnp.argmax(probs, axis=-1) == labels).astype(jnp.float32)
  valid = jnp.ones_like(conf) if where is None else jnp.asarray(where, jnp.float32)
  bins = jnp.clip(jnp.ceil(conf * num_bins).astype(jnp.int32) - 1, 0, num_bins - 1)
  onehot = jax.nn.one_hot(bins, num_bins) * valid[:, None]
  gap = jnp.abs(onehot.T @ correct - onehot.T @ conf)
  return jnp.sum(gap) / jnp.maximum(jnp.sum(valid), 1.0)
