"""Distilling the ensemble knowledge into the MF student: HetComp, its ablation and RRD.

`SeongKu-Kang/HetComp_WWW23: main.py` (docs/hetcomp.md). The student walks over the training
interactions in batches of 1024 (shuffled, epoch after epoch); a step updates the unique users
of its batch (padded to a static size with a user mask), so heavy users are updated more often,
as in the official loop (`batching="users"`: every user once per epoch instead). The step is a
masked phase-A or phase-B loss summed over users (lambda_A = 0.01, lambda_B = 0.005),
Adam(1e-3) with coupled L2 1e-5 (`add_decayed_weights` before Adam, as PyTorch's
`weight_decay`). A block of steps is one jitted `lax.scan`.

The schedule is counted in optimizer steps (the official loop's epochs of ~60 steps on
ML-100k-sized data: DKC every p = 10 epochs ~ 600 steps, evaluation every 10 epochs, patience 5
evaluations ~ 3000 steps). HetComp: knowledge starts at checkpoint 0 for every (user, teacher);
every `period_steps` steps DKC (dkc.py) advances pairs and T_u is rebuilt; phase A is used until
DKC has finished, then phase B. `all_at_once` (HetComp without its curriculum, an ablation): T_u
from the converged checkpoints from the start, phase B throughout. `rrd` (the ensemble-KD
baseline, DE-RRD, CIKM 2020): BPR on the training interactions plus `rrd_lambda` x the relaxed
ranking loss (`losses.rrd_loss`) of the converged ensemble's top `rrd_k` items (no sampling of
the top items, as in HetComp's comparison) over `rrd_l` uninteresting items drawn uniformly,
with replacement, at every step from the unobserved items outside T_u. Validation Recall@50
every `eval_every_steps` steps; test metrics at the best validation point; training stops once
`patience_steps` steps have passed without a better validation point since the final phase
started, or at `max_steps` (a safety cap, None = none; a run that reaches it is `capped`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
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

METHODS = ("hetcomp", "all_at_once", "rrd")


@dataclasses.dataclass(frozen=True)
class DistillConfig:
  """The distillation settings (defaults: the official code's, with its epochs as steps)."""
  method: str = "hetcomp"  # 'hetcomp' | 'all_at_once' (ablation) | 'rrd' (baseline)
  debias: str | None = None  # None | 'rerank' | 'weight'
  debias_strength: float | None = None  # beta for 'rerank', gamma for 'weight'
  dim: int = STUDENT_DIM
  lr: float = 1e-3
  weight_decay: float = 1e-5
  lambda_a: float = 0.01
  lambda_b: float = 0.005
  batch_size: int = 1024
  batching: str = "interactions"  # official; 'users': every user once per epoch
  period_steps: int = 600  # DKC period p, in optimizer steps
  eval_every_steps: int = 600
  patience_steps: int = 3000
  max_steps: int | None = None  # safety cap; a run that reaches it is reported as capped
  alpha: float = 1.05
  decay: float = 0.995  # official; 1.0 = paper-level rule
  advance_on_drift: bool = True  # the official 'ratio < 1' branch
  top_k: int = 100
  clip: float = 40.0
  rrd_k: int = 40  # RRD: interesting items (the ensemble's top rrd_k)
  rrd_l: int = 40  # RRD: uninteresting items sampled per user and step
  rrd_lambda: float = 0.1  # RRD: weight of the RRD term next to BPR
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


class BatchStream:
  """User batches step after step, epoch after epoch (`epoch_user_batches`, reshuffled each
  epoch): `take(n)` returns the next n steps' [n, Bu] ids and masks."""

  def __init__(self, split: Split, batch_size: int, batching: str, rng):
    self._args = (split, batch_size, batching, rng)
    self._ids = self._mask = None
    self.steps_per_epoch = 0

  def take(self, n: int):
    while self._ids is None or len(self._ids) < n:
      ids, mask = epoch_user_batches(*self._args)
      self.steps_per_epoch = len(ids)
      self._ids = ids if self._ids is None else np.concatenate([self._ids, ids])
      self._mask = mask if self._mask is None else np.concatenate([self._mask, mask])
    out = self._ids[:n], self._mask[:n]
    self._ids, self._mask = self._ids[n:], self._mask[n:]
    return out


def uniform_from(key, pool, n: int):
  """n draws per row, uniform with replacement over the True entries of `pool` ([B, I] bool).

  Returns ([B, n] int32 ids, [B] bool: the row's pool is non-empty). The r-th True entry is found
  with a binary search in the row's running count, so nothing of size [B, n, I] is formed.
  """
  counts = jnp.cumsum(pool.astype(jnp.int32), axis=-1)
  total = counts[:, -1]
  r = jnp.floor(jax.random.uniform(key, (pool.shape[0], n)) * total[:, None]).astype(jnp.int32)
  r = jnp.clip(r, 0, jnp.maximum(total - 1, 0)[:, None])
  ids = jax.vmap(lambda c, q: jnp.searchsorted(c, q, side="right"))(counts, r)
  return jnp.minimum(ids, pool.shape[-1] - 1).astype(jnp.int32), total > 0


def rejection_negatives(key, train, n: int, rounds: int = 4):
  """n uniform draws per row from the items outside `train` ([B, I] bool) by rejection.

  Every draw that hits a training item is redrawn, `rounds` times in all; the [B, n] bool mask
  is False where a draw is still a training item (probability `(|O_u| / I) ** rounds`).
  """
  b, num_items = train.shape
  rows = jnp.arange(b)[:, None]
  ids = jnp.zeros((b, n), jnp.int32)
  bad = jnp.ones((b, n), bool)
  for k in jax.random.split(key, rounds):
    ids = jnp.where(bad, jax.random.randint(k, (b, n), 0, num_items), ids)
    bad = train[rows, ids]
  return ids, ~bad


_CACHE: dict = {}


def optimizer_and_chunk_fn(cfg: DistillConfig, phase: str, num_items: int):
  """(tx, chunk_fn) for `cfg`, cached so that runs differing only in seed, method, debiasing or
  schedule share one compilation."""
  key = (dataclasses.replace(cfg, seed=0, method="hetcomp", debias=None, debias_strength=None,
                             max_steps=None, patience_steps=0, period_steps=0,
                             eval_every_steps=0), phase, num_items)
  if key not in _CACHE:
    tx = optax.chain(optax.add_decayed_weights(cfg.weight_decay), optax.adam(cfg.lr))
    _CACHE[key] = (tx, make_chunk_fn(tx, phase=phase, cfg=cfg, num_items=num_items))
  return _CACHE[key]


def _train_mask(users, tr, num_items):
  rows = jnp.broadcast_to(jnp.arange(users.shape[0])[:, None], tr.shape)
  return jnp.zeros((users.shape[0], num_items), bool).at[rows, jnp.maximum(tr, 0)].max(tr >= 0)


def _rrd_objective(cfg: DistillConfig, num_items: int):
  """BPR over the batch users' training items + rrd_lambda x sum_u RRD(u) (method 'rrd')."""
  k = min(cfg.rrd_k, cfg.top_k)

  def objective(p, const, users, umask, key):
    t_ids, t_ok, _, _, _, tr = (a[users] for a in const)
    s = mf_scores(p, users).astype(jnp.float32)
    train = _train_mask(users, tr, num_items)
    k_neg, k_un = jax.random.split(key)
    # BPR: every training item of a batch user against one uniform unobserved item
    neg, neg_ok = rejection_negatives(k_neg, train, tr.shape[1])
    pos_ok = (tr >= 0) & umask[:, None] & neg_ok
    diff = jnp.take_along_axis(s, jnp.maximum(tr, 0), 1) - jnp.take_along_axis(s, neg, 1)
    bpr = -jnp.sum(jnp.where(pos_ok, jax.nn.log_sigmoid(diff), 0.0))
    # RRD: the ensemble's top-k over items drawn from the unobserved items outside T_u
    in_t = losses._membership(t_ids, t_ok, num_items)  # pylint: disable=protected-access
    unint, has = uniform_from(k_un, ~train & ~in_t, cfg.rrd_l)
    rrd = losses.rrd_loss(jnp.take_along_axis(s, t_ids[:, :k], 1),
                          jnp.take_along_axis(s, unint, 1), interesting_mask=t_ok[:, :k],
                          uninteresting_mask=jnp.broadcast_to(has[:, None], unint.shape),
                          where=umask)
    return bpr + cfg.rrd_lambda * jnp.sum(rrd)

  return objective


def make_chunk_fn(tx, *, phase: str, cfg: DistillConfig, num_items: int):
  """A jitted block of steps over [S, Bu] user batches: phase 'a', 'b' or 'rrd'."""
  if phase == "rrd":
    objective = _rrd_objective(cfg, num_items)
  else:
    if phase == "a":
      loss_fn = losses.hetcomp_phase_a_loss
    else:
      long = min(50, cfg.top_k)  # T^(50) and T^(10); capped for short knowledge lists
      loss_fn = functools.partial(losses.hetcomp_phase_b_loss, long=long, short=min(10, long))
    lam = cfg.lambda_a if phase == "a" else cfg.lambda_b

    def objective(p, const, users, umask, key):
      del key
      t_ids, t_ok, t_w, p_ids, p_ok, tr = (a[users] for a in const)
      s = mf_scores(p, users)
      per_user = loss_fn(s, _train_mask(users, tr, num_items), t_ids, t_ok & umask[:, None],
                         p_ids, p_ok & umask[:, None], topk_weights=t_w, clip=cfg.clip,
                         where=umask)
      return lam * jnp.sum(per_user)

  def step(const, carry, batch):
    params, opt_state, key = carry
    users, umask = batch
    key, sub = jax.random.split(key)
    loss, grads = jax.value_and_grad(objective)(params, const, users, umask, sub)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state, key), loss

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def chunk(params, opt_state, key, users, umask, const):
    (params, opt_state, key), l = jax.lax.scan(lambda c, b: step(const, c, b),
                                               (params, opt_state, key), (users, umask))
    return params, opt_state, key, jnp.mean(l)

  return chunk


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
  """The best-validation test metrics and the training trace (all counts in optimizer steps).

  `capped`: the run reached `max_steps` before its patience ran out. `dkc_trace`: after every
  DKC call, the step and each teacher's mean checkpoint index over users.
  """
  test: dict
  valid: dict
  best_step: int
  steps_run: int
  dkc_finished_step: int | None
  capped: bool
  steps_per_epoch: int
  history: list
  dkc_trace: list
  params: dict


