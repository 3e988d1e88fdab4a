"""Ranking-distillation losses: HetComp's phase-A relation and phase-B PL losses, and RRD.

Official code `SeongKu-Kang/HetComp_WWW23: Models/HetComp.py`; docs/hetcomp.md. For a user u
with student scores s (clipped to [-40, 40] as in the official code), training items O_u,
unobserved items N_u, ensemble knowledge T_u (top-K unobserved, ranked) and observed knowledge
P_u (top-P training items, ranked)::

  phase A: L_A(u) = - sum_{i in P_u + T_u} [ s_i - log( e^{s_i} + sum_{j in N_u \\ T_u} e^{s_j} ) ]
  phase B: L_B(u) = PL(P_u; N_u \\ T_u^(50))
                    + 1/2 [ PL(T_u^(50); N_u \\ T_u^(50)) + PL(T_u^(10); N_u \\ T_u^(10)) ]
           PL(pi; R) = - sum_k [s_{pi_k} - log(sum_{l >= k} e^{s_{pi_l}} + sum_{j in R} e^{s_j})]

Every "rest" sum is a masked log-sum-exp over the pool itself (the official code subtracts the
top-set sum from the all-unobserved sum and clamps at 1e-5; we never subtract). Losses are per
user (the caller sums over the batch with lambda_A = 0.01 / lambda_B = 0.005). Optional
per-item weights scale each knowledge term (our debiasing strategy 2, see debias.py).

`rrd_loss` is the ensemble-KD baseline: relaxed ranking distillation (DE-RRD, CIKM 2020), the
Plackett-Luce loss of the teacher's top-K list against a few sampled uninteresting items.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kd_jax.losses._numerics import apply_where, to_float32
from kd_jax.losses._validation import check_rank, check_same_shape, check_where

# A finite stand-in for log(0): exp() of it is exactly 0 and it keeps every gradient finite.
_LOG_ZERO = -1e30


def masked_logsumexp(x, mask, axis: int = -1):
  """log sum_{mask} e^x along `axis`; an empty mask gives a finite `_LOG_ZERO` (zero grads)."""
  has = jnp.any(mask, axis=axis)
  safe_mask = mask | ~jnp.any(mask, axis=axis, keepdims=True)
  lse = jax.nn.logsumexp(jnp.where(safe_mask, x, 0.0), axis=axis, where=safe_mask)
  return jnp.where(has, lse, _LOG_ZERO)


def _membership(ids, valid, num_items):
  """[B, L] ids with a validity mask -> a [B, num_items] boolean membership mask."""
  b = ids.shape[0]
  rows = jnp.broadcast_to(jnp.arange(b)[:, None], ids.shape)
  return jnp.zeros((b, num_items), bool).at[rows, ids].max(valid)


def _prepare(scores, train_mask, topk_ids, topk_mask, observed_ids, observed_mask, clip):
  check_rank(scores, 2, "scores")
  check_same_shape(scores, train_mask, "scores", "train_mask")
  check_same_shape(topk_ids, topk_mask, "topk_ids", "topk_mask")
  check_same_shape(observed_ids, observed_mask, "observed_ids", "observed_mask")
  if topk_ids.shape[0] != scores.shape[0] or observed_ids.shape[0] != scores.shape[0]:
    raise ValueError(
        f"scores.shape={scores.shape}, topk_ids.shape={topk_ids.shape} and "
        f"observed_ids.shape={observed_ids.shape} must share the user axis.")
  s = to_float32(scores)
  if clip is not None:
    s = jnp.clip(s, -clip, clip)
  return s


def plackett_luce(list_scores, list_mask, rest_lse, weights=None):
  """PL(pi; R) = -sum_k w_k [s_k - log(sum_{l>=k, valid} e^{s_l} + e^{rest_lse})] per row.

  Args:
    list_scores: [B, L] the scores of the ranked list pi (best first).
    list_mask: [B, L] bool, valid list entries (masked ones contribute exactly 0).
    rest_lse: [B] log sum_{j in R} e^{s_j} (`_LOG_ZERO` for an empty pool).
    weights: optional [B, L] per-position weights (default 1).
  """
  s = jnp.where(list_mask, list_scores, _LOG_ZERO)
  suffix = jax.lax.cumlogsumexp(s, axis=1, reverse=True)
  denom = jnp.logaddexp(suffix, rest_lse[:, None])
  terms = jnp.where(list_mask, s - denom, 0.0)
  if weights is not None:
    terms = terms * weights
  return -jnp.sum(terms, axis=1)


def hetcomp_phase_a_loss(scores, train_mask, topk_ids, topk_mask, observed_ids, observed_mask,
                         *, topk_weights=None, clip: float | None = 40.0, where=None):
  """Phase A (overall relations): each knowledge item must beat the unobserved rest.

  L_A(u) = -sum_{i in P_u + T_u} [s_i - log(e^{s_i} + sum_{j in N_u minus T_u} e^{s_j})].

  Args:
    scores: [B, I] student scores over all items.
    train_mask: [B, I] bool, the users' training items (never in the rest pool).
    topk_ids: [B, K] int, T_u; topk_mask: [B, K] bool, its valid entries.
    observed_ids: [B, P] int, P_u; observed_mask: [B, P] bool.
    topk_weights: optional [B, K] weights of the T_u terms (debiasing strategy 2).
    clip: the official +-40 score clip (None: no clip).
    where: optional [B] bool user mask (masked users give exactly 0).

  Returns:
    [B] per-user losses.
  """
  s = _prepare(scores, train_mask, topk_ids, topk_mask, observed_ids, observed_mask, clip)
  check_where(where, s.shape[:1])
  in_t = _membership(topk_ids, topk_mask, s.shape[1])
  rest = masked_logsumexp(s, ~train_mask & ~in_t)[:, None]
  s_t = jnp.take_along_axis(s, topk_ids, 1)
  s_p = jnp.take_along_axis(s, observed_ids, 1)
  t_terms = jnp.where(topk_mask, s_t - jnp.logaddexp(s_t, rest), 0.0)
  if topk_weights is not None:
    t_terms = t_terms * to_float32(topk_weights)
  p_terms = jnp.where(observed_mask, s_p - jnp.logaddexp(s_p, rest), 0.0)
  return apply_where(-(jnp.sum(t_terms, 1) + jnp.sum(p_terms, 1)), where)


def hetcomp_phase_b_loss(scores, train_mask, topk_ids, topk_mask, observed_ids, observed_mask,
                         *, topk_weights=None, short: int = 10, long: int = 50,
                         clip: float | None = 40.0, where=None):
  """Phase B (fine-grained orders): Plackett-Luce over P_u, T_u^(50) and T_u^(10).

  L_B(u) = PL(P_u; N_u minus T^(50)) + 1/2 [PL(T^(50); N_u minus T^(50))
           + PL(T^(10); N_u minus T^(10))].

  Args: as `hetcomp_phase_a_loss`, plus `short` (10) and `long` (50), the two list lengths.

  Returns:
    [B] per-user losses.
  """
  s = _prepare(scores, train_mask, topk_ids, topk_mask, observed_ids, observed_mask, clip)
  check_where(where, s.shape[:1])
  if topk_ids.shape[1] < long:
    raise ValueError(f"topk_ids.shape={topk_ids.shape} holds fewer than long={long} items.")
  unobserved = ~train_mask
  num_items = s.shape[1]
  ids_l, ok_l = topk_ids[:, :long], topk_mask[:, :long]
  ids_s, ok_s = topk_ids[:, :short], topk_mask[:, :short]
  rest_l = masked_logsumexp(s, unobserved & ~_membership(ids_l, ok_l, num_items))
  rest_s = masked_logsumexp(s, unobserved & ~_membership(ids_s, ok_s, num_items))
  w = None if topk_weights is None else to_float32(topk_weights)
  loss = plackett_luce(jnp.take_along_axis(s, observed_ids, 1), observed_mask, rest_l)
  loss += 0.5 * (plackett_luce(jnp.take_along_axis(s, ids_l, 1), ok_l, rest_l,
                               None if w is None else w[:, :long])
                 + plackett_luce(jnp.take_along_axis(s, ids_s, 1), ok_s, rest_s,
                                 None if w is None else w[:, :short]))
  return apply_where(loss, where)


def rrd_loss(interesting_scores, uninteresting_scores, *, interesting_mask=None,
             uninteresting_mask=None, where=None):
  """Relaxed ranking distillation (RRD; Kang, Hwang, Kweon, Yu: "DE-RRD", CIKM 2020).

  For a user with the student's scores of K *interesting* items in the teacher's rank order
  (pi_1 best) and of L sampled *uninteresting* items U, the negative log-likelihood of a
  permutation that keeps the interesting items' order and puts all of them above U, with no
  order imposed among U:

      L(u) = - sum_{k=1}^{K} [ s_{pi_k} - log( sum_{l >= k} e^{s_{pi_l}} + sum_{j in U} e^{s_j} ) ]

  (`SeongKu-Kang/DE-RRD_CIKM20: Utils/loss.py, relaxed_ranking_loss`). It is the Plackett-Luce
  loss of the interesting list with U as its rest pool, i.e. ListMLE over [pi; U] minus the
  ListMLE terms of U's own positions. Computed in float32 with log-sum-exps (no exp of raw
  scores).

  Args:
    interesting_scores: [B, K] student scores of the interesting items, teacher's order.
    uninteresting_scores: [B, L] student scores of the uninteresting items.
    interesting_mask: optional [B, K] bool, valid interesting entries (masked ones contribute 0
      and are left out of every denominator).
    uninteresting_mask: optional [B, L] bool, valid uninteresting entries.
    where: optional [B] bool user mask (masked users give exactly 0).

  Returns:
    [B] per-user losses (the caller reduces).
  """
  check_rank(interesting_scores, 2, "interesting_scores")
  check_rank(uninteresting_scores, 2, "uninteresting_scores")
  if interesting_scores.shape[0] != uninteresting_scores.shape[0]:
    raise ValueError(
        f"interesting_scores.shape={interesting_scores.shape} and uninteresting_scores.shape="
        f"{uninteresting_scores.shape} must share the user axis.")
  s_i = to_float32(interesting_scores)
  s_u = to_float32(uninteresting_scores)
  m_i = (jnp.ones(s_i.shape, bool) if interesting_mask is None
         else jnp.asarray(interesting_mask, bool))
  m_u = (jnp.ones(s_u.shape, bool) if uninteresting_mask is None
         else jnp.asarray(uninteresting_mask, bool))
  check_same_shape(s_i, m_i, "interesting_scores", "interesting_mask")
  check_same_shape(s_u, m_u, "uninteresting_scores", "uninteresting_mask")
  check_where(where, s_i.shape[:1])
  return apply_where(plackett_luce(s_i, m_i, masked_logsumexp(s_u, m_u)), where)
