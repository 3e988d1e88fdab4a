"""The HetComp experiment's command line: clear data-path errors and the mean/spread table."""

import json

import numpy as np
import pytest

from experiments import hetcomp


def test_missing_or_malformed_data_path_is_a_clear_error(tmp_path):
  with pytest.raises(SystemExit, match="does not exist"):
    hetcomp.main([f"--data={tmp_path / 'missing'}"])
  (tmp_path / "u.data").write_text("1\t2\tfive\t0\n")
  with pytest.raises(SystemExit, match="Malformed GroupLens line 1"):
    hetcomp.main([f"--data={tmp_path}"])


def test_summary_spread_and_merge(tmp_path):
  runs = {"A": [dict.fromkeys(hetcomp.METRICS, v) for v in (0.1, 0.3)]}
  (rec,) = hetcomp.summarize(runs)
  assert rec["recall@10"] == pytest.approx(0.2)
  assert rec["recall@10_spread"] == pytest.approx(np.std([0.1, 0.3]))
  assert "± 0.1000" in hetcomp.format_table([rec])
  for i, part in enumerate(([runs["A"][0]], [runs["A"][1]])):
    hetcomp._write(str(tmp_path / f"r{i}"), 1, False, 1.0, hetcomp.summarize({"A": part}))
  merged = hetcomp.merge([str(tmp_path / f"r{i}" / "results.json") for i in range(2)],
                         str(tmp_path / "m"))
  assert merged[0]["ndcg@50_spread"] == pytest.approx(rec["ndcg@50_spread"])
  blob = json.load(open(tmp_path / "m" / "results.json"))
  assert blob["records"][0]["seeds"] == 2
  assert set(hetcomp.METRICS) <= set(blob["records"][0])
