"""HetComp end to end on MovieLens: teachers, sparse knowledge, distillation, one results table.

  python -m experiments.hetcomp --config=experiments/configs/hetcomp.py \\
      --config.data_dir=../shared/data/ml-100k --config.out=results/hetcomp
  python -m experiments.hetcomp --config.data_dir=../shared/data/ml-100k --config.quick=True
  python -m experiments.hetcomp --config.merge=r0/results.json,r1/results.json --config.out=merged

The config (experiments/configs/hetcomp.py, the default) holds every option; `--workdir` is where
the teacher trajectories are saved (default: a temporary directory, removed at the end). The
ratings are read where they are (`config.data_dir`), never copied. See docs/hetcomp.md.

For each seed: split (60/20/20, seeded), train the six teachers saving 4-checkpoint Orbax
trajectories, evaluate them, train the student alone (BPR), build the sparse top-100 knowledge from
the restored checkpoints, evaluate the ensemble, then distil with all-at-once ensemble KD, HetComp,
and HetComp with each of our two dissensus debiasing strategies. Prints Recall@10/50, NDCG@10/50
and popularity lift (top-10) as mean +- standard deviation over the seeds; `config.out` names a
directory for `results.json` (one record per method, each metric with its spread).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
import time

import numpy as np

METRICS = ("recall@10", "recall@50", "ndcg@10", "ndcg@50", "popularity_lift")
TEACHER_LABELS = {"mf": "Teacher BPR-MF", "cml": "Teacher CML", "neumf": "Teacher NeuMF",
                  "lightgcn": "Teacher LightGCN", "uae": "Teacher Mult-DAE (user)",
                  "iae": "Teacher item-AE"}


_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs",
                               "hetcomp.py")


class ConfigError(ValueError):
  """A missing or unreadable `config.data_dir` (the command line prints it without a trace)."""


def _load(path):
  """The GroupLens interactions at `path`; a bad path is a `ConfigError` naming the field."""
  from kd_jax.recsys import data  # pylint: disable=g-import-not-at-top
  try:
    return data.read_grouplens(path)
  except ValueError as e:
    raise ConfigError(f"config.data_dir: {e}") from None


def summarize(per_seed: dict[str, list[dict]]) -> list[dict]:
  """{method: [metrics per seed]} -> records with mean and spread (std over seeds, ddof=0)."""
  out = []
  for name, runs in per_seed.items():
    rec = {"method": name, "seeds": len(runs)}
    for m in METRICS:
      vals = np.asarray([r[m] for r in runs], np.float64)
      rec[m] = float(vals.mean())
      rec[f"{m}_spread"] = float(vals.std())
    rec["per_seed"] = [{m: float(r[m]) for m in METRICS} for r in runs]
    out.append(rec)
  return out


def format_table(records: list[dict]) -> str:
  head = f"{'method':<36}" + "".join(f"{m:>20}" for m in METRICS)
  lines = [head, "-" * len(head)]
  for r in records:
    cells = []
    for m in METRICS:
      if m == "popularity_lift":
        cells.append(f"{r[m]:>11.1f} ± {r[m + '_spread']:<6.1f}")
      else:
        cells.append(f"{r[m]:>11.4f} ± {r[m + '_spread']:<6.4f}")
    lines.append(f"{r['method']:<36}" + "".join(cells))
  return "\n".join(lines)


def run_seed(inter, seed, workdir, config, bar):
  """Every method for one seed: {method name: test metrics}."""
  import jax.numpy as jnp
  from kd_jax.recsys import data, distill, knowledge, metrics, student, teachers

  def note(msg):
    bar.set_postfix_str(f"seed {seed}: {msg}"[:70], refresh=False)
    bar.refresh()

  try:
    split = data.split_per_user(inter, seed=config.split_seed)
  except ValueError as e:  # e.g. no user left: name the data that was read
    raise ConfigError(f"config.data_dir {config.data_dir!r}: {e}") from None
  ctx = teachers.make_context(split)
  specs = dict(teachers.DEFAULT_SPECS)
  if config.quick:
    specs = {k: dataclasses.replace(s, epochs=max(4, s.epochs // 8)) for k, s in specs.items()}
  results = {}
  scorers = []
  for name in teachers.TEACHER_NAMES:
    traj = teachers.train_teacher(name, split, os.path.join(workdir, f"seed{seed}", name),
                                  seed=seed, spec=specs[name], ctx=ctx, progress=note)
    models = [teachers.restore_teacher(name, split, traj.directory, e, spec=specs[name])
              for e in traj.epochs]
    scorers.append([teachers.score_fn(m, ctx) for m in models])
    results[TEACHER_LABELS[name]] = metrics.evaluate(scorers[-1][-1], split, "test")
    bar.update(1)

  # Student alone: BPR on MF(dim 6); its best-validation checkpoint is reported.
  note("student alone (BPR)")
  bspec = student.bpr_student_spec(epochs=8 if config.quick else 64)
  traj = teachers.train_teacher("mf", split, os.path.join(workdir, f"seed{seed}", "student"),
                                seed=seed, spec=bspec, ctx=ctx, progress=note)
  best = None
  for e in traj.epochs:
    sc = teachers.score_fn(teachers.restore_teacher("mf", split, traj.directory, e, spec=bspec),
                           ctx)
    val = metrics.evaluate(sc, split, "valid")["recall@50"]
    if best is None or val > best[0]:
      best = (val, sc)
  results["Student alone (BPR)"] = metrics.evaluate(best[1], split, "test")
  bar.update(1)

  note("building knowledge")
  know = knowledge.build_knowledge(scorers, split, top_n=100)
  ids, ok, _ = knowledge.construct(know, np.full(know.ranks.shape[:2], 3, np.int32))
  ens_scores = np.full((split.num_users, split.num_items), -1e9, np.float32)
  rows = np.repeat(np.arange(split.num_users)[:, None], ids.shape[1], 1)
  ens_scores[rows[ok], ids[ok]] = -np.broadcast_to(np.arange(ids.shape[1]), ids.shape)[ok]
  ens = jnp.asarray(ens_scores)
  results["Ensemble (6 teachers)"] = metrics.evaluate(lambda u: ens[jnp.asarray(u)], split,
                                                      "test")
  bar.update(1)

  # CPU budget (our deviation, docs/hetcomp.md): every user once per epoch in batches of 256,
  # lr 1e-2, DKC and evaluation every 5 epochs. official_batching=True restores the official
  # code's 1024-interaction batches at lr 1e-3 (`DistillConfig`'s defaults).
  base = distill.DistillConfig(seed=seed, batching="users", batch_size=256, lr=1e-2, period=5,
                               eval_every=5, max_epochs=300)
  if config.official_batching:
    base = distill.DistillConfig(seed=seed)
  if config.quick:
    base = dataclasses.replace(base, max_epochs=20, period=2, eval_every=2, patience=3)
  if config.max_epochs is not None:
    base = dataclasses.replace(base, max_epochs=config.max_epochs)
  if config.period is not None:
    base = dataclasses.replace(base, period=config.period)
  runs = [("All-at-once ensemble KD", dataclasses.replace(base, method="all_at_once")),
          ("HetComp", base),
          ("HetComp + dissensus rerank (ours)", dataclasses.replace(base, debias="rerank")),
          ("HetComp + dissensus weight (ours)", dataclasses.replace(base, debias="weight"))]
  for label, cfg in runs:
    res = distill.distill(split, know, cfg, progress=lambda m, l=label: note(f"{l}: {m}"))
    results[label] = dict(res.test, epochs=res.epochs_run, best_epoch=res.best_epoch,
                          dkc_finished=res.dkc_finished_epoch)
    bar.update(1)
  return results


def merge(paths, out=None):
  """Combines results.json files of disjoint seeds into one table (per-seed values kept)."""
  per_seed, order = {}, []
  for path in paths:
    with open(path) as f:
      blob = json.load(f)
    for r in blob["records"]:
      runs = r.get("per_seed") or [{m: r[m] for m in METRICS}]
      if r["method"] not in per_seed:
        order.append(r["method"])
        per_seed[r["method"]] = []
      per_seed[r["method"]].extend(runs)
  records = summarize({k: per_seed[k] for k in order})
  n = records[0]["seeds"]
  print(f"merged {len(paths)} file(s): test metrics, mean ± std over {n} seed(s)")
  print(format_table(records))
  if out:
    _write(out, n, False, None, records)
  return records


def run(config, workdir: str = ""):
  """The whole experiment for one config (experiments/configs/hetcomp.py): the records printed.

  `workdir` holds the teacher trajectories ("": a temporary directory). Raises `ConfigError` (a
  `ValueError`) for a missing or unreadable `config.data_dir`.
  """
  if config.merge:
    return merge([p for p in config.merge.split(",") if p], config.out or None)
  if not config.data_dir:
    raise ConfigError("config.data_dir is required (a directory with u.data / ratings.csv / "
                     "ratings.dat, e.g. --config.data_dir=../shared/data/ml-100k)")
  inter = _load(config.data_dir)
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  seed_ids = ([int(x) for x in config.seed_list.split(",")] if config.seed_list
              else list(range(1 if config.quick else config.seeds)))
  seeds = len(seed_ids)
  stages = len(TEACHER_LABELS) + 2 + 4
  order, per_seed, extra = [], {}, {}
  t0 = time.time()
  from kd_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as tmp, workdir_lib.lock(workdir or tmp):
    workdir = workdir or tmp  # locked: no second run writes the same trajectories
    with tqdm(total=seeds * stages, desc="hetcomp", file=sys.stderr) as bar:
      for done, seed in enumerate(seed_ids):
        res = run_seed(inter, seed, workdir, config, bar)
        for k, v in res.items():
          if k not in per_seed:
            order.append(k)
            per_seed[k] = []
          per_seed[k].append(v)
          if "epochs" in v:
            extra.setdefault(k, []).append({x: v[x] for x in ("epochs", "best_epoch",
                                                               "dkc_finished")})
        bar.write(f"seed {seed} done ({(time.time() - t0) / 60:.1f} min):\n"
                  + format_table(summarize({k: [res[k]] for k in res})))
        if config.out:  # partial results after every seed
          _write(config.out, done + 1, config.quick, time.time() - t0,
                 summarize({k: per_seed[k] for k in order}))
  records = summarize({k: per_seed[k] for k in order})
  for r in records:
    if r["method"] in extra:
      r["runs"] = extra[r["method"]]
  elapsed = time.time() - t0
  print(f"\nHetComp on {os.path.basename(os.path.normpath(config.data_dir))}: test metrics, "
        f"mean ± std over {seeds} seed(s); popularity lift of the top-10 in %")
  print(format_table(records))
  print(f"total time {elapsed / 60:.1f} min")
  if config.out:
    _write(config.out, seeds, config.quick, elapsed, records)
  return records


def _write(out, seeds, quick, seconds, records):
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump({"seeds": seeds, "quick": quick, "seconds": seconds,
               "spread": "standard deviation over seeds (ddof=0)", "records": records}, f,
              indent=2)


def _define_flags():
  """--config (an ml_collections file, `--config.key=value` overrides) and --workdir.

  Defined only when run as a program, so that importing this module (the tests do) leaves the
  global absl flags alone.
  """
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("workdir", "", "Where the teacher trajectories are saved (Orbax "
                      "checkpoints); default: a temporary directory, removed at the end.")
  config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "A HetComp config "
                                  "(experiments/configs/hetcomp.py).", lock_config=True)


def main(argv):
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  run(flags.FLAGS.config, flags.FLAGS.workdir)
  return 0


if __name__ == "__main__":
  from experiments import _cli  # pylint: disable=g-import-not-at-top
  _cli.precheck(_DEFAULT_CONFIG)
  _define_flags()
  _cli.run(main, _DEFAULT_CONFIG)  # errors: one line, `--verbose` for the traceback
