"""Six heterogeneous recommender teachers in JAX, each saving a trajectory of Orbax checkpoints.

HetComp's teachers are named `MF, ML, DL, GNN, AE, I-AE` in `SeongKu-Kang/HetComp_WWW23:
main.py` (docs/hetcomp.md). Ours::

  mf       BPR matrix factorisation (Rendle et al., 2009), BPR loss.
  cml      collaborative metric learning (Hsieh et al., 2017): score -||u - i||^2, hinge loss,
           embeddings projected into the unit ball after every step.
  neumf    NeuMF (He et al., 2017): GMF + MLP towers, pointwise binary cross-entropy.
  lightgcn LightGCN (He et al., 2020): 2 propagation layers over the normalised bipartite graph,
           layer mean, BPR loss.
  uae      user-side Mult-DAE (Liang et al., 2018): dropout on the user's row, tanh bottleneck,
           multinomial log-likelihood.
  iae      item-side denoising autoencoder (I-AutoRec style, Sedhain et al., 2015): each item's
           column over users is reconstructed with a binary cross-entropy; score(u, i) is item
           i's reconstruction of user u.

Trajectory rule (ours; the official code loads precomputed trajectories and the paper's rule
was not available to us, docs/hetcomp.md). `select="validation"` (the default): the teacher's
validation Recall@50 is measured after every epoch; v = 3 is the best epoch (the converged
model) and v = 0, 1, 2 are the earliest epochs whose validation Recall@50 reaches
`QUALITY_FRACTIONS` = 80 %, 90 % and 95 % of that best (`select_trajectory`), so every teacher's
trajectory climbs the same quality ladder whatever its learning speed. `select="epochs"`: the
fixed epochs ceil(E / 8), ceil(E / 4), ceil(E / 2) and E (`trajectory_epochs`). Models are Flax NNX modules used functionally (nnx.split /
nnx.merge); a whole epoch runs as one jitted `lax.scan`. The teachers take a dense train matrix
as context, so they are meant for catalogues that fit in memory (ML-100k / ML-1M); the knowledge
they produce (`knowledge.py`) is sparse and scales.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from kd_jax.recsys import metrics
from kd_jax.recsys.data import Split

TEACHER_NAMES = ("mf", "cml", "neumf", "lightgcn", "uae", "iae")


def _normal(key, shape, std):
  return nnx.Param(std * jax.random.normal(key, shape, jnp.float32))


def bpr_loss(pos, neg):
  """-mean log sigmoid(s_pos - s_neg) (Rendle et al., 2009)."""
  return -jnp.mean(jax.nn.log_sigmoid(pos - neg))


class MF(nnx.Module):
  """Matrix factorisation: score(u, i) = <e_u, e_i>. Also the HetComp student."""
  batch_kind = "pairs"

  def __init__(self, num_users, num_items, dim, *, rngs: nnx.Rngs, init_std=0.1, l2=1e-4):
    self.user = _normal(rngs.params(), (num_users, dim), init_std)
    self.item = _normal(rngs.params(), (num_items, dim), init_std)
    self.l2 = l2

  def scores(self, users, ctx=None):
    return self.user[...][users] @ self.item[...].T

  def loss(self, batch, ctx, key):
    u, i, j = batch
    eu, ei, ej = self.user[...][u], self.item[...][i], self.item[...][j]
    reg = self.l2 * jnp.mean(jnp.sum(eu**2 + ei**2 + ej**2, -1))
    return bpr_loss(jnp.sum(eu * ei, -1), jnp.sum(eu * ej, -1)) + reg


class CML(nnx.Module):
  """Collaborative metric learning: score = -||u - i||^2, hinge with `margin`, unit-ball norms."""
  batch_kind = "pairs"

  def __init__(self, num_users, num_items, dim, *, rngs: nnx.Rngs, margin=0.5):
    self.user = _normal(rngs.params(), (num_users, dim), 1.0 / math.sqrt(dim))
    self.item = _normal(rngs.params(), (num_items, dim), 1.0 / math.sqrt(dim))
    self.margin = margin

  def scores(self, users, ctx=None):
    eu, ei = self.user[...][users], self.item[...]
    return -(jnp.sum(eu**2, -1, keepdims=True) - 2 * eu @ ei.T + jnp.sum(ei**2, -1)[None])

  def loss(self, batch, ctx, key):
    u, i, j = batch
    eu, ei, ej = self.user[...][u], self.item[...][i], self.item[...][j]
    dp, dn = jnp.sum((eu - ei) ** 2, -1), jnp.sum((eu - ej) ** 2, -1)
    return jnp.mean(jax.nn.relu(self.margin + dp - dn))

  def constrain(self):
    for p in (self.user, self.item):
      x = p[...]
      p[...] = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1.0)


class NeuMF(nnx.Module):
  """NeuMF: GMF tower (elementwise product) + MLP tower on [e_u; e_i], fused by a linear layer."""
  batch_kind = "pairs"

  def __init__(self, num_users, num_items, dim, *, rngs: nnx.Rngs, hidden=(64, 32)):
    self.gmf_user = _normal(rngs.params(), (num_users, dim), 0.1)
    self.gmf_item = _normal(rngs.params(), (num_items, dim), 0.1)
    self.mlp_user = _normal(rngs.params(), (num_users, dim), 0.1)
    self.mlp_item = _normal(rngs.params(), (num_items, dim), 0.1)
    self.first_user = nnx.Linear(dim, hidden[0], rngs=rngs)
    self.first_item = nnx.Linear(dim, hidden[0], use_bias=False, rngs=rngs)
    self.second = nnx.Linear(hidden[0], hidden[1], rngs=rngs)
    self.out = nnx.Linear(dim + hidden[1], 1, rngs=rngs)

  def _pair_scores(self, hu, hi, gu, gi):
    # hu/gu broadcast against hi/gi; the first MLP layer is split into a user and an item half
    # so that scoring all items never materialises the concatenated [B, I, 2 dim] input.
    h = jax.nn.relu(hu + hi)
    h = jax.nn.relu(self.second(h))
    return self.out(jnp.concatenate([jnp.broadcast_to(gu * gi, h.shape[:-1] + gu.shape[-1:]),
                                     h], -1))[..., 0]

  def scores(self, users, ctx=None):
    hu = self.first_user(self.mlp_user[...][users])[:, None]
    hi = self.first_item(self.mlp_item[...])[None]
    return self._pair_scores(hu, hi, self.gmf_user[...][users][:, None], self.gmf_item[...][None])

  def loss(self, batch, ctx, key):
    u, i, j = batch
    hu = self.first_user(self.mlp_user[...][u])
    gu = self.gmf_user[...][u]
    sp = self._pair_scores(hu, self.first_item(self.mlp_item[...][i]), gu, self.gmf_item[...][i])
    sn = self._pair_scores(hu, self.first_item(self.mlp_item[...][j]), gu, self.gmf_item[...][j])
    return -jnp.mean(jax.nn.log_sigmoid(sp) + jax.nn.log_sigmoid(-sn))


class LightGCN(nnx.Module):
  """LightGCN: E^{l+1} = D^{-1/2} A D^{-1/2} E^l over the user-item graph; final = layer mean."""
  batch_kind = "pairs"

  def __init__(self, num_users, num_items, dim, *, rngs: nnx.Rngs, layers=2, l2=1e-4):
    self.user = _normal(rngs.params(), (num_users, dim), 0.1)
    self.item = _normal(rngs.params(), (num_items, dim), 0.1)
    self.layers, self.l2 = layers, l2

  def propagate(self, ctx):
    # Dense normalised adjacency D_u^{-1/2} R D_i^{-1/2} ([U, I]): two matmuls per layer are far
    # faster on CPU than edge scatters for catalogues that fit in memory.
    eu, ei = self.user[...], self.item[...]
    adj = ctx["adj_norm"]
    acc_u, acc_i = eu, ei
    for _ in range(self.layers):
      eu, ei = adj @ ei, adj.T @ eu
      acc_u, acc_i = acc_u + eu, acc_i + ei
    return acc_u / (self.layers + 1), acc_i / (self.layers + 1)

  def scores(self, users, ctx=None):
    eu, ei = self.propagate(ctx)
    return eu[users] @ ei.T

  def loss(self, batch, ctx, key):
    u, i, j = batch
    eu, ei = self.propagate(ctx)
    reg = self.l2 * jnp.mean(jnp.sum(self.user[...][u] ** 2 + self.item[...][i] ** 2
                                     + self.item[...][j] ** 2, -1))
    return bpr_loss(jnp.sum(eu[u] * ei[i], -1), jnp.sum(eu[u] * ei[j], -1)) + reg


class UserAE(nnx.Module):
  """Mult-DAE: logits = W2 tanh(W1 dropout(x_u / ||x_u||)); multinomial log-likelihood."""
  batch_kind = "users"

  def __init__(self, num_users, num_items, dim, *, rngs: nnx.Rngs, dropout=0.5, l2=1e-5):
    self.enc = nnx.Linear(num_items, dim, rngs=rngs)
    self.dec = nnx.Linear(dim, num_items, rngs=rngs)
    self.dropout, self.l2 = dropout, l2

  def _logits(self, x, key=None):
    x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    if key is not None:
      keep = jax.random.bernoulli(key, 1.0 - self.dropout, x.shape)
      x = jnp.where(keep, x / (1.0 - self.dropout), 0.0)
    return self.dec(jnp.tanh(self.enc(x)))

  def scores(self, users, ctx=None):
    return self._logits(ctx["train"][users])

  def loss(self, batch, ctx, key):
    x = ctx["train"][batch]
    ll = jnp.sum(jax.nn.log_softmax(self._logits(x, key), -1) * x, -1)
    reg = self.l2 * (jnp.sum(self.enc.kernel[...] ** 2) + jnp.sum(self.dec.kernel[...] ** 2))
    return -jnp.mean(ll) + reg


class ItemAE(nnx.Module):
  """Item-side denoising autoencoder: each item's column over users, binary cross-entropy."""
  batch_kind = "items"

  def __init__(self, num_users, num_items, dim, *, rngs: nnx.Rngs, dropout=0.2, l2=1e-5):
    self.enc = nnx.Linear(num_users, dim, rngs=rngs)
    self.dec = nnx.Linear(dim, num_users, rngs=rngs)
    self.dropout, self.l2 = dropout, l2

  def _logits(self, x, key=None):
    if key is not None:
      keep = jax.random.bernoulli(key, 1.0 - self.dropout, x.shape)
      x = jnp.where(keep, x / (1.0 - self.dropout), 0.0)
    return self.dec(jax.nn.sigmoid(self.enc(x)))

  def scores(self, users, ctx=None):
    return self._logits(ctx["train"].T).T[users]

  def loss(self, batch, ctx, key):
    x = ctx["train"].T[batch]
    logits = self._logits(x, key)
    bce = -(x * jax.nn.log_sigmoid(logits) + (1 - x) * jax.nn.log_sigmoid(-logits))
    reg = self.l2 * (jnp.sum(self.enc.kernel[...] ** 2) + jnp.sum(self.dec.kernel[...] ** 2))
    return jnp.mean(jnp.sum(bce, -1)) / 100.0 + reg


