"""HetComp end to end on MovieLens: teachers, sparse knowledge, distillation, one results table.

  python -m experiments.hetcomp --config=experiments/configs/hetcomp.py \\
      --config.data_dir=../shared/data/ml-100k --config.out=results/hetcomp
  python -m experiments.hetcomp --config.data_dir=../shared/data/ml-100k --config.quick=True
  python -m experiments.hetcomp --config.data_dir=../shared/data/ml-100k --config.seed_list=1 \\
      --config.out=r1
  python -m experiments.hetcomp --config.merge=r0/results.json,r1/results.json --config.out=merged

The config (experiments/configs/hetcomp.py, the default) holds every option; `--workdir` is where
the teacher trajectories are saved (default: a temporary directory, removed at the end). The
ratings are read where they are (`config.data_dir`), never copied. See docs/hetcomp.md.
Restarted with the same `--workdir` after a kill, the run reuses every finished teacher
trajectory and distillation and writes the results.json of an uninterrupted run ("resume"
below); a workdir whose teachers were trained with other settings is refused.

For each seed: split (60/20/20, fixed by `config.split_seed`), train the six teachers and keep
the 4-checkpoint Orbax trajectories chosen by validation quality, evaluate them, train the
student alone (BPR, best validation epoch), build the sparse top-100 knowledge from the
restored checkpoints, evaluate the ensemble at every trajectory stage, then distil with
HetComp without its curriculum (the ablation), RRD on the converged ensemble (the ensemble-KD
baseline), HetComp, and HetComp with each of our two dissensus debiasing strategies. Prints
Recall@10/50, NDCG@10/50 and popularity lift (top-10) as mean ± standard deviation over the
seeds, then the paired differences over seeds (`PAIRS`) with 95 % t-intervals; `config.out`
names a directory for `results.json` (per-seed values, spreads and paired differences).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

from experiments import _cli

METRICS = ("recall@10", "recall@50", "ndcg@10", "ndcg@50", "popularity_lift")
TEACHER_LABELS = {"mf": "Teacher BPR-MF", "cml": "Teacher CML", "neumf": "Teacher NeuMF",
                  "lightgcn": "Teacher LightGCN", "uae": "Teacher Mult-DAE (user)",
                  "iae": "Teacher item-AE"}
STUDENT = "Student alone (BPR)"
ABLATION = "HetComp w/o curriculum (ablation)"
RRD = "RRD on the converged ensemble"
HETCOMP = "HetComp"
NUM_STAGES = 4
DISTILLED = ("ablation", "rrd", "hetcomp", "rerank", "weight")  # config.methods' names


def stage_label(v: int) -> str:
  """The row of the ensemble built from every teacher's checkpoint v."""
  return ("Ensemble (6 teachers, converged)" if v == NUM_STAGES - 1
          else f"Ensemble at trajectory stage v={v}")


# (method, baseline) pairs whose per-seed differences are reported with 95 % t-intervals.
PAIRS = ((HETCOMP, ABLATION), (HETCOMP, RRD), (HETCOMP, STUDENT), (ABLATION, STUDENT),
         (RRD, STUDENT)) + tuple((stage_label(v), STUDENT) for v in range(NUM_STAGES))
PAIRED_METRICS = ("recall@50", "ndcg@50")
RUN_KEYS = ("steps", "best_step", "best_epoch", "steps_per_epoch", "dkc_finished_step",
            "capped")

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


def _std(vals) -> float:
  return float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0


def summarize(per_seed: dict[str, list[dict]]) -> list[dict]:
  """{method: [results per seed]} -> records with the mean and spread (sample std, ddof=1).

  Each per-seed dict holds the test `METRICS`, optionally `seed`, `valid_recall@50` and the run
  counters `RUN_KEYS`; all of it is kept under `per_seed`. A method with a capped run is marked.
  """
  out = []
  for name, runs in per_seed.items():
    rec = {"method": name, "seeds": len(runs)}
    for m in METRICS:
      vals = np.asarray([r[m] for r in runs], np.float64)
      rec[m] = float(vals.mean())
      rec[f"{m}_spread"] = _std(vals)
    rec["capped"] = any(bool(r.get("capped")) for r in runs)
    rec["per_seed"] = [dict(r) for r in runs]
    out.append(rec)
  return out


