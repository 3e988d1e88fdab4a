"""Correlation congruence with RepDistiller's trainable embeddings.

    e_s = W_s flatten(f_s) + b_s,   e_t = W_t flatten(f_t) + b_t,   L = losses.cc(e_s, e_t)

Both `LinearEmbed` heads (`torch.nn.Linear(d, feat_dim)`, no normalisation) are trained, the
teacher's too (its input, the teacher's pooled embedding, carries no gradient; its weights do).
`losses.cc` is RepDistiller's `Correlation`: mean over consecutive pairs of
`sum |e_s - e_t|_i * |e_s - e_t|_{i+1}`.

Paper: B. Peng et al., "Correlation Congruence for Knowledge Distillation", ICCV 2019.
Reference: HobbitLong/RepDistiller (`--distill correlation`, `-b 0.02` with CE weight 1,
feat_dim 128, on the pooled penultimate features).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from kd_jax import losses
from kd_jax.train.terms._base import LossTerm, feature_pair, gather_axis, register_term


def linear_init(key, dim_in: int, dim_out: int) -> dict[str, jax.Array]:
  """torch.nn.Linear's default: kernel [in, out] and bias ~ U(-1/sqrt(dim_in), 1/sqrt(dim_in))."""
  bound = 1.0 / math.sqrt(dim_in)
  k_w, k_b = jax.random.split(key)
  return {"kernel": jax.random.uniform(k_w, (dim_in, dim_out), jnp.float32, -bound, bound),
          "bias": jax.random.uniform(k_b, (dim_out,), jnp.float32, -bound, bound)}


def linear_embed(head: dict[str, jax.Array], x) -> jax.Array:
  """RepDistiller `LinearEmbed`: flatten(x) @ kernel + bias, in float32."""
  x = jnp.asarray(x, jnp.float32).reshape(x.shape[0], -1)
  return jnp.matmul(x, head["kernel"], precision=jax.lax.Precision.HIGHEST) + head["bias"]


@register_term("cc")
@dataclasses.dataclass(frozen=True)
class CC(LossTerm):
  """Correlation congruence through trainable `LinearEmbed` heads (`embed_dim`, default 128;
  `embed_dim=0` compares the raw features, which must then have equal widths)."""

  feature: Any = "embedding"
  teacher_feature: Any = None
  embed_dim: int = 128
  all_gather: bool = False

  def init(self, rng, student, teacher, *, num_data=None):
    if not self.embed_dim:
      return None, None
    s = student.features[self.feature]
    t = teacher.features[self.teacher_feature or self.feature]
    k_s, k_t = jax.random.split(rng)
    return {"student": linear_init(k_s, math.prod(s.shape[1:]), self.embed_dim),
            "teacher": linear_init(k_t, math.prod(t.shape[1:]), self.embed_dim)}, None

  def __call__(self, ctx):
    s, t = feature_pair(ctx, self.feature, self.teacher_feature)
    if self.embed_dim:
      if ctx.params is None:
        raise ValueError("loss term 'cc' has no embedding heads: initialise the terms with "
                         "step.init(state, batch, ...) before training (or pass embed_dim=0).")
      s, t = linear_embed(ctx.params["student"], s), linear_embed(ctx.params["teacher"], t)
    return losses.cc(s, t, where=ctx.where, axis_name=gather_axis(ctx, self.all_gather))
