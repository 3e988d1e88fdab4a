"""Sparse KD term: Hinton KD over the teacher's top-k classes and a tail bucket.

`kd_topk` reads the teacher's top-k outputs from the batch when a top-k cache provides them
(`kd_jax.data.topk_cache`: `batches(..., extras=cache.lookup)` adds `teacher_topk_logits`,
`teacher_topk_indices` and `teacher_topk_tail_t<T>`); otherwise it reduces the dense teacher
logits of the step (teacher in the step, or a dense `cached_teacher`) to their top k. The loss is
the same either way (`losses.sparse_kd`), so one spec trains with or without the cache.
"""

from __future__ import annotations

import dataclasses

from kd_jax import losses
from kd_jax.data import topk_cache
from kd_jax.train.terms._base import LossTerm, masked_mean, register_term


@register_term("kd_topk")
@dataclasses.dataclass(frozen=True)
class KDTopK(LossTerm):
  """`losses.sparse_kd`: T^2 KL over the teacher's top-k classes plus one tail bucket.

  Options: `temperature` (the cache must store a tail at it), `k` (classes kept when reducing a
  dense teacher; a cache's own k must equal it), `prefix` of the cached batch columns.
  """

  temperature: float = 4.0
  k: int = 16
  prefix: str = topk_cache.PREFIX
  needs_teacher = False  # it may read the cache instead; checked when called

  def __post_init__(self):
    if not self.temperature > 0:
      raise ValueError(f"loss term 'kd_topk': temperature must be > 0, got {self.temperature}.")
    if not (isinstance(self.k, int) and self.k >= 1):
      raise ValueError(f"loss term 'kd_topk': k must be an int >= 1, got {self.k!r}.")

  def topk(self, ctx) -> losses.TopK:
    """The teacher's top-k: from the batch's cached columns, else from the dense teacher."""
    logits_key = topk_cache.logits_column(self.prefix)
    if logits_key in ctx.batch:
      tail_key = topk_cache.tail_column(self.temperature, self.prefix)
      if tail_key not in ctx.batch:
        stored = sorted(k for k in ctx.batch if k.startswith(self.prefix + "tail_t"))
        raise ValueError(f"loss term 'kd_topk' at temperature {self.temperature:g} needs the "
                         f"batch column {tail_key!r}; the cache provides {stored} (write it with "
                         "this temperature in CacheSpec.temperatures).")
      cached = losses.TopK(ctx.batch[logits_key],
                           ctx.batch[topk_cache.indices_column(self.prefix)],
                           ctx.batch[tail_key])
      if cached.logits.shape[-1] != self.k:
        raise ValueError(f"loss term 'kd_topk' has k={self.k}, the cached top-k has "
                         f"k={cached.logits.shape[-1]}; set kd_topk(k=...) to the cache's k.")
      return cached
    if ctx.teacher is None:
      raise ValueError(f"loss term 'kd_topk' needs the teacher: cached top-k columns "
                       f"({logits_key!r}, from kd_jax.data.topk_cache) or a teacher in the step; "
                       f"the batch has {sorted(ctx.batch)}.")
    return losses.teacher_topk(ctx.teacher.logits, k=self.k, temperature=self.temperature)

  def __call__(self, ctx):
    return masked_mean(losses.sparse_kd(ctx.student.logits, self.topk(ctx),
                                        temperature=self.temperature, where=ctx.where),
                       ctx.where)
