"""Bad data is refused before training, naming the split, the field and the example."""

import numpy as np
import pytest

from experiments import runner as experiment
from experiments.configs import digits as digits_config
from kd_jax import data
from kd_jax.data import teacher_cache


def _split(n=6, classes=3):
  rng = np.random.default_rng(0)
  return {"image": rng.normal(size=(n, 4, 4, 1)).astype(np.float32),
          "label": (np.arange(n) % classes).astype(np.int32)}


def test_check_split_names_each_problem():
  good = _split()
  data.check_split(good, split="train", num_classes=3)
  bad = dict(good, label=good["label"].copy())
  bad["label"][4] = 3
  with pytest.raises(ValueError, match=r"train split has 1 'label' value\(s\) outside \[0, 3\), "
                     r"the first at index 4 \(\[3\]\).*zero rows"):
    data.check_split(bad, split="train", num_classes=3)
  bad["label"][4] = -1
  with pytest.raises(ValueError, match=r"outside \[0, 3\), the first at index 4 \(\[-1\]\)"):
    data.check_split(bad, split="train", num_classes=3)
  nan = dict(good, image=good["image"].copy())
  nan["image"][2, 1, 1, 0] = np.nan
  nan["image"][5, 0, 0, 0] = np.inf
  with pytest.raises(ValueError, match=r"val split has 2 example\(s\) with non-finite 'image' "
                     r"values \(NaN/inf\), the first at index 2 \(\[nan\]\)"):
    data.check_split(nan, split="val")
  with pytest.raises(ValueError, match=r"test split is empty \('image' has shape \(0, 4, 4, 1\)\)"):
    data.check_split({k: v[:0] for k, v in good.items()}, split="test")
  with pytest.raises(ValueError, match=r"'label' must be integers, got dtype float32"):
    data.check_split(dict(good, label=good["label"].astype(np.float32)), split="train")


def test_the_runner_checks_every_split_before_training(monkeypatch):
  real = data.load_digits

  def with_bad_label(**kw):
    splits = real(**kw)
    splits.val["label"][7] = 10  # a label of an 11-class dataset in a 10-class one
    return splits

  monkeypatch.setattr(data, "load_digits", with_bad_label)
  with pytest.raises(ValueError, match=r"the val split has 1 'label' value\(s\) outside "
                     r"\[0, 10\), the first at index 7"):
    experiment.Dataset(digits_config.get_config())


def test_teacher_cache_of_another_length_is_refused(tmp_path):
  arrays = _split(8)
  cache = teacher_cache.build(lambda b: b["image"].reshape(len(b["image"]), -1)[:, :3], arrays,
                              batch_size=4, path=tmp_path / "c", backend="npy")
  with pytest.raises(ValueError, match=r"teacher cache .*c' holds 8 examples but the dataset has "
                     r"6; it was built from another dataset"):
    teacher_cache.attach(_split(6), cache)


def test_refilled_class_setting_that_keeps_no_example_is_named():
  from experiments import refilled_pipeline  # pylint: disable=g-import-not-at-top
  from experiments.configs import refilled_digits  # pylint: disable=g-import-not-at-top
  setting = data.Setting("bad", (0, 1), (12, 13))  # digits has no classes 12 and 13
  with pytest.raises(ValueError, match=r"the student train split is empty"):
    refilled_pipeline.TaskData(refilled_digits.get_config(), setting, seed=0)