def paired(records: list[dict], pairs=PAIRS, metrics=PAIRED_METRICS) -> list[dict]:
  """Per-seed differences `method - baseline` (paired by seed) with 95 % t-intervals."""
  from experiments.runner import paired_difference  # pylint: disable=g-import-not-at-top
  by_name = {r["method"]: r for r in records}
  out = []
  for a, b in pairs:
    if a not in by_name or b not in by_name:
      continue
    ra = {r.get("seed", i): r for i, r in enumerate(by_name[a]["per_seed"])}
    rb = {r.get("seed", i): r for i, r in enumerate(by_name[b]["per_seed"])}
    seeds = sorted(set(ra) & set(rb))
    if not seeds:
      continue
    row = {"method": a, "baseline": b, "seeds": seeds}
    for m in metrics:
      row[m] = paired_difference([ra[s][m] for s in seeds], [rb[s][m] for s in seeds])
    out.append(row)
  return out


def _label(r) -> str:
  return r["method"] + (" [capped]" if r.get("capped") else "")


def format_table(records: list[dict]) -> str:
  head = f"{'method':<44}" + "".join(f"{m:>20}" for m in METRICS)
  lines = [head, "-" * len(head)]
  for r in records:
    cells = []
    for m in METRICS:
      if m == "popularity_lift":
        cells.append(f"{r[m]:>11.1f} ± {r[m + '_spread']:<6.1f}")
      else:
        cells.append(f"{r[m]:>11.4f} ± {r[m + '_spread']:<6.4f}")
    lines.append(f"{_label(r):<44}" + "".join(cells))
  return "\n".join(lines)


def format_paired(rows: list[dict]) -> str:
  """The paired differences, one line per pair: mean [95 % interval] per metric."""
  head = f"{'paired difference (per seed)':<72}" + "".join(f"{m:>28}" for m in PAIRED_METRICS)
  lines = [head, "-" * len(head)]
  for r in rows:
    cells = []
    for m in PAIRED_METRICS:
      d = r[m]
      ci = d["ci95"]
      cells.append(f"{d['mean']:+.4f} [{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci
                   else f"{d['mean']:+.4f}")
    lines.append(f"{r['method'] + ' - ' + r['baseline']:<72}" + "".join(f"{c:>28}"
                                                                         for c in cells))
  return "\n".join(lines)


def _fractions(text: str) -> tuple[float, ...]:
  try:
    return tuple(float(x) for x in text.split(",") if x.strip())
  except ValueError:
    raise ConfigError(f"config.quality_fractions must be comma-separated numbers, got "
                      f"{text!r}.") from None


def distill_configs(config, seed):
  """[(row label, DistillConfig)] for one seed: the ablation, RRD, HetComp and our two
  debiasing variants (when `config.debias`)."""
  return [(label, cfg) for _, label, cfg in distill_runs(config, seed)]


def distill_runs(config, seed):
  """[(method key of `DISTILLED`, row label, DistillConfig)] for one seed (`distill_configs`)."""
  from kd_jax.recsys import distill  # pylint: disable=g-import-not-at-top
  # CPU budget (our deviation, docs/hetcomp.md): every user once per epoch in batches of 256 at
  # lr 1e-2; the schedule keeps the official step counts. official_batching=True restores the
  # official 1024-interaction batches at lr 1e-3 (`DistillConfig`'s defaults).
  base = (distill.DistillConfig(seed=seed) if config.official_batching else
          distill.DistillConfig(seed=seed, batching="users", batch_size=256, lr=1e-2))
  if config.quick:
    base = dataclasses.replace(base, period_steps=20, eval_every_steps=20, patience_steps=40,
                               max_steps=200)
  over = {k: config[k] for k in ("period_steps", "eval_every_steps", "patience_steps",
                                 "max_steps") if config[k] is not None}
  base = dataclasses.replace(base, rrd_lambda=config.rrd_lambda, rrd_k=config.rrd_k,
                             rrd_l=config.rrd_l, dim=config.student_dim, **over)
  runs = {"ablation": (ABLATION, dataclasses.replace(base, method="all_at_once")),
          "rrd": (RRD, dataclasses.replace(base, method="rrd")),
          "hetcomp": (HETCOMP, base)}
  if config.debias:
    for name in ("rerank", "weight"):
      runs[name] = (f"HetComp + dissensus {name} (ours)",
                    dataclasses.replace(base, debias=name))
  return [(k, *runs[k]) for k in _methods(config, runs)]


