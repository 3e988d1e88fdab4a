"""Distilling the ensemble knowledge into the MF student: HetComp and all-at-once KD.

`SeongKu-Kang/HetComp_WWW23: main.py` (docs/hetcomp.md). Each epoch walks over the training
interactions in batches of 1024 (shuffled); a step updates the unique users of its batch
(padded to a static size with a user mask), so heavy users are updated more often, as in the
official loop. The step is a masked phase-A or phase-B loss summed over users (lambda_A = 0.01,
lambda_B = 0.005), Adam(1e-3) with coupled L2 1e-5 (`add_decayed_weights` before Adam, as
PyTorch's `weight_decay`). A whole epoch is one jitted `lax.scan`.

HetComp: knowledge starts at checkpoint 0 for every (user, teacher); every `period` epochs DKC
(dkc.py) advances pairs and T_u is rebuilt; phase A is used until DKC has finished, then phase
B. All-at-once: T_u from the converged checkpoints from the start, phase B throughout (the
schedule-free ablation with the same loss). Validation Recall@50 every `eval_every` epochs;
test metrics reported at the best validation point; patience 5 evaluations, counted once the
final phase has started.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from kd_jax.recsys import debias as debias_lib
from kd_jax.recsys import dkc as dkc_lib
from kd_jax.recsys import knowledge as knowledge_lib
from kd_jax.recsys import losses, metrics
from kd_jax.recsys.data import Split
from kd_jax.recsys.student import STUDENT_DIM, make_student, mf_scores, student_scorer


@dataclasses.dataclass(frozen=True)
class DistillConfig:
  """HetComp's distillation settings (defaults: the official code's)."""
  method: str = "hetcomp"  # 'hetcomp' | 'all_at_once'
  debias: str | None = None  # None | 'rerank' | 'weight'
  debias_strength: float | None = None  # beta for 'rerank', gamma for 'weight'
  dim: int = STUDENT_DIM
  lr: float = 1e-3
  weight_decay: float = 1e-5
  lambda_a: float = 0.01
  lambda_b: float = 0.005
  batch_size: int = 1024
  batching: str = "interactions"  # official; 'users': every user once per epoch
  max_epochs: int = 1000
  eval_every: int = 10
  patience: int = 5
  period: int = 10  # DKC period p
  alpha: float = 1.05
  decay: float = 0.995  # official; 1.0 = paper-level rule
  advance_on_drift: bool = True  # the official 'ratio < 1' branch
  top_k: int = 100
  clip: float = 40.0
  seed: int = 0


def train_lists(split: Split, max_len: int | None = None) -> np.ndarray:
  """Each user's training items as a [U, L] int32 array padded with -1."""
  counts = split.counts("train")
  length = int(counts.max()) if max_len is None else max_len
  out = np.full((split.num_users, max(length, 1)), -1, np.int32)
  indptr, indices = split.train
  for u in range(split.num_users):
    row = indices[indptr[u]:indptr[u + 1]][:length]
    out[u, :len(row)] = row
  return out