@dataclasses.dataclass(frozen=True)
class TeacherSpec:
  """How one teacher is built and trained (ML-100k defaults, tuned for a CPU budget)."""
  cls: type
  dim: int
  epochs: int
  lr: float
  batch_size: int
  kwargs: tuple = ()


DEFAULT_SPECS = {
    "mf": TeacherSpec(MF, 64, 16, 5e-3, 1024),
    "cml": TeacherSpec(CML, 64, 40, 2e-3, 1024),
    "neumf": TeacherSpec(NeuMF, 32, 16, 2e-3, 1024, (("hidden", (32, 16)),)),
    "lightgcn": TeacherSpec(LightGCN, 64, 20, 1e-2, 4096),
    "uae": TeacherSpec(UserAE, 200, 60, 1e-3, 128),
    "iae": TeacherSpec(ItemAE, 200, 120, 1e-3, 128),
}


def trajectory_epochs(epochs: int, num_checkpoints: int = 4) -> list[int]:
  """Our rule: checkpoint v (0-based) at epoch ceil(E * 2^{v - V + 1}); the last is E."""
  out = []
  for v in range(num_checkpoints):
    e = max(1, math.ceil(epochs * 2.0 ** (v - num_checkpoints + 1)))
    out.append(max(e, out[-1] + 1) if out else e)
  if out[-1] > epochs:
    raise ValueError(f"{epochs} epochs cannot hold {num_checkpoints} distinct checkpoints.")
  return out