# ---------------------------------------------------------------------------- resume
#
# With --workdir, a restarted run reuses what a killed one finished: every teacher trajectory
# (and the student alone) is recorded in `<dir>/trajectory.json` with a checksum of its
# settings (spec, seed, trajectory rule, split) once all its checkpoints are saved; a teacher
# directory without that record is a killed training and is deleted (its Orbax steps, partial
# ones included) and trained again from its seed. A record with another checksum is refused
# (another config in the same workdir). Every finished distillation is recorded as
# `seed<s>/distill/<method>-<checksum>.json`, the checksum covering its DistillConfig and the
# teachers' records. Training is deterministic given the seeds, so a restarted run writes the
# results.json of an uninterrupted one (tests/recsys/test_hetcomp_resume.py).

TRAJECTORY_FILE = "trajectory.json"
RESUME_FORMAT = 1


def checksum(value) -> str:
  """SHA-256 of the canonical JSON of `value` (keys sorted)."""
  return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def split_checksum(split) -> str:
  """SHA-256 of a `Split`'s sizes and its train / valid / test CSR arrays."""
  h = hashlib.sha256(f"{split.num_users},{split.num_items}".encode())
  for part in ("train", "valid", "test"):
    for a in getattr(split, part):
      h.update(np.ascontiguousarray(np.asarray(a, np.int64)).tobytes())
  return h.hexdigest()


def _spec_dict(spec) -> dict:
  return {"model": spec.cls.__name__, "dim": spec.dim, "epochs": spec.epochs, "lr": spec.lr,
          "batch_size": spec.batch_size, "kwargs": [list(kv) for kv in spec.kwargs]}