def epoch_user_batches(split: Split, batch_size: int, batching: str, rng):
  """[S, Bu] user ids and masks for one epoch (Bu = min(users, batch_size))."""
  bu = min(split.num_users, batch_size)
  if batching == "users":
    perm = rng.permutation(split.num_users)
    steps = -(-split.num_users // bu)
    ids = np.zeros(steps * bu, np.int32)
    ids[:len(perm)] = perm
    mask = np.arange(steps * bu) < len(perm)
    return ids.reshape(steps, bu), mask.reshape(steps, bu)
  if batching != "interactions":
    raise ValueError(f"batching must be 'interactions' or 'users', got {batching!r}.")
  users, _ = split.pairs("train")
  perm = rng.permutation(len(users))
  steps = -(-len(users) // batch_size)
  ids = np.zeros((steps, bu), np.int32)
  mask = np.zeros((steps, bu), bool)
  for s in range(steps):
    uniq = np.unique(users[perm[s * batch_size:(s + 1) * batch_size]])
    ids[s, :len(uniq)] = uniq
    mask[s, :len(uniq)] = True
  return ids, mask


_CACHE: dict = {}


def optimizer_and_epoch_fn(cfg: DistillConfig, phase: str, num_items: int):
  """(tx, epoch_fn) for `cfg`, cached so that runs differing only in seed, method or debiasing
  share one compilation."""
  key = (dataclasses.replace(cfg, seed=0, method="hetcomp", debias=None, debias_strength=None,
                             max_epochs=0), phase, num_items)
  if key not in _CACHE:
    tx = optax.chain(optax.add_decayed_weights(cfg.weight_decay), optax.adam(cfg.lr))
    _CACHE[key] = (tx, make_epoch_fn(tx, phase=phase, cfg=cfg, num_items=num_items))
  return _CACHE[key]


def make_epoch_fn(tx, *, phase: str, cfg: DistillConfig, num_items: int):
  """A jitted epoch over [S, Bu] user batches with the phase-A or phase-B loss."""
  if phase == "a":
    loss_fn = losses.hetcomp_phase_a_loss
  else:
    long = min(50, cfg.top_k)  # T^(50) and T^(10); capped for short knowledge lists
    loss_fn = functools.partial(losses.hetcomp_phase_b_loss, long=long, short=min(10, long))
  lam = cfg.lambda_a if phase == "a" else cfg.lambda_b

  def step(const, carry, batch):
    params, opt_state = carry
    users, umask = batch
    t_ids, t_ok, t_w, p_ids, p_ok, tr = (a[users] for a in const)
    rows = jnp.broadcast_to(jnp.arange(users.shape[0])[:, None], tr.shape)
    train_mask = jnp.zeros((users.shape[0], num_items), bool).at[
        rows, jnp.maximum(tr, 0)].max(tr >= 0)

    def objective(p):
      s = mf_scores(p, users)
      per_user = loss_fn(s, train_mask, t_ids, t_ok & umask[:, None], p_ids,
                         p_ok & umask[:, None], topk_weights=t_w, clip=cfg.clip, where=umask)
      return lam * jnp.sum(per_user)

    loss, grads = jax.value_and_grad(objective)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def epoch(params, opt_state, users, umask, const):
    (params, opt_state), l = jax.lax.scan(lambda c, b: step(const, c, b),
                                          (params, opt_state), (users, umask))
    return params, opt_state, jnp.mean(l)

  return epoch


@functools.partial(jax.jit, static_argnames=("top",))
def _student_top(params, users, tr, *, top):
  s = mf_scores(params, users)
  rows = jnp.broadcast_to(jnp.arange(users.shape[0])[:, None], tr.shape)
  train = jnp.zeros(s.shape, bool).at[rows, jnp.maximum(tr, 0)].max(tr >= 0)
  s = jnp.where(train, -jnp.inf, s)
  return jax.lax.top_k(s, top)[1]


def all_discrepancies(params, know: knowledge_lib.Knowledge, tr: np.ndarray, *,
                      top: int = dkc_lib.DKC_TOP, chunk_size: int = 1024) -> np.ndarray:
  """D(u, x, v) for every user, teacher and checkpoint ([U, X, V]), chunked over users.

  `top` (50 officially) is capped by the lists' length N and the catalogue size.
  """
  u_total = know.ranks.shape[0]
  top = min(top, know.ranks.shape[-1], know.num_items)
  out = np.zeros(know.ranks.shape[:3], np.float32)
  cs = min(chunk_size, u_total)
  for start in range(0, u_total, cs):
    users = np.arange(start, start + cs) % u_total
    student_top = _student_top(params, jnp.asarray(users), jnp.asarray(tr[users]), top=top)
    d = dkc_lib.discrepancy(student_top, jnp.asarray(know.ranks[users]), top=top)
    n = min(cs, u_total - start)
    out[start:start + n] = np.asarray(d)[:n]
  return out


@dataclasses.dataclass
class DistillResult:
  """The best-validation test metrics and the training trace."""
  test: dict
  valid: dict
  best_epoch: int
  epochs_run: int
  dkc_finished_epoch: int | None
  history: list
  params: dict


def distill(split: Split, know: knowledge_lib.Knowledge, cfg: DistillConfig = DistillConfig(),
            *, progress: Callable[[str], None] | None = None,
            evaluate: bool = True) -> DistillResult:
  """Distils `know` into an MF student with HetComp or all-at-once KD (see module doc).

  Args:
    split: the data split.
    know: the sparse knowledge (`knowledge.build_knowledge`).
    cfg: the settings.
    progress: optional callback for a status string after each epoch.
    evaluate: run validation/test evaluation (False: train only, e.g. for benchmarks).
  """
  if cfg.method not in ("hetcomp", "all_at_once"):
    raise ValueError(f"method must be 'hetcomp' or 'all_at_once', got {cfg.method!r}.")
  if cfg.debias not in (None,) + debias_lib.STRATEGIES:
    raise ValueError(f"debias must be None or one of {debias_lib.STRATEGIES}, got "
                     f"{cfg.debias!r}.")
  u_total, num_x, num_v, _ = know.ranks.shape
  key = jax.random.key(cfg.seed)
  student = make_student(split.num_users, split.num_items, key, dim=cfg.dim)
  params = nnx.to_pure_dict(nnx.split(student, nnx.Param)[1])
  tx, _ = optimizer_and_epoch_fn(cfg, "a", split.num_items)
  opt_state = tx.init(params)
  tr = train_lists(split)
  bonus = (debias_lib.DEFAULT_RERANK_BONUS if cfg.debias_strength is None
           else cfg.debias_strength) if cfg.debias == "rerank" else 0.0
  strength = (debias_lib.DEFAULT_WEIGHT_STRENGTH if cfg.debias_strength is None
              else cfg.debias_strength)

  def build_const(v):
    ids, ok, d = knowledge_lib.construct(know, v, k=cfg.top_k, dissensus_bonus=bonus)
    w = (debias_lib.dissensus_weights(d, ok, strength) if cfg.debias == "weight"
         else np.ones_like(d))
    return tuple(jnp.asarray(a) for a in (ids, ok, w, know.observed, know.observed_mask, tr))

  hetcomp = cfg.method == "hetcomp"
  v = np.zeros((u_total, num_x), np.int32) if hetcomp else np.full((u_total, num_x), num_v - 1,
                                                                    np.int32)
  d0 = np.zeros((u_total, num_x), np.float32)
  const = build_const(v)
  phase = "a" if hetcomp else "b"
  epoch_fns = {}
  rng = np.random.default_rng(cfg.seed)
  dkc_calls, finished_at = 0, (None if hetcomp else 0)
  best = (-1.0, None, None, 0)
  bad, history = 0, []
  e = 0
  for e in range(1, cfg.max_epochs + 1):
    if phase not in epoch_fns:
      epoch_fns[phase] = optimizer_and_epoch_fn(cfg, phase, split.num_items)[1]
    users, umask = epoch_user_batches(split, cfg.batch_size, cfg.batching, rng)
    params, opt_state, loss = epoch_fns[phase](params, opt_state, jnp.asarray(users),
                                               jnp.asarray(umask), const)
    msg = f"epoch {e} phase {phase.upper()} loss {float(loss):.3f}"
    if hetcomp and finished_at is None and e % cfg.period == 0:
      d_all = all_discrepancies(params, know, tr)
      v_new, d0_new, _ = dkc_lib.dkc_switch(
          jnp.asarray(v), jnp.asarray(d0), jnp.asarray(d_all), e, first_call=dkc_calls == 0,
          alpha=cfg.alpha, decay=cfg.decay, period=cfg.period,
          advance_on_drift=cfg.advance_on_drift)
      dkc_calls += 1
      changed = bool(np.any(np.asarray(v_new) != v))
      v, d0 = np.asarray(v_new), np.asarray(d0_new)
      if changed:
        const = build_const(v)
      msg += f" mean v {np.round(v.mean(0), 2).tolist()}"
      if dkc_lib.dkc_finished(jnp.asarray(v), num_v):
        finished_at, phase = e, "b"
    if evaluate and e % cfg.eval_every == 0:
      scorer = student_scorer(params)
      val = metrics.evaluate(scorer, split, "valid")
      history.append({"epoch": e, "phase": phase, "valid_recall@50": val["recall@50"]})
      msg += f" valid R@50 {val['recall@50']:.4f}"
      if val["recall@50"] > best[0]:
        best = (val["recall@50"], metrics.evaluate(scorer, split, "test"), val, e)
        bad = 0
      elif finished_at is not None:
        bad += 1
    if progress is not None:
      progress(msg)
    if bad >= cfg.patience:
      break
  return DistillResult(best[1] or {}, best[2] or {}, best[3], e, finished_at, history, params)