QUALITY_FRACTIONS = (0.8, 0.9, 0.95)


def select_trajectory(valid_recall, fractions=QUALITY_FRACTIONS) -> list[int]:
  """Our validation-quality rule: the 1-based epochs of checkpoints v = 0..len(fractions).

  With r_e the validation Recall@50 after epoch e and r* = max_e r_e: the last checkpoint is the
  first epoch reaching r*; checkpoint v < len(fractions) is the earliest epoch after checkpoint
  v - 1 with r_e >= fractions[v] * r*, moved earlier if needed so that every later checkpoint
  still gets its own epoch. Each chosen epoch improves on every epoch before it.

  Args:
    valid_recall: r_e for e = 1..E.
    fractions: the increasing quality levels of the early checkpoints (each < 1).

  Raises:
    ValueError: fewer than len(fractions) + 1 epochs improve on all earlier ones.
  """
  r = np.asarray(valid_recall, np.float64)
  if list(fractions) != sorted(fractions) or not all(0 < f < 1 for f in fractions):
    raise ValueError(f"fractions must increase within (0, 1), got {tuple(fractions)}.")
  best = float(r.max()) if r.size else 0.0
  cands = [e for e in range(len(r)) if r[e] > (r[:e].max() if e else -np.inf)]
  num_v = len(fractions) + 1
  if len(cands) < num_v:
    raise ValueError(f"{len(cands)} of {len(r)} epochs improve the validation Recall@50 "
                     f"({np.round(r, 4).tolist()}); {num_v} checkpoints need at least {num_v}.")
  out, lo = [], 0
  for v, f in enumerate(fractions):
    hi = len(cands) - (num_v - v)  # leave one candidate for each later checkpoint
    idx = next((i for i in range(lo, hi + 1) if r[cands[i]] >= f * best), hi)
    out.append(cands[idx] + 1)
    lo = idx + 1
  return out + [cands[-1] + 1]


