"""Class splits for generalized KD: the teacher's and the student's tasks from one dataset.

Generalized KD (ReFilled: Ye, Lu, Zhan, "Generalized Knowledge Distillation via Relationship
Matching", TPAMI 2022; docs/refilled.md) trains the teacher on classes A and the student on
classes B of the same labelled dataset, with B = A (standard KD), B partially overlapping A, or B
disjoint from A (cross-task). A split keeps the examples of each task and relabels their targets
to 0..|A|-1 and 0..|B|-1 in the order the classes are listed, so each model sees a dense label
space. Presets fix the student's task and vary only the teacher's, so a student's accuracy is
comparable across settings.

The cross-task class splits of the ReFilled papers were not available to us (the README of the
official code `njulus/REFILLED` reports only the standard-KD setting); the presets here are this
library's choices, not the papers' protocols.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = [
    "ClassSplit",
    "Setting",
    "SETTING_NAMES",
    "apply_split",
    "balanced_subset",
    "cifar100_settings",
    "class_split",
    "digits_settings",
    "generalized_settings",
    "label_map",
]

SETTING_NAMES = ("same", "overlap", "disjoint")


@dataclasses.dataclass(frozen=True)
class Setting:
  """A named generalized-KD setting: the teacher's classes A and the student's classes B."""

  name: str
  teacher_classes: tuple[int, ...]
  student_classes: tuple[int, ...]

  @property
  def shared_classes(self) -> tuple[int, ...]:
    """Classes of B that are also in A, in B's order."""
    a = set(self.teacher_classes)
    return tuple(c for c in self.student_classes if c in a)


@dataclasses.dataclass(frozen=True)
class ClassSplit:
  """The teacher's and the student's tasks carved out of one labelled array.

  Attributes:
    teacher_classes: original ids of A; A[i] becomes teacher label i.
    student_classes: original ids of B; B[j] becomes student label j.
    teacher_mask: bool [N], the examples whose class is in A.
    student_mask: bool [N], the examples whose class is in B.
    teacher_labels: int32 [N], labels in 0..|A|-1 on `teacher_mask`, -1 elsewhere.
    student_labels: int32 [N], labels in 0..|B|-1 on `student_mask`, -1 elsewhere.
  """

  teacher_classes: tuple[int, ...]
  student_classes: tuple[int, ...]
  teacher_mask: np.ndarray
  student_mask: np.ndarray
  teacher_labels: np.ndarray
  student_labels: np.ndarray

  @property
  def num_teacher_classes(self) -> int:
    return len(self.teacher_classes)

  @property
  def num_student_classes(self) -> int:
    return len(self.student_classes)

  @property
  def teacher_indices(self) -> np.ndarray:
    return np.flatnonzero(self.teacher_mask)

  @property
  def student_indices(self) -> np.ndarray:
    return np.flatnonzero(self.student_mask)


def _check_classes(classes: Sequence[int], name: str) -> tuple[int, ...]:
  out = tuple(int(c) for c in classes)
  if not out:
    raise ValueError(f"{name} must list at least one class, got {name}={list(classes)}.")
  if len(set(out)) != len(out):
    dup = sorted({c for c in out if out.count(c) > 1})
    raise ValueError(f"{name} lists classes more than once: {dup} in {name}={list(out)}.")
  if min(out) < 0:
    raise ValueError(f"{name} must be non-negative class ids, got {name}={list(out)}.")
  return out


def label_map(classes: Sequence[int], num_classes: int) -> np.ndarray:
  """A lookup table [num_classes] sending classes[i] to i and every other class to -1.

  `label_map(B, C)[labels]` relabels a batch on the fly (numpy or jax arrays alike).

  Args:
    classes: the original class ids of a task, in the order of the new labels.
    num_classes: number of classes of the original dataset.
  """
  classes = _check_classes(classes, "classes")
  if max(classes) >= num_classes:
    raise ValueError(
        f"classes must be < num_classes={num_classes}, got max(classes)={max(classes)}."
    )
  table = np.full((num_classes,), -1, np.int32)
  table[list(classes)] = np.arange(len(classes), dtype=np.int32)
  return table


def class_split(labels, teacher_classes: Sequence[int], student_classes: Sequence[int], *,
                allow_missing: bool = False) -> ClassSplit:
  """Splits a labelled array into the teacher's task (classes A) and the student's task (B).

  Args:
    labels: int [N] original class ids of the dataset (e.g. a split's "label" array).
    teacher_classes: A, the teacher's classes; A[i] becomes teacher label i.
    student_classes: B, the student's classes; B[j] becomes student label j.
    allow_missing: if False (default), a listed class with no example in `labels` is an error
      (usually a wrong class id); set True for tiny subsets.

  Returns:
    A `ClassSplit` with masks and relabelled targets for both tasks.
  """
  labels = np.asarray(labels)
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(
        f"labels must be a 1-D integer array, got shape {labels.shape} and dtype {labels.dtype}."
    )
  a = _check_classes(teacher_classes, "teacher_classes")
  b = _check_classes(student_classes, "student_classes")
  if not allow_missing:
    seen = set(np.unique(labels).tolist())
    for name, classes in (("teacher_classes", a), ("student_classes", b)):
      missing = [c for c in classes if c not in seen]
      if missing:
        raise ValueError(
            f"{name} lists classes with no example in labels (shape {labels.shape}): {missing}. "
            "Pass allow_missing=True if that is intended."
        )
  num = int(max(max(a), max(b), int(labels.max(initial=0)))) + 1
  safe = np.where(labels >= 0, labels, num)  # negative ids map to no class
  ta = np.append(label_map(a, num), -1)[safe]
  tb = np.append(label_map(b, num), -1)[safe]
  return ClassSplit(a, b, ta >= 0, tb >= 0, ta.astype(np.int32), tb.astype(np.int32))


