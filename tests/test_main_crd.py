"""The main job trains a CRD student: batches carry dataset indices, the state carries the banks."""

import json

import numpy as np

from experiments.configs import digits as default
from experiments import runner as experiment


def test_main_job_trains_crd_with_memory_bank_state(tmp_path):
  c = default.get_config()
  c.teacher.num_steps, c.student.num_steps = 20, 6
  c.checkpoint_every, c.eval_every_epochs, c.progress, c.log_every = 3, 0, False, 3
  c.methods = {"crd": "ce:1,crd:0.8(num_negatives=16,feat_dim=8)"}
  results = experiment.run(c, str(tmp_path))
  r = results["methods"]["crd"]
  assert r["steps"] == 6 and 0.0 <= r["test_accuracy"][0] <= 1.0
  records = [json.loads(line) for line in open(tmp_path / "students" / "metrics.jsonl")]
  losses = [rec["crd/loss/crd"] for rec in records if "crd/loss/crd" in rec]
  assert losses and np.all(np.isfinite(losses)) and min(losses) > 0.0


def test_digits_training_stream_with_index_points_at_its_examples():
  c = default.get_config()
  data = experiment.Dataset(c)
  train = data._splits["train"]  # pylint: disable=protected-access
  batch = next(data.train(2, with_index=True))
  np.testing.assert_array_equal(batch["label"], train["label"][batch["index"]])
  np.testing.assert_array_equal(batch["image"], train["image"][batch["index"]])
  assert "index" not in next(data.train(2))
