"""HetComp at catalogue scale: sparse knowledge, DKC and one distillation epoch, peak memory.

    python -m benchmarks.hetcomp_scale                      # 100k users x 50k items
    python -m benchmarks.hetcomp_scale --users=20000 --items=10000

Builds a synthetic catalogue (default 100k users x 50k items, 10 training items per user) with
top-100 knowledge from 6 teachers x 4 checkpoints ([U, 6, 4, 100] int32 = 960 MB at full
size; a dense importance matrix per teacher and checkpoint would be 24 x U x I x 4 bytes =
480 GB), then times: constructing T_u for every user (sort-based sparse ensemble), one DKC call
(the student's top-50 for every user, D for all 24 lists, the switch, rebuilding T_u), and one
epoch of phase-A distillation (and optionally phase B). Prints the time of each stage and the
peak resident memory (resource.getrusage maxrss).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np


def _peak_gib() -> float:
  kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
  return kb / 2**20


def synthetic(users, items, *, teachers=6, checkpoints=4, top_n=100, pool=300,
              train_per_user=10, seed=0, chunk=2000):
  """Knowledge lists drawn from a per-user candidate pool (so teachers overlap), and a
  disjoint set of training items per user, without any users x items array."""
  from kd_jax.recsys import data, knowledge
  rng = np.random.default_rng(seed)
  perm = rng.permutation(items).astype(np.int32)  # item "identity" shuffle
  stride = 7
  if stride * pool + 13 * train_per_user + 10 >= items:
    raise ValueError(f"--items={items} is too small for pools of {pool} items.")
  ranks = np.empty((users, teachers, checkpoints, top_n), np.int32)
  train = np.empty((users, train_per_user), np.int32)
  for s in range(0, users, chunk):
    c = min(chunk, users - s)
    base = rng.integers(0, items, size=(c, 1))
    pool_ids = (base + np.arange(pool) * stride) % items
    pick = np.argsort(rng.random((c, teachers * checkpoints, pool), dtype=np.float32),
                      axis=-1)[..., :top_n]
    lists = np.take_along_axis(pool_ids[:, None, :], pick, -1)
    ranks[s:s + c] = perm[lists].reshape(c, teachers, checkpoints, top_n)
    tr = (base + stride * pool + 13 * np.arange(train_per_user)) % items
    train[s:s + c] = perm[tr]
  indptr = np.arange(0, (users + 1) * train_per_user, train_per_user, dtype=np.int64)
  empty = (np.zeros(users + 1, np.int64), np.zeros(0, np.int32))
  split = data.Split(users, items, (indptr, train.reshape(-1)), empty, empty)
  know = knowledge.Knowledge(ranks, train[:, :10].copy(), np.ones((users, 10), bool), items)
  return split, know, train


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--users", type=int, default=100_000)
  p.add_argument("--items", type=int, default=50_000)
  p.add_argument("--batch_users", type=int, default=1024, help="users per distillation step")
  p.add_argument("--phase_b", action="store_true", help="also time one phase-B epoch")
  args = p.parse_args(argv)

  from kd_jax.recsys import distill, dkc, knowledge
  from kd_jax.recsys.student import make_student
  from flax import nnx

  print(f"devices: {jax.devices()}  users={args.users} items={args.items}", flush=True)
  times = {}
  t = time.perf_counter()
  split, know, train = synthetic(args.users, args.items)
  times["synthetic data"] = time.perf_counter() - t
  print(f"knowledge: {know.ranks.shape} int32 = {know.nbytes / 2**30:.2f} GiB "
        f"(dense importance would be {24 * args.users * args.items * 4 / 2**30:.0f} GiB)",
        flush=True)

  u_total, num_x, num_v, _ = know.ranks.shape
  v = np.zeros((u_total, num_x), np.int32)
  t = time.perf_counter()
  ids, ok, dis = knowledge.construct(know, v, k=100)
  times["construct T_u (all users)"] = time.perf_counter() - t
  print(f"construct: {times['construct T_u (all users)']:.1f} s, peak {_peak_gib():.2f} GiB",
        flush=True)

  cfg = distill.DistillConfig(batching="users", batch_size=args.batch_users)
  student = make_student(u_total, args.items, jax.random.key(0), dim=cfg.dim)
  params = nnx.to_pure_dict(nnx.split(student, nnx.Param)[1])
  tr = train
  tx, _ = distill.optimizer_and_chunk_fn(cfg, "a", args.items)
  opt_state = tx.init(params)
  rng = np.random.default_rng(0)

  def one_epoch(phase, params, opt_state, ids, ok, dis):
    fn = distill.optimizer_and_chunk_fn(cfg, phase, args.items)[1]
    const = tuple(jnp.asarray(a) for a in (ids, ok, np.ones_like(dis), know.observed,
                                           know.observed_mask, tr))
    users, umask = distill.epoch_user_batches(split, cfg.batch_size, "users", rng)
    t = time.perf_counter()
    params, opt_state, _, loss = fn(params, opt_state, jax.random.key(0), jnp.asarray(users),
                                    jnp.asarray(umask), const)
    loss = float(loss)
    key = f"distill epoch phase {phase.upper()} ({users.shape[0]} steps x {users.shape[1]} users)"
    times[key] = time.perf_counter() - t
    print(f"{key}: {times[key]:.1f} s (incl. compile), loss {loss:.3f}, "
          f"peak {_peak_gib():.2f} GiB", flush=True)
    if not np.isfinite(loss):
      sys.exit("non-finite loss")
    return params, opt_state

  # DKC call 1 (records D0), one phase-A epoch, DKC call 2 (switches) and the rebuild of T_u.
  t = time.perf_counter()
  d_all = distill.all_discrepancies(params, know, tr, chunk_size=args.batch_users)
  _, d0, _ = dkc.dkc_switch(jnp.asarray(v), jnp.zeros(v.shape), jnp.asarray(d_all), 10,
                            first_call=True)
  times["DKC call 1 (student top-50 + D for 24 lists)"] = time.perf_counter() - t
  params, opt_state = one_epoch("a", params, opt_state, ids, ok, dis)
  t = time.perf_counter()
  d_all = distill.all_discrepancies(params, know, tr, chunk_size=args.batch_users)
  new_v, _, adv = dkc.dkc_switch(jnp.asarray(v), d0, jnp.asarray(d_all), 20, first_call=False)
  ids, ok, dis = knowledge.construct(know, np.asarray(new_v), k=100)
  times["DKC call 2 + rebuild T_u"] = time.perf_counter() - t
  print(f"DKC: {float(jnp.mean(adv)):.2f} of (user, teacher) pairs advanced, "
        f"peak {_peak_gib():.2f} GiB", flush=True)
  if args.phase_b:
    params, opt_state = one_epoch("b", params, opt_state, ids, ok, dis)

  print("\nstage                                              seconds")
  for k, s in times.items():
    print(f"{k:<50} {s:8.1f}")
  peak = _peak_gib()
  print(f"peak resident memory (maxrss): {peak:.2f} GiB  [{'OK' if peak < 8 else 'OVER'} "
        f"the 8 GiB budget]")


if __name__ == "__main__":
  main()
