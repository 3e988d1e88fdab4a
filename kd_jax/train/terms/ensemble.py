"""Teacher ensembles as the terms see them: the combined teacher's outputs and per-teacher terms.

The step runs every member of a `kd_jax.teachers.Ensemble` (inference mode, under
`stop_gradient`, in the same jitted program) and hands the terms one `EnsembleOutputs`:

- "probs": logits `T log(sum_i w_i softmax(z_i / T))`, computed as a log-sum-exp of
  `log w_i + log_softmax(z_i / T)` (finite for logits of any size), so that
  `softmax(logits / T) = sum_i w_i softmax(z_i / T)`: KD at temperature `T` on these logits is
  KD against the mean of the members' tempered distributions (for KD, the distillation target
  is linear in the teacher's probabilities, so this also equals the weighted sum of the
  per-member cross-entropies up to a constant);
- "logits": `sum_i w_i z_i`;
- "per_teacher": the terms that read the teacher are wrapped in `PerTeacher`, which evaluates
  the term once per member and returns the weighted sum of the values.

Member i's features are `"<i>/<name>"`; the members' own `Outputs` are `members`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from kd_jax.train.terms._base import LossTerm, Outputs, Term, owns_variables


@dataclasses.dataclass(frozen=True)
class EnsembleOutputs(Outputs):
  """The combined teacher (`logits`, `features` as `"<i>/<name>"`) and each member's `Outputs`."""

  members: tuple = ()


jax.tree_util.register_dataclass(EnsembleOutputs, data_fields=["logits", "features", "members"],
                                 meta_fields=[])


def combine_outputs(members: Sequence[Outputs], *, weights: Sequence[float], combine: str,
                    temperature: float = 1.0) -> EnsembleOutputs:
  """Combines the members' outputs (see the module docstring); float32 logits.

  Raises:
    ValueError: the members' logits differ in shape.
  """
  members = tuple(members)
  shapes = [jnp.shape(m.logits) for m in members]
  if len(set(shapes)) > 1:
    raise ValueError(f"teacher ensemble members give logits of different shapes {shapes}; "
                     "they must predict the same classes for the same batch.")
  z = jnp.stack([jnp.asarray(m.logits, jnp.float32) for m in members])  # [n, ..., K]
  w = jnp.asarray(weights, jnp.float32).reshape((-1,) + (1,) * (z.ndim - 1))
  if combine == "logits":
    logits = jnp.sum(w * z, axis=0)
  elif combine in ("probs", "per_teacher"):
    keep = [i for i, wi in enumerate(weights) if wi > 0]  # log 0 never enters the sum
    log_p = jax.nn.log_softmax(z[jnp.asarray(keep)] / temperature, axis=-1)
    logits = temperature * jax.nn.logsumexp(jnp.log(w[jnp.asarray(keep)]) + log_p, axis=0)
  else:
    raise ValueError(f"unknown ensemble combination {combine!r}.")
  features = {f"{i}/{k}": v for i, m in enumerate(members) for k, v in m.features.items()}
  return EnsembleOutputs(logits=logits, features=features, members=members)


@dataclasses.dataclass(frozen=True)
class PerTeacher(LossTerm):
  """`sum_i w_i inner(ctx with teacher = member i)`: a teacher-reading term once per member."""

  inner: LossTerm
  weights: tuple[float, ...]

  @property
  def batch_keys(self):  # type: ignore[override]
    return self.inner.batch_keys

  def __post_init__(self):
    if owns_variables(self.inner):
      raise ValueError(f"the loss term {type(self.inner).__name__} owns parameters or state, "
                       "so it cannot be evaluated once per teacher (combine='per_teacher'); "
                       "use combine='probs' or 'logits' with member features '<i>/<name>'.")

  def __call__(self, ctx):
    members = getattr(ctx.teacher, "members", None)
    if not members:
      raise ValueError("a per-teacher term needs an ensemble teacher (kd_jax.teachers.Ensemble).")
    total = jnp.zeros((), jnp.float32)
    for w, member in zip(self.weights, members):
      value = self.inner(dataclasses.replace(ctx, teacher=member))
      if isinstance(value, tuple):
        raise ValueError(f"the loss term {type(self.inner).__name__} returns a state; it cannot "
                         "be evaluated once per teacher.")
      total = total + w * jnp.asarray(value, jnp.float32)
    return total


def per_teacher_terms(terms: Sequence[Term], weights: Sequence[float]) -> tuple[Term, ...]:
  """`terms` with every teacher-reading term wrapped in `PerTeacher(term, weights)`."""
  return tuple(dataclasses.replace(t, term=PerTeacher(t.term, tuple(weights)))
               if t.needs_teacher else t for t in terms)
