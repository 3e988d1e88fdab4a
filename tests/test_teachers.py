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


# ------------------------------------------------------------------------ integrity (fingerprint)

NORM = {"dataset": "digits", "mean": [0.3], "std": [0.4]}


@pytest.fixture(scope="module")
def fingerprinted(saved, tmp_path_factory):
  model, _, x = saved
  path = teachers.save_teacher(tmp_path_factory.mktemp("fp") / "teacher", model,
                               model_name="cnn_digits", num_classes=10, model_options={},
                               normalization=NORM, val_accuracy=0.93)
  return path, x


def _copy(path, tmp_path, name="copy"):
  out = tmp_path / name
  shutil.copytree(path, out)
  return out


def test_fingerprint_records_the_teacher_and_round_trips(fingerprinted, saved):
  path, x = fingerprinted
  fp = teachers.read_fingerprint(path)
  assert fp["model_name"] == "cnn_digits" and fp["num_classes"] == 10
  assert fp["model_class"] == "DigitsCNN" and fp["val_accuracy"] == 0.93
  assert fp["normalization"] == NORM and fp["checksum"] == "crc32"
  # The recorded CRC-32 is zlib's over the array's C-order bytes (an independent recomputation).
  import zlib  # pylint: disable=g-import-not-at-top
  kernel = np.asarray(saved[0].fc.kernel.value)
  assert fp["arrays"]["params/fc/kernel"]["crc32"] == zlib.crc32(kernel.tobytes())
  assert fp["arrays"]["params/fc/kernel"]["shape"] == list(kernel.shape)
  teacher = teachers.restore_teacher(path, "cnn_digits", num_classes=10, normalization=NORM)
  assert teacher.fingerprint["val_accuracy"] == 0.93
  np.testing.assert_array_equal(teacher(x)[0], saved[0](x, train=False)[0])


def test_flipped_bytes_in_an_array_file_are_refused_naming_the_array(fingerprinted, tmp_path):
  path, _ = fingerprinted
  bad = _copy(path, tmp_path)
  files = [os.path.join(r, f) for r, _, fs in os.walk(bad / "ocdbt.process_0" / "d") for f in fs]
  biggest = max(files, key=os.path.getsize)  # holds the conv kernels
  blob = bytearray(open(biggest, "rb").read())
  blob[len(blob) // 2] ^= 0xFF
  open(biggest, "wb").write(bytes(blob))
  with pytest.raises(ValueError, match=r"corrupt: array\(s\) \['params/[\w/]+'\].*CRC-32") as e:
    teachers.restore_teacher(bad, "cnn_digits", num_classes=10)
  assert str(bad) in str(e.value)


def test_other_architecture_class_count_or_normalisation_names_both(fingerprinted):
  path, _ = fingerprinted
  with pytest.raises(ValueError, match=r"model_name: .*'cnn_digits'.*'mlp_digits'") as e:
    teachers.restore_teacher(path, "mlp_digits", num_classes=10)
  assert "model_class" in str(e.value) and "missing from the checkpoint" in str(e.value)
  with pytest.raises(ValueError, match=r"num_classes: the checkpoint was saved with 10, it is "
                     r"restored as 7") as e:
    teachers.restore_teacher(path, "cnn_digits", num_classes=7)
  assert "shape (" in str(e.value)  # the array differences follow
  with pytest.raises(ValueError, match=r"normalization: .*0\.3.*0\.5"):
    teachers.restore_teacher(path, "cnn_digits", num_classes=10,
                             normalization={**NORM, "mean": [0.5]})
  with pytest.raises(ValueError, match=r"model_options: .*\{\}.*'width': 16"):
    teachers.restore_teacher(path, "cnn_digits", num_classes=10, width=16)


def test_old_checkpoint_without_fingerprint_warns(fingerprinted, tmp_path):
  old = _copy(fingerprinted[0], tmp_path)
  os.remove(old / teachers.FINGERPRINT_FILE)
  with pytest.warns(UserWarning, match="no fingerprint"):
    teacher = teachers.restore_teacher(old, "cnn_digits", num_classes=10)
  assert teacher.fingerprint is None


def test_broken_metadata_or_fingerprint_is_a_clear_error(fingerprinted, tmp_path):
  broken = _copy(fingerprinted[0], tmp_path, "meta")
  (broken / "_METADATA").write_text("{}")
  with pytest.raises(ValueError, match=f"{broken} cannot be read: its _METADATA"):
    teachers.restore_teacher(broken, "cnn_digits", num_classes=10)
  bad_fp = _copy(fingerprinted[0], tmp_path, "fp")
  (bad_fp / teachers.FINGERPRINT_FILE).write_text('{"arrays": ')
  with pytest.raises(ValueError, match=f"{bad_fp}: its fingerprint kd_jax_teacher.json is corrupt"):
    teachers.restore_teacher(bad_fp, "cnn_digits", num_classes=10)


def test_recorded_accuracy_is_checked(fingerprinted):
  teacher = teachers.restore_teacher(fingerprinted[0], "cnn_digits", num_classes=10)
  teachers.check_teacher_accuracy(teacher, 0.94)  # within the default 0.02
  with pytest.raises(ValueError, match=r"scores 0\.1000 on the validation split but 0\.9300 "
                     r"when it was saved \(tolerance 0\.02\).*normalisation"):
    teachers.check_teacher_accuracy(teacher, 0.1)


def test_masked_class_logits_pass_the_sanity_check_nan_and_plus_inf_do_not(saved):
  model, path, x = saved
  teacher = teachers.restore_teacher(path, "cnn_digits", num_classes=10)
  batch = {"image": np.asarray(x)}

  def with_bias(value):
    bias = teacher.variables["params"]["fc"]["bias"]
    variables = jax.tree.map(lambda v: v, teacher.variables)
    variables["params"]["fc"]["bias"] = nnx.Param(bias.get_value().at[3].set(value))
    return teachers.FrozenTeacher(teacher.graphdef, variables, "cnn_digits", 10, path)

  teachers.check_teacher_outputs(with_bias(-jnp.inf), [batch])  # a masked class is fine
  for value in (jnp.inf, jnp.nan):
    with pytest.raises(ValueError,
                       match=r"gives 16 non-finite \(NaN/\+inf\) values in its logits.*batch 0"):
      teachers.check_teacher_outputs(with_bias(value), [batch])