def make_context(split: Split) -> dict[str, jax.Array]:
  """The dense train matrix and its normalised adjacency D_u^-1/2 R D_i^-1/2 (teachers' input)."""
  users, items = split.pairs("train")
  du = np.maximum(split.counts("train"), 1).astype(np.float32)
  di = np.maximum(np.bincount(items, minlength=split.num_items), 1).astype(np.float32)
  train = np.zeros((split.num_users, split.num_items), np.float32)
  train[users, items] = 1.0
  adj = train / np.sqrt(du)[:, None] / np.sqrt(di)[None, :]
  return {"train": jnp.asarray(train), "adj_norm": jnp.asarray(adj)}


def build_teacher(name: str, split: Split, key, spec: TeacherSpec | None = None):
  """A freshly initialised teacher `name` (one of TEACHER_NAMES) for `split`'s catalogue."""
  if name not in DEFAULT_SPECS:
    raise ValueError(f"Unknown teacher {name!r}; expected one of {TEACHER_NAMES}.")
  spec = spec or DEFAULT_SPECS[name]
  return spec.cls(split.num_users, split.num_items, spec.dim,
                  rngs=nnx.Rngs(params=key, default=key), **dict(spec.kwargs))


def _epoch_batches(kind, split, batch_size, rng):
  """Index batches for one epoch as a [steps, batch] array (the remainder is dropped)."""
  if kind == "pairs":
    u, i = split.pairs("train")
    n = len(u)
    perm = rng.permutation(n)
    steps = max(n // batch_size, 1)
    idx = perm[:steps * batch_size].reshape(steps, -1) if n >= batch_size else perm[None]
    return (u[idx], i[idx])
  n = split.num_users if kind == "users" else split.num_items
  perm = rng.permutation(n)
  steps = max(n // batch_size, 1)
  return perm[:steps * batch_size].reshape(steps, -1) if n >= batch_size else perm[None]


_EPOCH_CACHE: dict = {}


def make_epoch_fn(model, tx, num_items):
  """A jitted epoch: lax.scan of (sample negatives, grad, Adam, constrain) over the batches."""
  graphdef, params = nnx.split(model, nnx.Param)

  def step(ctx, carry, batch):
    params, opt_state, key = carry
    key, k_neg, k_drop = jax.random.split(key, 3)

    def loss_fn(p):
      m = nnx.merge(graphdef, p)
      b = batch
      if m.batch_kind == "pairs":
        u, i = batch
        j = jax.random.randint(k_neg, u.shape, 0, num_items)
        # one rejection round: re-draw negatives that hit a training item
        j2 = jax.random.randint(jax.random.fold_in(k_neg, 1), u.shape, 0, num_items)
        j = jnp.where(ctx["train"][u, j] > 0, j2, j)
        b = (u, i, j)
      return m.loss(b, ctx, k_drop)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    m = nnx.merge(graphdef, params)
    if hasattr(m, "constrain"):
      m.constrain()
      params = nnx.split(m, nnx.Param)[1]
    return (params, opt_state, key), loss

  @jax.jit
  def epoch(params, opt_state, key, batches, ctx):
    (params, opt_state, key), losses = jax.lax.scan(
        lambda c, b: step(ctx, c, b), (params, opt_state, key), batches)
    return params, opt_state, jnp.mean(losses)

  return graphdef, params, epoch


def _manager(directory):
  return ocp.CheckpointManager(
      os.path.abspath(directory),
      options=ocp.CheckpointManagerOptions(max_to_keep=None, create=True,
                                           enable_async_checkpointing=False))


@dataclasses.dataclass
class Trajectory:
  """A trained teacher's checkpoint trajectory: where it lives and which epochs it holds.

  `valid_recall` is the validation Recall@50 after every epoch (None with `select="epochs"`).
  """
  name: str
  directory: str
  epochs: list[int]
  valid_recall: list[float] | None = None


def train_teacher(name: str, split: Split, directory: str, *, seed: int = 0,
                  spec: TeacherSpec | None = None, ctx=None,
                  progress: Callable[[str], None] | None = None, select: str = "validation",
                  fractions=QUALITY_FRACTIONS, keep_candidates: bool = False) -> Trajectory:
  """Trains teacher `name` and saves its 4-checkpoint trajectory with Orbax in `directory`.

  Args:
    name: one of TEACHER_NAMES.
    split: the data split (teachers train on `train`; `select="validation"` also reads `valid`).
    directory: where the Orbax checkpoints go (one step per saved epoch).
    seed: initialisation, batching and negative-sampling seed.
    spec: overrides DEFAULT_SPECS[name] (dim, epochs, lr, batch size).
    ctx: `make_context(split)` (built if omitted).
    progress: optional callback given a short status string after each epoch.
    select: "validation" (`select_trajectory` over the validation Recall@50 of every epoch; the
      epochs that improve on all earlier ones are saved while training, the others never) or
      "epochs" (`trajectory_epochs`).
    fractions: the quality levels of the early checkpoints for `select="validation"`.
    keep_candidates: keep every saved improving epoch (to re-select with other fractions)
      instead of deleting the unselected ones.
  """
  if select not in ("validation", "epochs"):
    raise ValueError(f"select must be 'validation' or 'epochs', got {select!r}.")
  spec = spec or DEFAULT_SPECS[name]
  ctx = ctx if ctx is not None else make_context(split)
  key = jax.random.key(seed)
  model = build_teacher(name, split, jax.random.fold_in(key, 0), spec)
  cache_key = (name, spec, split.num_users, split.num_items)
  if cache_key not in _EPOCH_CACHE:  # seeds share one compilation
    tx = optax.adam(spec.lr)
    _EPOCH_CACHE[cache_key] = (tx, make_epoch_fn(model, tx, split.num_items)[2])
  tx, epoch_fn = _EPOCH_CACHE[cache_key]
  params = nnx.split(model, nnx.Param)[1]
  opt_state = tx.init(params)
  by_val = select == "validation"
  save_at = None if by_val else trajectory_epochs(spec.epochs)
  graphdef = nnx.split(model, nnx.Param)[0]
  rng = np.random.default_rng(seed)
  mgr = _manager(directory)
  curve, best = [], -np.inf
  for e in range(1, spec.epochs + 1):
    batches = _epoch_batches(model.batch_kind, split, spec.batch_size, rng)
    params, opt_state, loss = epoch_fn(params, opt_state, jax.random.fold_in(key, e),
                                       jax.tree.map(jnp.asarray, batches), ctx)
    msg = f"{name} epoch {e}/{spec.epochs} loss {float(loss):.4f}"
    save = not by_val and e in save_at
    if by_val:
      scorer = score_fn(nnx.merge(graphdef, params), ctx)
      curve.append(metrics.evaluate(scorer, split, "valid", ks=(50,))["recall@50"])
      save = curve[-1] > best  # only an improving epoch can be selected
      best = max(best, curve[-1])
      msg += f" valid R@50 {curve[-1]:.4f}"
    if save:
      mgr.save(e, args=ocp.args.StandardSave(nnx.to_pure_dict(params)))
    if progress is not None:
      progress(msg)
  mgr.wait_until_finished()
  if by_val:
    save_at = select_trajectory(curve, fractions)
    if not keep_candidates:
      for step in mgr.all_steps():
        if step not in save_at:
          mgr.delete(step)
  mgr.close()
  return Trajectory(name, os.path.abspath(directory), save_at,
                    [float(x) for x in curve] if by_val else None)


def saved_epochs(directory: str) -> list[int]:
  """The epochs whose checkpoints are saved (finalized) in the trajectory `directory`."""
  if not os.path.isdir(directory):
    return []
  mgr = _manager(directory)
  try:
    return sorted(mgr.all_steps())
  finally:
    mgr.close()


def restore_teacher(name: str, split: Split, directory: str, epoch: int, *,
                    spec: TeacherSpec | None = None):
  """Restores teacher `name` at a saved `epoch` of its trajectory (Orbax, abstract target)."""
  model = build_teacher(name, split, jax.random.key(0), spec)
  graphdef, params = nnx.split(model, nnx.Param)
  mgr = _manager(directory)
  if epoch not in mgr.all_steps():
    raise ValueError(f"No checkpoint for epoch {epoch} in {directory!r}; "
                     f"saved epochs: {sorted(mgr.all_steps())}.")
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, nnx.to_pure_dict(params))
  restored = mgr.restore(epoch, args=ocp.args.StandardRestore(abstract))
  mgr.close()
  nnx.replace_by_pure_dict(params, restored)
  return nnx.merge(graphdef, params)


@functools.partial(jax.jit, static_argnums=0)
def _scores(graphdef, state, users, ctx):
  return nnx.merge(graphdef, state).scores(users, ctx)


def score_fn(model, ctx):
  """A jitted `users -> [B, num_items]` scorer for `metrics.evaluate` / knowledge building.

  Compiled once per model structure (the graph definition is static), so every checkpoint of
  a trajectory shares one compilation.
  """
  graphdef, state = nnx.split(model)
  return lambda users: _scores(graphdef, state, jnp.asarray(users), ctx)
