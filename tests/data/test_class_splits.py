"""Class splits for generalized KD: masks, relabelling and the presets, checked by hand."""

import numpy as np
import pytest

from kd_jax.data import class_splits as cs


def test_class_split_masks_and_relabelling_by_hand():
  labels = np.array([0, 5, 3, 9, 5, 1, 7, 3], np.int32)
  split = cs.class_split(labels, teacher_classes=[3, 1], student_classes=[5, 7, 9, 3],
                         allow_missing=False)
  np.testing.assert_array_equal(split.teacher_mask, [0, 0, 1, 0, 0, 1, 0, 1])
  np.testing.assert_array_equal(split.teacher_labels, [-1, -1, 0, -1, -1, 1, -1, 0])
  np.testing.assert_array_equal(split.student_mask, [0, 1, 1, 1, 1, 0, 1, 1])
  np.testing.assert_array_equal(split.student_labels, [-1, 0, 3, 2, 0, -1, 1, 3])
  np.testing.assert_array_equal(split.student_indices, [1, 2, 3, 4, 6, 7])
  assert split.num_teacher_classes == 2 and split.num_student_classes == 4


def test_apply_split_keeps_examples_and_relabels():
  data = {"image": np.arange(6 * 2).reshape(6, 2), "label": np.array([4, 0, 2, 4, 1, 2])}
  split = cs.class_split(data["label"], [0, 1], [2, 4])
  student = cs.apply_split(data, split, "student")
  np.testing.assert_array_equal(student["image"], [[0, 1], [4, 5], [6, 7], [10, 11]])
  np.testing.assert_array_equal(student["label"], [1, 0, 1, 0])
  teacher = cs.apply_split(data, split, "teacher")
  np.testing.assert_array_equal(teacher["label"], [0, 1])
  with pytest.raises(ValueError, match="role"):
    cs.apply_split(data, split, "both")
  with pytest.raises(ValueError, match=r"data\['image'\]"):
    cs.apply_split({"image": np.zeros((5, 2)), "label": data["label"]}, split, "student")


def test_label_map_is_a_lookup_table():
  table = cs.label_map([7, 2], 10)
  np.testing.assert_array_equal(table[np.array([2, 7, 3])], [1, 0, -1])
  with pytest.raises(ValueError, match="num_classes=5"):
    cs.label_map([7], 5)


def test_bad_classes_raise_clear_errors():
  labels = np.array([0, 1, 2, 3])
  with pytest.raises(ValueError, match=r"more than once: \[1\]"):
    cs.class_split(labels, [1, 1], [2])
  with pytest.raises(ValueError, match="at least one class"):
    cs.class_split(labels, [], [2])
  with pytest.raises(ValueError, match=r"no example.*\[8\]"):
    cs.class_split(labels, [0], [8])
  assert not cs.class_split(labels, [0], [8], allow_missing=True).student_mask.any()
  with pytest.raises(ValueError, match="1-D integer"):
    cs.class_split(labels.astype(float), [0], [1])


def test_digits_settings():
  s = cs.digits_settings()
  assert tuple(s) == cs.SETTING_NAMES
  for setting in s.values():
    assert setting.student_classes == (5, 6, 7, 8, 9)
  assert s["same"].teacher_classes == (5, 6, 7, 8, 9)
  assert s["overlap"].teacher_classes == (3, 4, 5, 6, 7)
  assert s["overlap"].shared_classes == (5, 6, 7)
  assert s["disjoint"].teacher_classes == (0, 1, 2, 3, 4)
  assert s["disjoint"].shared_classes == ()


def test_cifar100_settings():
  s = cs.cifar100_settings()
  assert s["full"].teacher_classes == s["full"].student_classes == tuple(range(100))
  assert s["disjoint"].teacher_classes == tuple(range(50))
  assert s["disjoint"].student_classes == tuple(range(50, 100))
  assert s["overlap"].shared_classes == tuple(range(50, 75))
  assert len(s["overlap"].teacher_classes) == 50
  labels = np.repeat(np.arange(100), 3)
  split = cs.class_split(labels, s["disjoint"].teacher_classes, s["disjoint"].student_classes)
  assert split.teacher_mask.sum() == split.student_mask.sum() == 150
  assert not (split.teacher_mask & split.student_mask).any()
  np.testing.assert_array_equal(np.unique(split.student_labels[split.student_mask]),
                                np.arange(50))


def test_generalized_settings_validation():
  with pytest.raises(ValueError, match="num_task_classes=6, num_classes=10"):
    cs.generalized_settings(10, 6)
  with pytest.raises(ValueError, match="num_shared"):
    cs.generalized_settings(10, 5, num_shared=5)


def test_balanced_subset_draws_per_class_without_replacement():
  labels = np.repeat(np.arange(4), [5, 7, 9, 3])
  idx = cs.balanced_subset(labels, 3, seed=1)
  assert np.all(np.diff(idx) > 0)  # sorted, no repeats
  np.testing.assert_array_equal(np.bincount(labels[idx]), [3, 3, 3, 3])
  np.testing.assert_array_equal(idx, cs.balanced_subset(labels, 3, seed=1))
  assert not np.array_equal(idx, cs.balanced_subset(labels, 3, seed=2))
  with pytest.raises(ValueError, match="class 3 has 3 examples"):
    cs.balanced_subset(labels, 4)


def test_few_label_digits_dataset_keeps_the_teacher_on_the_full_split():
  from experiments import runner  # pylint: disable=g-import-not-at-top
  from experiments.configs import digits  # pylint: disable=g-import-not-at-top
  config = digits.get_config("few_transfer")
  data = runner.Dataset(config)
  full = data._teacher_train["label"].shape[0]  # pylint: disable=protected-access
  assert data.num_train == 100 and data.num_teacher_train == full == 1258
  assert data.steps_per_epoch == 2 and data.teacher_steps_per_epoch == full // 50
  batch = next(iter(data.train(0, transfer=True)))
  # 50 labelled rows (5 per class on average), then 100 transfer rows from the other images.
  np.testing.assert_array_equal(batch["labeled"], np.arange(150) < 50)
  subset = {x.tobytes() for x in data._splits["train"]["image"]}  # pylint: disable=protected-access
  assert all(x.tobytes() in subset for x in batch["image"][:50])
  assert not any(x.tobytes() in subset for x in batch["image"][50:])
  teacher_batch = next(iter(data.train(0, teacher=True)))
  assert teacher_batch["image"].shape[0] == 50 and "labeled" not in teacher_batch