def _positive(cfg: DistillConfig, *names):
  for n in names:
    if not (isinstance(getattr(cfg, n), int) and getattr(cfg, n) > 0):
      raise ValueError(f"DistillConfig.{n} must be a positive int (optimizer steps), got "
                       f"{getattr(cfg, n)!r}.")


def distill(split: Split, know: knowledge_lib.Knowledge, cfg: DistillConfig = DistillConfig(),
            *, progress: Callable[[str], None] | None = None,
            evaluate: bool = True) -> DistillResult:
  """Distils `know` into an MF student with HetComp, its no-curriculum ablation or RRD.

  See the module docstring for the three methods and the step-counted schedule.

  Args:
    split: the data split.
    know: the sparse knowledge (`knowledge.build_knowledge`).
    cfg: the settings.
    progress: optional callback for a status string after each block of steps.
    evaluate: run validation/test evaluation (False: train only for `cfg.max_steps` steps,
      e.g. for benchmarks).
  """
  if cfg.method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {cfg.method!r}.")
  if cfg.debias not in (None,) + debias_lib.STRATEGIES:
    raise ValueError(f"debias must be None or one of {debias_lib.STRATEGIES}, got "
                     f"{cfg.debias!r}.")
  if cfg.debias is not None and cfg.method == "rrd":
    raise ValueError("debias applies to HetComp's losses, not to method='rrd'.")
  _positive(cfg, "period_steps", "eval_every_steps", "patience_steps")
  if cfg.max_steps is not None:
    _positive(cfg, "max_steps")
  elif not evaluate:
    raise ValueError("evaluate=False needs DistillConfig.max_steps (nothing else stops it).")
  elif cfg.method == "hetcomp" and cfg.decay >= 1.0 and not cfg.advance_on_drift:
    raise ValueError("With decay >= 1 and advance_on_drift=False DKC may never finish (its "
                     "threshold never falls below 1): set DistillConfig.max_steps.")
  u_total, num_x, num_v, _ = know.ranks.shape
  key = jax.random.key(cfg.seed)
  student = make_student(split.num_users, split.num_items, key, dim=cfg.dim)
  params = nnx.to_pure_dict(nnx.split(student, nnx.Param)[1])
  hetcomp = cfg.method == "hetcomp"
  phase = {"hetcomp": "a", "all_at_once": "b", "rrd": "rrd"}[cfg.method]
  tx, _ = optimizer_and_chunk_fn(cfg, phase, split.num_items)
  opt_state = tx.init(params)
  sample_key = jax.random.fold_in(key, 1)
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

  v = np.zeros((u_total, num_x), np.int32) if hetcomp else np.full((u_total, num_x), num_v - 1,
                                                                    np.int32)
  d0 = np.zeros((u_total, num_x), np.float32)
  const = build_const(v)
  chunk_fns = {}
  stream = BatchStream(split, cfg.batch_size, cfg.batching, np.random.default_rng(cfg.seed))
  block = math.gcd(cfg.period_steps, cfg.eval_every_steps) if hetcomp else cfg.eval_every_steps
  dkc_calls, finished_at = 0, (None if hetcomp else 0)
  best = (-1.0, None, None, 0)
  history, dkc_trace = [], []
  step, capped = 0, False
  while True:
    n = block if cfg.max_steps is None else min(block, cfg.max_steps - step)
    if n <= 0:
      capped = evaluate
      break
    if phase not in chunk_fns:
      chunk_fns[phase] = optimizer_and_chunk_fn(cfg, phase, split.num_items)[1]
    users, umask = stream.take(n)
    params, opt_state, sample_key, loss = chunk_fns[phase](
        params, opt_state, sample_key, jnp.asarray(users), jnp.asarray(umask), const)
    step += n
    msg = f"step {step} phase {phase.upper()} loss {float(loss):.3f}"
    if hetcomp and finished_at is None and step % cfg.period_steps == 0:
      d_all = all_discrepancies(params, know, tr)
      v_new, d0_new, _ = dkc_lib.dkc_switch(
          jnp.asarray(v), jnp.asarray(d0), jnp.asarray(d_all), step, first_call=dkc_calls == 0,
          alpha=cfg.alpha, decay=cfg.decay, period=cfg.period_steps,
          advance_on_drift=cfg.advance_on_drift)
      dkc_calls += 1
      changed = bool(np.any(np.asarray(v_new) != v))
      v, d0 = np.asarray(v_new), np.asarray(d0_new)
      if changed:
        const = build_const(v)
      dkc_trace.append({"step": step, "mean_v": [round(float(x), 3) for x in v.mean(0)]})
      msg += f" mean v {np.round(v.mean(0), 2).tolist()}"
      if dkc_lib.dkc_finished(jnp.asarray(v), num_v):
        finished_at, phase = step, "b"
    if evaluate and step % cfg.eval_every_steps == 0:
      scorer = student_scorer(params)
      val = metrics.evaluate(scorer, split, "valid")
      history.append({"step": step, "phase": phase, "valid_recall@50": val["recall@50"]})
      msg += f" valid R@50 {val['recall@50']:.4f}"
      if val["recall@50"] > best[0]:
        best = (val["recall@50"], metrics.evaluate(scorer, split, "test"), val, step)
      if progress is not None:
        progress(msg)
      if finished_at is not None and step - max(best[3], finished_at) >= cfg.patience_steps:
        break
    elif progress is not None:
      progress(msg)
  return DistillResult(best[1] or {}, best[2] or {}, best[3], step, finished_at, capped,
                       stream.steps_per_epoch, history, dkc_trace, params)
