"""Teacher checkpoints: round trip, frozen inference mode, and a clear error for each bad case."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kd_jax import models
from kd_jax import teachers
from kd_jax.models import create_compiled as create_model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  model = create_model("cnn_digits", num_classes=10, seed=3)  # jitted init: one compile
  x = jax.random.normal(jax.random.key(0), (16, 8, 8, 1))
  model(x, train=True)  # move the BatchNorm running statistics away from their init
  path = tmp_path_factory.mktemp("ckpt") / "teacher"
  teachers.save_teacher(path, model)
  return model, str(path), x


def test_round_trip_is_frozen_and_in_inference_mode(saved):
  model, path, x = saved
  teacher = teachers.restore_teacher(path, "cnn_digits", num_classes=10)
  logits, feats = teacher(x)
  want_logits, want_feats = model(x, train=False)
  np.testing.assert_array_equal(logits, want_logits)
  np.testing.assert_array_equal(feats["pre_pool"], want_feats["pre_pool"])
  # Inference mode: a train-mode forward (batch statistics) would give other logits.
  train_logits, _ = model(x, train=True)
  assert not np.allclose(logits, train_logits)
  # Never differentiated: the gradient through the teacher's variables is zero.
  g = jax.grad(lambda v: jnp.sum(teachers.FrozenTeacher(teacher.graphdef, v, "", 10)(x)[0]))(
      teacher.variables)
  assert all(float(jnp.max(jnp.abs(l))) == 0.0 for l in jax.tree.leaves(g))
  with pytest.raises(TypeError, match="never re-saved"):
    teachers.save_teacher(os.path.join(os.path.dirname(path), "again"), teacher)


def test_missing_path(tmp_path):
  missing = tmp_path / "nope"
  with pytest.raises(FileNotFoundError, match=str(missing)):
    teachers.restore_teacher(missing, "cnn_digits", num_classes=10)


def test_partial_checkpoint_names_path(saved, tmp_path):
  _, path, _ = saved
  broken = tmp_path / "broken"
  shutil.copytree(path, broken)
  os.remove(broken / "_METADATA")
  with pytest.raises(ValueError, match=f"{broken}.*incomplete.*_METADATA"):
    teachers.restore_teacher(broken, "cnn_digits", num_classes=10)
  # Array data gone (an interrupted write): the error names the path.
  no_data = tmp_path / "no_data"
  shutil.copytree(path, no_data)
  for entry in os.listdir(no_data):
    if entry.startswith("ocdbt.process") or entry in ("d", "manifest.ocdbt"):
      full = no_data / entry
      shutil.rmtree(full) if full.is_dir() else os.remove(full)
  with pytest.raises(ValueError, match=str(no_data)):
    teachers.restore_teacher(no_data, "cnn_digits", num_classes=10)


def test_checkpoint_missing_arrays_names_them(tmp_path):
  # A checkpoint of the MLP restored as the CNN: arrays missing and unexpected, named by key path.
  mlp = create_model("mlp_digits", num_classes=10, seed=0)
  path = teachers.save_teacher(tmp_path / "mlp", mlp)
  with pytest.raises(ValueError, match=r"missing from the checkpoint.*params/") as e:
    teachers.restore_teacher(path, "cnn_digits", num_classes=10)
  assert path in str(e.value)


def test_mismatched_array_names_key_and_both_shapes(saved):
  _, path, _ = saved
  with pytest.raises(ValueError) as e:
    teachers.restore_teacher(path, "cnn_digits", num_classes=7)
  msg = str(e.value)
  assert path in msg
  assert "shape (" in msg and ", 10)" in msg and ", 7)" in msg  # checkpoint vs model classes


def test_unknown_model_name(saved):
  _, path, _ = saved
  with pytest.raises(ValueError, match="unknown model name 'resnet9000'"):
    teachers.restore_teacher(path, "resnet9000", num_classes=10)


def test_check_teacher_outputs(saved):
  model, path, x = saved
  teacher = teachers.restore_teacher(path, "cnn_digits", num_classes=10)
  batch = {"image": np.asarray(x)}
  teachers.check_teacher_outputs(teacher, [batch], student_num_classes=10)
  with pytest.raises(ValueError, match="class mismatch.*10 classes.*student has 3"):
    teachers.check_teacher_outputs(teacher, [batch], student_num_classes=3)
  poisoned = jax.tree.map(lambda v: v * jnp.nan, teacher.variables)
  bad = teachers.FrozenTeacher(teacher.graphdef, poisoned, "cnn_digits", 10, path)
  with pytest.raises(ValueError, match="non-finite.*logits"):
    teachers.check_teacher_outputs(bad, [batch])