def apply_split(data: Mapping[str, np.ndarray], split: ClassSplit, role: str, *,
                label_key: str = "label") -> dict[str, np.ndarray]:
  """The examples of one task with relabelled targets: `role` is "teacher" or "student".

  Args:
    data: a dict of arrays with a common leading axis N (e.g. {"image", "label"}), the one whose
      labels built `split`.
    split: from `class_split(data[label_key], ...)`.
    role: "teacher" (classes A) or "student" (classes B).
    label_key: the key of the labels in `data`.
  """
  if role not in ("teacher", "student"):
    raise ValueError(f"role must be 'teacher' or 'student', got role={role!r}.")
  mask = split.teacher_mask if role == "teacher" else split.student_mask
  new = split.teacher_labels if role == "teacher" else split.student_labels
  for key, value in data.items():
    if np.shape(value)[:1] != mask.shape:
      raise ValueError(
          f"data[{key!r}].shape={np.shape(value)} does not match the split's {mask.shape[0]} "
          "examples."
      )
  out = {key: np.asarray(value)[mask] for key, value in data.items()}
  out[label_key] = new[mask]
  return out


def generalized_settings(num_classes: int, num_task_classes: int,
                         num_shared: int | None = None) -> dict[str, Setting]:
  """The three settings on classes 0..num_classes-1 with a fixed student task.

  The student always learns the last k = num_task_classes classes, B = [n-k, n). The teacher
  learns k classes: "same" A = B; "overlap" A = [n-2k+s, n-k+s), sharing the s = num_shared
  lowest classes of B (default s = k // 2); "disjoint" A = [n-2k, n-k).

  Args:
    num_classes: n, the number of classes of the dataset (needs n >= 2k).
    num_task_classes: k, the number of classes of each task.
    num_shared: s in 1..k-1, the overlap of the "overlap" setting.
  """
  n, k = int(num_classes), int(num_task_classes)
  s = k // 2 if num_shared is None else int(num_shared)
  if k < 1 or 2 * k > n:
    raise ValueError(
        f"need 1 <= num_task_classes and 2 * num_task_classes <= num_classes for a disjoint "
        f"teacher task, got num_task_classes={k}, num_classes={n}."
    )
  if not 0 < s < k:
    raise ValueError(f"num_shared must be in 1..{k - 1}, got num_shared={s}.")
  student = tuple(range(n - k, n))
  return {
      "same": Setting("same", student, student),
      "overlap": Setting("overlap", tuple(range(n - 2 * k + s, n - k + s)), student),
      "disjoint": Setting("disjoint", tuple(range(n - 2 * k, n - k)), student),
  }


def digits_settings() -> dict[str, Setting]:
  """The offline digits settings: the student learns digits 5-9.

  "same": teacher on 5-9; "overlap": teacher on 3-7 (shares 5, 6, 7); "disjoint": teacher on 0-4.
  """
  return generalized_settings(10, 5, num_shared=3)


def cifar100_settings() -> dict[str, Setting]:
  """CIFAR-100 settings by class id (alphabetical fine labels), student on classes 50-99.

  "full": both on all 100 classes, the standard-KD setting of the ReFilled README table
  (`njulus/REFILLED`; docs/refilled.md); "same": both on 50-99; "overlap": teacher on 25-74
  (shares 50-74); "disjoint": teacher on 0-49, the 50/50 cross-task split.
  """
  out = {"full": Setting("full", tuple(range(100)), tuple(range(100)))}
  out.update(generalized_settings(100, 50, num_shared=25))
  return out


def balanced_subset(labels, per_class: int, *, seed: int = 0) -> np.ndarray:
  """Sorted indices of `per_class` examples of every class, drawn without replacement.

  The few-label setting of semi-supervised distillation: the student's labelled set is this
  subset of the training split, the teacher saw all of it. The same `seed` gives the same subset.

  Raises:
    ValueError: `per_class` < 1, or a class with fewer than `per_class` examples (named).
  """
  labels = np.asarray(labels)
  if per_class < 1:
    raise ValueError(f"per_class must be >= 1, got {per_class}.")
  rng = np.random.default_rng(seed)
  keep = []
  for c in np.unique(labels):
    idx = np.flatnonzero(labels == c)
    if idx.size < per_class:
      raise ValueError(f"class {int(c)} has {idx.size} examples, fewer than per_class="
                       f"{per_class}.")
    keep.append(rng.choice(idx, per_class, replace=False))
  return np.sort(np.concatenate(keep))