def _read_record(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except ValueError as e:  # written atomically, so only a hand edit or a disk fault gets here
    raise ConfigError(f"{path} is not valid JSON ({e}); delete it to recompute that part.") \
        from None


def trained_trajectory(name: str, split, directory: str, *, settings: dict, **train_kwargs):
  """`teachers.train_teacher(name, split, directory, **train_kwargs)`, or its recorded result.

  `settings` (JSON-able: everything the trajectory depends on) is recorded with its checksum
  in `directory/trajectory.json` after the training; a later call with the same settings
  restores that record instead of training. A directory without the record (a killed run) is
  removed first. Returns (Trajectory, record).

  Raises:
    ConfigError: the record was written with other settings (naming the keys that differ).
  """
  from kd_jax.recsys import teachers  # pylint: disable=g-import-not-at-top
  settings = json.loads(json.dumps({"format": RESUME_FORMAT, "teacher": name, **settings}))
  digest = checksum(settings)
  path = os.path.join(directory, TRAJECTORY_FILE)
  if os.path.exists(path):
    rec = _read_record(path)
    if rec.get("checksum") != digest:
      old = rec.get("settings", {})
      diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
      shown = "; ".join(f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in diff[:4])
      raise ConfigError(
          f"workdir holds teacher {name!r} at {directory} trained with other settings "
          f"({shown}); use another --workdir, or delete that directory to retrain it.")
    saved = teachers.saved_epochs(directory)
    if all(e in saved for e in rec["epochs"]):
      return teachers.Trajectory(name, os.path.abspath(directory), list(rec["epochs"]),
                                 rec.get("valid_recall")), rec
    os.remove(path)  # its checkpoints are gone: train it again
  if os.path.exists(directory):  # a killed training: its steps, finished or partial, go
    shutil.rmtree(directory)
  traj = teachers.train_teacher(name, split, directory, **train_kwargs)
  rec = {"checksum": digest, "settings": settings, "epochs": list(traj.epochs),
         "valid_recall": traj.valid_recall}
  _cli.write_json(path, rec)
  return traj, rec


def recorded_distillation(directory: str, key: str, settings: dict, compute):
  """`compute()` (a JSON-able result), or the one recorded for `key` and `settings` in
  `directory/<key>-<checksum>.json` by an earlier (killed) run."""
  settings = json.loads(json.dumps({"format": RESUME_FORMAT, "method": key, **settings},
                                   default=str))
  digest = checksum(settings)
  path = os.path.join(directory, f"{key}-{digest[:16]}.json")
  if os.path.exists(path):
    rec = _read_record(path)
    if rec.get("checksum") == digest:
      return rec["result"]
  result = compute()
  os.makedirs(directory, exist_ok=True)
  _cli.write_json(path, {"checksum": digest, "settings": settings, "result": result})
  return result


def _methods(config, runs) -> list[str]:
  """The keys of `runs` named by `config.methods` ("": all), in the table's order."""
  if not config.methods:
    return list(runs)
  names = [m.strip() for m in config.methods.split(",") if m.strip()]
  unknown = [m for m in names if m not in DISTILLED]
  if unknown:
    raise ConfigError(f"config.methods: unknown {unknown}; choose from {', '.join(DISTILLED)}")
  missing = [m for m in names if m not in runs]
  if missing:
    raise ConfigError(f"config.methods {missing} need config.debias=True")
  return [k for k in runs if k in names]


def stage_scorer(know, v: int):
  """The ensemble at trajectory stage v as a scorer: its top-100 items ranked, the rest last."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from kd_jax.recsys import knowledge  # pylint: disable=g-import-not-at-top
  u_total = know.ranks.shape[0]
  ids, ok, _ = knowledge.construct(know, np.full(know.ranks.shape[:2], v, np.int32))
  scores = np.full((u_total, know.num_items), -1e9, np.float32)
  rows = np.repeat(np.arange(u_total)[:, None], ids.shape[1], 1)
  scores[rows[ok], ids[ok]] = -np.broadcast_to(np.arange(ids.shape[1]), ids.shape)[ok]
  table = jnp.asarray(scores)
  return lambda u: table[jnp.asarray(u)]


def run_seed(inter, seed, workdir, config, bar):
  """Every method for one seed: {row label: test metrics, valid Recall@50 and run counters}."""
  from kd_jax.recsys import data, distill, knowledge, metrics, student, teachers

  def note(msg):
    bar.set_postfix_str(f"seed {seed}: {msg}"[:70], refresh=False)
    bar.refresh()

  def measure(scorer, **extra):
    out = metrics.evaluate(scorer, split, "test")
    out["valid_recall@50"] = metrics.evaluate(scorer, split, "valid", ks=(50,))["recall@50"]
    return dict(out, seed=seed, **extra)

  try:
    split = data.split_per_user(inter, seed=config.split_seed)
  except ValueError as e:  # e.g. no user left: name the data that was read
    raise ConfigError(f"config.data_dir {config.data_dir!r}: {e}") from None
  ctx = teachers.make_context(split)
  specs = dict(teachers.DEFAULT_SPECS)
  if config.quick:
    specs = {k: dataclasses.replace(s, epochs=max(4, s.epochs // 8)) for k, s in specs.items()}
  fractions = _fractions(config.quality_fractions)
  split_id = split_checksum(split)
  results, scorers, trajectories, records = {}, [], {}, {}
  for name in teachers.TEACHER_NAMES:
    traj, records[name] = trained_trajectory(
        name, split, os.path.join(workdir, f"seed{seed}", name),
        settings={"spec": _spec_dict(specs[name]), "seed": seed, "select": config.trajectory,
                  "fractions": list(fractions), "split": split_id},
        seed=seed, spec=specs[name], ctx=ctx, progress=note, select=config.trajectory,
        fractions=fractions)
    models = [teachers.restore_teacher(name, split, traj.directory, e, spec=specs[name])
              for e in traj.epochs]
    scorers.append([teachers.score_fn(m, ctx) for m in models])
    trajectories[name] = traj.epochs
    results[TEACHER_LABELS[name]] = measure(scorers[-1][-1], trajectory_epochs=traj.epochs)
    bar.update(1)

  # Student alone: BPR on MF(config.student_dim); its best validation epoch is reported.
  note("student alone (BPR)")
  bspec = student.bpr_student_spec(dim=config.student_dim, epochs=8 if config.quick else 64)
  traj, _ = trained_trajectory(
      "mf", split, os.path.join(workdir, f"seed{seed}", "student"),
      settings={"spec": _spec_dict(bspec), "seed": seed, "select": "validation",
                "fractions": [0.5], "split": split_id},
      seed=seed, spec=bspec, ctx=ctx, progress=note, select="validation", fractions=(0.5,))
  best = teachers.restore_teacher("mf", split, traj.directory, traj.epochs[-1], spec=bspec)
  results[STUDENT] = measure(teachers.score_fn(best, ctx), best_epoch=traj.epochs[-1])
  bar.update(1)

  note("building knowledge")
  know = knowledge.build_knowledge(scorers, split, top_n=100)
  for v in range(NUM_STAGES):
    results[stage_label(v)] = measure(stage_scorer(know, v))
  bar.update(1)

  # The knowledge is a function of the teachers' records (each covers the split and the seed).
  know_id = checksum({"teachers": {n: r["checksum"] for n, r in records.items()},
                      "epochs": {n: r["epochs"] for n, r in records.items()}, "top_n": 100})

  def distilled(label, cfg):
    res = distill.distill(split, know, cfg, progress=lambda m, l=label: note(f"{l}: {m}"))
    spe = max(res.steps_per_epoch, 1)
    out = dict(res.test, seed=seed, steps=res.steps_run, best_step=res.best_step,
               best_epoch=round(res.best_step / spe, 1), steps_per_epoch=spe,
               dkc_finished_step=res.dkc_finished_step, capped=res.capped,
               **{"valid_recall@50": res.valid.get("recall@50")})
    if res.dkc_trace:
      out["dkc_trace"] = res.dkc_trace
    return json.loads(json.dumps(out, default=_json_default))

  for key, label, cfg in distill_runs(config, seed):
    results[label] = recorded_distillation(
        os.path.join(workdir, f"seed{seed}", "distill"), key,
        {"label": label, "config": dataclasses.asdict(cfg), "knowledge": know_id},
        lambda label=label, cfg=cfg: distilled(label, cfg))
    bar.update(1)
  return results


def _json_default(x):
  """numpy scalars and arrays in a result as plain JSON numbers and lists."""
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  raise TypeError(f"{type(x).__name__} is not JSON serializable")


def _collect(per_seed, order, res):
  for k, v in res.items():
    if k not in per_seed:
      order.append(k)
      per_seed[k] = []
    per_seed[k].append(v)


def merge(paths, out=None, replace=False):
  """Combines results.json files into one table (per-seed values kept).

  Files may overlap: a method's record for a seed that an earlier file already gave is dropped
  when it is equal (runs of one seed share their teachers, student alone and ensembles bit for
  bit, e.g. a `config.methods` run beside a full one). When it differs (two settings of one
  method under one label, which would be averaged as if they were seeds) it is a `ConfigError`,
  or, with `replace`, the later file's record replaces the earlier one and the replacement is
  printed (e.g. an RRD row rerun at another weight).
  """
  per_seed, order, seen = {}, [], {}
  for path in paths:
    with open(path) as f:
      blob = json.load(f)
    for r in blob["records"]:
      if r["method"] not in per_seed:
        order.append(r["method"])
        per_seed[r["method"]] = []
      for rec in r.get("per_seed") or [{m: r[m] for m in METRICS}]:
        key = (r["method"], rec.get("seed"))
        if key[1] is not None and key in seen:
          if seen[key][0] == rec:
            continue
          if not replace:
            raise ConfigError(f"config.merge: {r['method']!r} seed {key[1]} differs between "
                              f"{seen[key][1]} and {path} (different settings under one "
                              f"label; config.merge_replace=True keeps the later file's)")
          print(f"replaced: {r['method']} seed {key[1]} from {seen[key][1]} by {path}")
          rows = per_seed[r["method"]]
          rows[rows.index(seen[key][0])] = rec
        else:
          per_seed[r["method"]].append(rec)
        seen[key] = (rec, path)
  records = summarize({k: per_seed[k] for k in order})
  pairs = paired(records)
  n = records[0]["seeds"]
  print(f"merged {len(paths)} file(s): test metrics, mean ± std over {n} seed(s)")
  print(format_table(records))
  if pairs:
    print(format_paired(pairs))
  if out:
    _write(out, n, False, None, records, pairs)
  return records


def run(config, workdir: str = ""):
  """The whole experiment for one config (experiments/configs/hetcomp.py): the records printed.

  `workdir` holds the teacher trajectories ("": a temporary directory). Raises `ConfigError` (a
  `ValueError`) for a missing or unreadable `config.data_dir`.
  """
  if config.merge:
    return merge([p for p in config.merge.split(",") if p], config.out or None,
                 replace=config.merge_replace)
  if not config.data_dir:
    raise ConfigError("config.data_dir is required (a directory with u.data / ratings.csv / "
                     "ratings.dat, e.g. --config.data_dir=../shared/data/ml-100k)")
  _fractions(config.quality_fractions)
  if config.student_dim < 1:
    raise ConfigError(f"config.student_dim must be >= 1, got {config.student_dim}")
  inter = _load(config.data_dir)
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  seed_ids = ([int(x) for x in config.seed_list.split(",")] if config.seed_list
              else list(range(1 if config.quick else config.seeds)))
  seeds = len(seed_ids)
  stages = len(TEACHER_LABELS) + 2 + len(distill_configs(config, 0))
  order, per_seed = [], {}
  t0 = time.time()
  from kd_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as tmp, workdir_lib.lock(workdir or tmp):
    workdir = workdir or tmp  # locked: no second run writes the same trajectories
    with tqdm(total=seeds * stages, desc="hetcomp", file=sys.stderr) as bar:
      for done, seed in enumerate(seed_ids):
        res = run_seed(inter, seed, workdir, config, bar)
        _collect(per_seed, order, res)
        bar.write(f"seed {seed} done ({(time.time() - t0) / 60:.1f} min):\n"
                  + format_table(summarize({k: [res[k]] for k in res})))
        if config.out:  # partial results after every seed
          recs = summarize({k: per_seed[k] for k in order})
          _write(config.out, done + 1, config.quick, time.time() - t0, recs, paired(recs))
  records = summarize({k: per_seed[k] for k in order})
  pairs = paired(records)
  elapsed = time.time() - t0
  print(f"\nHetComp on {os.path.basename(os.path.normpath(config.data_dir))}: test metrics, "
        f"mean ± std over {seeds} seed(s); popularity lift of the top-10 in %")
  print(format_table(records))
  if seeds > 1:
    print(format_paired(pairs))
  print(f"total time {elapsed / 60:.1f} min")
  if config.out:
    _write(config.out, seeds, config.quick, elapsed, records, pairs)
  return records


def _write(out, seeds, quick, seconds, records, pairs=()):
  os.makedirs(out, exist_ok=True)
  _cli.write_json(os.path.join(out, "results.json"),
                  {"seeds": seeds, "quick": quick, "seconds": seconds,
                   "spread": "sample standard deviation over seeds (ddof=1)",
                   "records": records, "paired": list(pairs)})


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
  _cli.precheck(_DEFAULT_CONFIG)
  _define_flags()
  _cli.run(main, _DEFAULT_CONFIG)  # errors: one line, `--verbose` for the traceback
