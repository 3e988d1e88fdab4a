"""Dynamic knowledge construction (DKC): HetComp's per-user, per-teacher easy-to-hard schedule.

Official code `SeongKu-Kang/HetComp_WWW23: main.py` (`DKC`, `get_NDCG_u`), vectorised: no
Python loop over users or teachers. Each (user u, teacher x) holds a checkpoint index v[u, x]
(0 = earliest). The discrepancy to checkpoint v is D = 1 - NDCG' between the student's top-50
and the teacher's top-50 at v:

    DCG  = sum_{r<50} 1[student item at rank r in teacher top-50] * g_r / log2(r + 2)
    IDCG = sum_{r<50} g_r / log2(r + 2),     g_r = 2 ** exp(-r / 10) - 1,

rounded to 4 decimals (g is indexed by the *student's* rank). At the first call D0 = D(v + 1)
is recorded; at every later call, for v < V - 1, with ratio = D0 / D(v + 1) and
th = alpha * decay ** floor(epoch / period), the pair advances (v += 1, D0 = D(min(v + 2, V - 1)))
when ratio > th, or, in the official code only, when ratio < 1. D(v + 1) = 0 gives ratio = inf
(advance), as in the official code.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

DKC_TOP = 50


def _gains(n: int):
  r = jnp.arange(n, dtype=jnp.float32)
  return (jnp.power(2.0, jnp.exp(-r / 10.0)) - 1.0) / jnp.log2(r + 2.0)


@functools.partial(jax.jit, static_argnames=("top",))
def discrepancy(student_top, teacher_lists, *, top: int = DKC_TOP):
  """D = 1 - NDCG' of the student's top list against every teacher list, rounded to 1e-4.

  Args:
    student_top: [B, >= top] int, the student's ranking (training items removed).
    teacher_lists: [B, ..., >= top] int, e.g. [B, X, V, N] teachers' lists.
    top: the list length compared (50 in the official code).

  Returns:
    [B, ...] float32 discrepancies (teacher_lists' shape without its last axis).
  """
  s = student_top[:, :top]
  t = teacher_lists[..., :top]
  extra = t.ndim - 2
  s_b = s.reshape(s.shape[:1] + (1,) * extra + (top, 1))
  hit = jnp.any(s_b == t[..., None, :], axis=-1)  # [B, ..., top] over the student's ranks
  g = _gains(top)
  ndcg = jnp.sum(hit * g, -1) / jnp.sum(g)
  return jnp.round(1.0 - ndcg, 4)


def dkc_threshold(epoch, *, alpha: float = 1.05, decay: float = 0.995, period: int = 10):
  """th = alpha * decay ** floor(epoch / period) (decay = 1 gives the paper-level rule)."""
  return alpha * jnp.power(decay, jnp.floor_divide(epoch, period).astype(jnp.float32))


@functools.partial(jax.jit, static_argnames=("first_call", "advance_on_drift", "period"))
def dkc_switch(v, d0, d_all, epoch, *, first_call: bool, alpha: float = 1.05,
               decay: float = 0.995, period: int = 10, advance_on_drift: bool = True):
  """One DKC call: which (user, teacher) pairs move to their next checkpoint.

  Args:
    v: [U, X] int current checkpoint indices.
    d0: [U, X] float recorded discrepancies D0.
    d_all: [U, X, V] discrepancies of the current student to every checkpoint.
    epoch: the current epoch (a multiple of `period`).
    first_call: record D0 = D(v + 1) and switch nothing.
    alpha: the base threshold (1.05).
    decay: the per-period threshold decay (official 0.995; 1.0 for the paper-level rule).
    period: p, the epochs between calls.
    advance_on_drift: the official "ratio < 1" branch.

  Returns:
    (new v, new d0, advanced [U, X] bool).
  """
  num_v = d_all.shape[-1]
  v = v.astype(jnp.int32)
  pick = lambda idx: jnp.take_along_axis(d_all, jnp.clip(idx, 0, num_v - 1)[..., None],  # noqa
                                         -1)[..., 0]
  d_next = pick(v + 1)
  if first_call:
    return v, d_next, jnp.zeros(v.shape, bool)
  th = dkc_threshold(epoch, alpha=alpha, decay=decay, period=period)
  safe = jnp.where(d_next > 0, d_next, 1.0)
  ratio = jnp.where(d_next > 0, d0 / safe, jnp.inf)
  advance = ratio > th
  if advance_on_drift:
    advance = advance | (ratio < 1.0)
  advance = advance & (v < num_v - 1)
  new_v = v + advance.astype(jnp.int32)
  new_d0 = jnp.where(advance, pick(v + 2), d0)
  return new_v, new_d0, advance


def dkc_finished(v, num_checkpoints: int = 4) -> bool:
  """True once mean_u v[u, x] rounds (2 decimals) to the last checkpoint for every teacher."""
  mean = jnp.round(jnp.mean(v.astype(jnp.float32), axis=0), 2)
  return bool(jnp.all(mean >= num_checkpoints - 1))
