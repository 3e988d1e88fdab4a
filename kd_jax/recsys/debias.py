"""Two debiasing strategies that use the teachers' disagreement (dissensus). OUR design.

The TORS'24 extension of HetComp reduces popularity lift with two dissensus-based strategies
whose definitions are not public to us (docs/hetcomp.md). These two are ours, built on one
observation: the ensemble's consensus items (high in every teacher's list) are mostly popular
items, while items that only some teachers rank high are more often niche. With w(r) the rank
importance (knowledge.py) and r_x = N for items outside teacher x's top-N list, the dissensus of
item i for user u is::

    d(u, i) = std_x w(r_x(u, i)).

Strategy 1, dissensus-aware knowledge (`rerank`): the ensemble ranks items by::

    mean_x w(r_x) + beta * d(u, i)

(an optimistic, upper-confidence ensemble), so items championed by a subset of the teachers can
enter T_u in place of lukewarm consensus items. It changes *which* items are transferred.

Strategy 2, consensus-discounted transfer (`weight`): the knowledge is unchanged but each T_u
term of the AKT losses is weighted by::

    omega(u, i) = (1 - gamma) + gamma * d(u, i) / mean_{j in T_u} d(u, j),

which has mean 1 over T_u, so consensus items are pushed less hard than contested ones. It
changes *how strongly* each item is transferred.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

STRATEGIES = ("rerank", "weight")
DEFAULT_RERANK_BONUS = 1.0
DEFAULT_WEIGHT_STRENGTH = 0.5


def dissensus_weights(dissensus, valid, strength: float = DEFAULT_WEIGHT_STRENGTH):
  """omega = (1 - gamma) + gamma * d / mean_{valid} d per row; rows with mean d = 0 get 1.

  Args:
    dissensus: [U, K] d(u, i) of the knowledge items.
    valid: [U, K] bool, valid knowledge entries.
    strength: gamma in [0, 1] (0: HetComp unchanged).
  """
  if not 0.0 <= strength <= 1.0:
    raise ValueError(f"strength must be in [0, 1], got {strength}.")
  xp = jnp if not isinstance(dissensus, np.ndarray) else np
  d = xp.where(valid, dissensus, 0.0)
  cnt = xp.maximum(xp.sum(valid, -1, keepdims=True), 1)
  mean = xp.sum(d, -1, keepdims=True) / cnt
  rel = xp.where(mean > 0, d / xp.where(mean > 0, mean, 1.0), 1.0)
  return xp.where(valid, (1.0 - strength) + strength * rel, 0.0).astype(xp.float32)
