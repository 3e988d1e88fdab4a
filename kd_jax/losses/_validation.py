"""Input checks shared by the losses: clear `ValueError`s that name the offending shapes.

Checks run on static shapes at trace time, so they cost nothing inside `jax.jit`.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp


def check_rank(x, min_rank: int, name: str) -> None:
  """Raises if `x` has fewer than `min_rank` axes."""
  if jnp.ndim(x) < min_rank:
    raise ValueError(
        f"{name} must have at least {min_rank} axes, got shape {jnp.shape(x)}."
    )


def check_same_shape(a, b, a_name: str, b_name: str) -> None:
  """Raises if `a` and `b` differ in shape, naming both shapes."""
  if jnp.shape(a) != jnp.shape(b):
    raise ValueError(
        f"{a_name} and {b_name} must have the same shape, got "
        f"{a_name}.shape={jnp.shape(a)} and {b_name}.shape={jnp.shape(b)}."
    )


def check_logits_pair(student, teacher, student_name="student_logits",
                      teacher_name="teacher_logits") -> None:
  """Student and teacher logits must agree in batch shape and number of classes."""
  check_rank(student, 1, student_name)
  check_rank(teacher, 1, teacher_name)
  if jnp.shape(student)[-1] != jnp.shape(teacher)[-1]:
    raise ValueError(
        f"teacher/student class mismatch: {student_name}.shape={jnp.shape(student)} "
        f"has {jnp.shape(student)[-1]} classes but {teacher_name}.shape="
        f"{jnp.shape(teacher)} has {jnp.shape(teacher)[-1]}."
    )
  check_same_shape(student, teacher, student_name, teacher_name)


def check_batch_match(student, teacher, student_name="student_features",
                      teacher_name="teacher_features") -> None:
  """Batch-relational losses need the same leading (batch) size on both sides."""
  check_rank(student, 1, student_name)
  check_rank(teacher, 1, teacher_name)
  if jnp.shape(student)[0] != jnp.shape(teacher)[0]:
    raise ValueError(
        f"{student_name} and {teacher_name} must have the same batch size, got "
        f"{student_name}.shape={jnp.shape(student)} and "
        f"{teacher_name}.shape={jnp.shape(teacher)}."
    )


def check_where(where, batch_shape: Sequence[int], name: str = "where") -> None:
  """A `where` mask must be boolean with exactly the batch shape."""
  if where is None:
    return
  if tuple(jnp.shape(where)) != tuple(batch_shape):
    raise ValueError(
        f"{name} must have the batch shape {tuple(batch_shape)}, got "
        f"{name}.shape={jnp.shape(where)}."
    )
  if jnp.asarray(where).dtype != jnp.bool_:
    raise ValueError(f"{name} must be boolean, got dtype {jnp.asarray(where).dtype}.")
