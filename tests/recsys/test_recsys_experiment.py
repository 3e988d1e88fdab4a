"""The HetComp experiment's entry point: config defaults, clear data-path errors, the table."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from experiments import hetcomp
from experiments.configs import hetcomp as hetcomp_config

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_config_defaults_and_the_runs_they_give():
  c = hetcomp_config.get_config()
  want = {"data_dir": "", "out": "", "seeds": 5, "seed_list": "", "merge": "",
          "merge_replace": False, "quick": False, "period_steps": None,
          "eval_every_steps": None, "patience_steps": None, "max_steps": None,
          "trajectory": "validation", "quality_fractions": "0.8,0.9,0.95",
          "rrd_lambda": 1.0, "rrd_k": 40, "rrd_l": 40, "student_dim": 6, "methods": "",
          "debias": True, "split_seed": 0, "official_batching": False}
  assert c.to_dict() == want
  runs = dict(hetcomp.distill_configs(c, seed=3))
  assert list(runs)[:3] == [hetcomp.ABLATION, hetcomp.RRD, hetcomp.HETCOMP] and len(runs) == 5
  assert runs[hetcomp.ABLATION].method == "all_at_once" and runs[hetcomp.RRD].method == "rrd"
  het = runs[hetcomp.HETCOMP]
  # the official loop's epochs as steps; no cap by default
  assert (het.period_steps, het.eval_every_steps, het.patience_steps, het.max_steps) == (
      600, 600, 3000, None)
  assert het.seed == 3 and het.batching == "users" and het.lr == 1e-2
  c.max_steps, c.debias = 9000, False
  runs = dict(hetcomp.distill_configs(c, seed=0))
  assert len(runs) == 3 and all(r.max_steps == 9000 for r in runs.values())
  assert all(r.dim == 6 for r in runs.values())


def test_a_subset_of_the_distilled_rows_and_the_student_size():
  c = hetcomp_config.get_config()
  c.methods, c.student_dim = "hetcomp, rrd", 2
  runs = hetcomp.distill_configs(c, seed=0)
  assert [label for label, _ in runs] == [hetcomp.RRD, hetcomp.HETCOMP]  # the table's order
  assert all(cfg.dim == 2 for _, cfg in runs)
  c.methods = "hetcomp,rrdd"
  with pytest.raises(hetcomp.ConfigError, match=r"unknown \['rrdd'\]"):
    hetcomp.distill_configs(c, seed=0)
  c.methods, c.debias = "weight", False
  with pytest.raises(hetcomp.ConfigError, match="need config.debias=True"):
    hetcomp.distill_configs(c, seed=0)


def test_missing_or_malformed_data_path_is_a_clear_error(tmp_path):
  c = hetcomp_config.get_config()
  with pytest.raises(ValueError, match="config.data_dir is required"):
    hetcomp.run(c)
  c.data_dir = str(tmp_path / "missing")
  with pytest.raises(ValueError, match="config.data_dir: .*does not exist"):
    hetcomp.run(c)
  (tmp_path / "u.data").write_text("1\t2\tfive\t0\n")
  c.data_dir = str(tmp_path)
  with pytest.raises(ValueError, match="Malformed GroupLens line 1"):
    hetcomp.run(c)


def _cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "experiments.hetcomp", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300, check=False)


def test_command_line_flags(tmp_path):
  proc = _cli("--config=experiments/configs/hetcomp.py",
              f"--config.data_dir={tmp_path / 'missing'}", f"--workdir={tmp_path / 'w'}")
  assert proc.returncode == 1, proc.stderr
  assert "error: config.data_dir: " in proc.stderr and "does not exist" in proc.stderr
  assert "Traceback" not in proc.stderr
  proc = _cli("--data=../shared/data/ml-100k")  # the former flag is gone
  assert proc.returncode != 0 and "data" in proc.stderr
  # --config.merge runs without data: two one-seed files give the two-seed table.
  for i, v in enumerate((0.1, 0.3)):
    hetcomp._write(str(tmp_path / f"r{i}"), 1, False, 1.0,
                   hetcomp.summarize({"A": [dict.fromkeys(hetcomp.METRICS, v)]}))
  proc = _cli("--config.merge=" + ",".join(str(tmp_path / f"r{i}" / "results.json")
                                           for i in range(2)),
              f"--config.out={tmp_path / 'm'}")
  assert proc.returncode == 0, proc.stderr
  assert "merged 2 file(s)" in proc.stdout and "± 0.1414" in proc.stdout
  blob = json.loads((tmp_path / "m" / "results.json").read_text())
  assert blob["records"][0]["seeds"] == 2
  assert blob["records"][0]["recall@10"] == pytest.approx(0.2)


def test_summary_spread_and_merge(tmp_path):
  runs = {"A": [dict.fromkeys(hetcomp.METRICS, v) for v in (0.1, 0.3)]}
  (rec,) = hetcomp.summarize(runs)
  assert rec["recall@10"] == pytest.approx(0.2)
  assert rec["recall@10_spread"] == pytest.approx(np.std([0.1, 0.3], ddof=1))
  assert "± 0.1414" in hetcomp.format_table([rec])
  for i, part in enumerate(([runs["A"][0]], [runs["A"][1]])):
    hetcomp._write(str(tmp_path / f"r{i}"), 1, False, 1.0, hetcomp.summarize({"A": part}))
  merged = hetcomp.merge([str(tmp_path / f"r{i}" / "results.json") for i in range(2)],
                         str(tmp_path / "m"))
  assert merged[0]["ndcg@50_spread"] == pytest.approx(rec["ndcg@50_spread"])
  blob = json.load(open(tmp_path / "m" / "results.json"))
  assert blob["records"][0]["seeds"] == 2
  assert set(hetcomp.METRICS) <= set(blob["records"][0])


def test_merge_drops_repeated_seeds_and_refuses_conflicting_ones(tmp_path):
  def write(name, rows):
    hetcomp._write(str(tmp_path / name), 1, False, 1.0, hetcomp.summarize(rows))
    return str(tmp_path / name / "results.json")

  def rec(v, seed):
    return dict(dict.fromkeys(hetcomp.METRICS, v), seed=seed)

  # seed 0's student appears in both files (equal): counted once; RRD only in the second.
  a = write("a", {hetcomp.STUDENT: [rec(0.4, 0), rec(0.6, 1)]})
  b = write("b", {hetcomp.STUDENT: [rec(0.4, 0)], hetcomp.RRD: [rec(0.5, 0)]})
  merged = {r["method"]: r for r in hetcomp.merge([a, b])}
  assert merged[hetcomp.STUDENT]["seeds"] == 2
  assert merged[hetcomp.STUDENT]["recall@50"] == pytest.approx(0.5)
  assert merged[hetcomp.RRD]["seeds"] == 1
  c = write("c", {hetcomp.STUDENT: [rec(0.45, 0)]})
  with pytest.raises(hetcomp.ConfigError, match="'Student alone \\(BPR\\)' seed 0 differs"):
    hetcomp.merge([a, c])
  merged = {r["method"]: r for r in hetcomp.merge([a, c], replace=True)}
  assert merged[hetcomp.STUDENT]["recall@50"] == pytest.approx((0.45 + 0.6) / 2)
  assert [r["seed"] for r in merged[hetcomp.STUDENT]["per_seed"]] == [0, 1]


def test_paired_differences_by_seed_and_capped_label():
  # seeds listed in different orders: differences are paired by seed, not by position
  def rows(vals, seeds, capped=False):
    return [dict(dict.fromkeys(hetcomp.METRICS, v), seed=s, capped=capped)
            for v, s in zip(vals, seeds)]
  recs = hetcomp.summarize({hetcomp.HETCOMP: rows([0.50, 0.52, 0.55], [0, 1, 2], True),
                            hetcomp.STUDENT: rows([0.45, 0.40, 0.48], [1, 2, 0])})
  (row,) = hetcomp.paired(recs)
  d = np.array([0.50 - 0.48, 0.52 - 0.45, 0.55 - 0.40])
  half = 4.302652729911275 * d.std(ddof=1) / np.sqrt(3)  # t_{0.975, 2}
  got = row["recall@50"]
  assert (row["method"], row["baseline"], row["seeds"]) == (hetcomp.HETCOMP, hetcomp.STUDENT,
                                                            [0, 1, 2])
  assert got["mean"] == pytest.approx(d.mean())
  assert got["ci95"] == pytest.approx([d.mean() - half, d.mean() + half])
  table = hetcomp.format_table(recs)
  assert "HetComp [capped]" in table and "Student alone (BPR) [capped]" not in table
  assert f"{d.mean():+.4f}" in hetcomp.format_paired([row])
