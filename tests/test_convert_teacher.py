"""`python -m kd_jax.convert_teacher`: PyTorch checkpoints read without torch, converted, saved as
Orbax teachers that `restore_teacher` and the CIFAR-100 config read, for every zoo model.

Fixtures (tests/fixtures/convert/make_convert_fixtures.py, written once with torch): two files
saved by `torch.save` in RepDistiller's checkpoint layout (zip and legacy format) and PyTorch's
logits of every CIFAR zoo model under the deterministic numpy weights of
tests/fixtures/models/synthetic_weights.py, which the tests recompute without torch.
"""

import importlib.util
import json
import os
import shutil
import sys

import ml_dtypes
import numpy as np
import pytest

from kd_jax import convert_teacher
from kd_jax import teachers
from kd_jax.models import torch_file

ROOT = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(ROOT, "fixtures", "convert")
MODEL_FIXTURES = os.path.join(ROOT, "fixtures", "models")
ZIP_PTH = os.path.join(FIXTURES, "resnet8_c10.pth")
LEGACY_PTH = os.path.join(FIXTURES, "resnet8_c10_legacy.pth")

_spec = importlib.util.spec_from_file_location(
    "kd_jax_test_convert_synthetic_weights", os.path.join(MODEL_FIXTURES, "synthetic_weights.py"))
_synthetic = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_synthetic)
synthetic_state_dict = _synthetic.synthetic_state_dict

# The CIFAR zoo: every model RepDistiller's model_dict names (kd_jax.models.torch_reference.NAMES,
# which needs torch to import).
ZOO = ["resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
       "resnet8x4", "resnet32x4", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2", "vgg8", "vgg11",
       "vgg13", "vgg16", "vgg19", "MobileNetV2", "ShuffleV1", "ShuffleV2", "ResNet50"]


@pytest.fixture(scope="module")
def zoo_logits():
  with np.load(os.path.join(FIXTURES, "zoo_logits.npz")) as z:
    return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def key_shapes():
  with open(os.path.join(MODEL_FIXTURES, "torch_keys.json")) as f:
    return {name: entry["state_dict"] for name, entry in json.load(f).items()}


def _assert_logits_close(ours, theirs):
  scale = max(1.0, float(np.abs(theirs).max()))
  np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * scale)


# ------------------------------------------------------------------- reading torch.save files

def _expected_resnet8(sd):
  """The synthetic weights written into the .pth files (shapes from the file, values not)."""
  return synthetic_state_dict("resnet8", {k: v.shape for k, v in sd.items()})


def test_zip_checkpoint_reads_without_torch():
  ckpt = torch_file.load(ZIP_PTH)
  assert sorted(ckpt) == ["accuracy", "epoch", "model", "opt", "optimizer", "probe"]
  assert ckpt["epoch"] == 240 and float(ckpt["accuracy"]) == 71.25
  # An argparse.Namespace is not rebuilt (no code from the file runs): a placeholder.
  assert isinstance(ckpt["opt"], torch_file.Opaque) and ckpt["opt"].name == "argparse.Namespace"
  assert ckpt["opt"].state == {"model": "resnet8", "dataset": "cifar100", "learning_rate": 0.05}
  sd = torch_file.state_dict(ckpt)
  assert len(sd) == 56 and sd["fc.weight"].shape == (10, 64)
  for key, want in _expected_resnet8(sd).items():
    assert sd[key].dtype == want.dtype, key
    np.testing.assert_array_equal(sd[key], want, err_msg=key)
  # SGD's state: one momentum buffer per parameter, of its shape.
  params = [k for k in sd if not k.endswith(("running_mean", "running_var", "tracked"))]
  buffers = ckpt["optimizer"]["state"]
  assert len(buffers) == len(params) == 29
  assert ckpt["optimizer"]["param_groups"][0]["momentum"] == 0.9
  assert {tuple(b["momentum_buffer"].shape) for b in buffers.values()} == {
      tuple(sd[k].shape) for k in params}


def test_views_offsets_and_dtypes_are_rebuilt():
  probe = torch_file.load(ZIP_PTH)["probe"]
  base = np.arange(24, dtype=np.float32).reshape(4, 6) / np.float32(7)
  expected = {"transposed": base.T, "rows_1_3": base[1:3], "half": base.astype(np.float16),
              "bfloat16": base.astype(ml_dtypes.bfloat16), "bool": base > 1.5,
              "long": np.arange(5, dtype=np.int64) - 2, "empty": np.zeros((0, 3), np.float32)}
  assert sorted(probe) == sorted(expected)
  for key, want in expected.items():
    assert probe[key].dtype == want.dtype and probe[key].shape == want.shape, key
    np.testing.assert_array_equal(probe[key], want, err_msg=key)


def test_legacy_checkpoint_reads_without_torch():
  ckpt = torch_file.load(LEGACY_PTH)
  assert ckpt["epoch"] == 240 and float(ckpt["accuracy"]) == 71.25
  sd = torch_file.state_dict(ckpt)
  assert all(k.startswith("module.") for k in sd)
  sd = {k[len("module."):]: v for k, v in sd.items()}
  for key, want in _expected_resnet8(sd).items():
    np.testing.assert_array_equal(sd[key], want, err_msg=key)


def test_bad_files_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.pth"):
    torch_file.load(tmp_path / "nope.pth")
  junk = tmp_path / "junk.pth"
  junk.write_bytes(b"\x00not a checkpoint" * 10)
  with pytest.raises(ValueError, match="neither a torch zip checkpoint nor a legacy"):
    torch_file.load(junk)
  cut = tmp_path / "cut.pth"
  cut.write_bytes(open(LEGACY_PTH, "rb").read()[:200_000])
  with pytest.raises(ValueError, match="truncated"):
    torch_file.load(cut)
  with pytest.raises(ValueError, match=r"no 'state' entry.*\['accuracy', 'epoch', 'model'\]"):
    torch_file.state_dict(torch_file.load(LEGACY_PTH), key="state")


# ------------------------------------------------------------------- every zoo model

# vgg8, MobileNetV2, ShuffleV1, ShuffleV2 and ResNet50 are converted from the same synthetic
# weights and compared with PyTorch's logits, embedding and pre-pool map in
# tests/models/test_models_torch_convert.py::test_other_families_match_pytorch (and resnet8 and
# wrn_16_1 with their train-mode outputs there too); the rest of the zoo is here.
OTHER_FAMILIES = ["vgg8", "MobileNetV2", "ShuffleV1", "ShuffleV2", "ResNet50"]


def test_the_zoo_is_covered(key_shapes):
  assert sorted(ZOO) == sorted(key_shapes)  # torch_keys.json: every model of the PyTorch zoo
  with open(os.path.join(ROOT, "models", "test_models_torch_convert.py")) as f:
    other_test = f.read()
  assert all(f'"{n}"' in other_test for n in OTHER_FAMILIES)


@pytest.mark.parametrize("name", [n for n in ZOO if n not in OTHER_FAMILIES])
def test_every_zoo_model_converts_to_pytorch_logits(name, key_shapes, zoo_logits):
  """Synthetic weights in PyTorch's layout -> the converted model's logits == PyTorch's.

  The Orbax round trip that the command adds is the same for every model; it is tested on
  resnet8 (the command, both file formats) and resnet32x4 (the CIFAR-100 config) below.
  """
  model = convert_teacher.convert(synthetic_state_dict(name, key_shapes[name]), name,
                                  num_classes=100)
  teacher = teachers.freeze(model, model_name=name, num_classes=100)
  _assert_logits_close(convert_teacher.teacher_logits(teacher, zoo_logits["x"]),
                       zoo_logits[f"{name}/logits"])


# ------------------------------------------------------------------- the command

@pytest.mark.parametrize("pth", [ZIP_PTH, LEGACY_PTH], ids=["zip", "legacy"])
def test_command_writes_a_teacher_that_restores(pth, tmp_path, zoo_logits, capsys):
  out = tmp_path / "teacher"
  code = convert_teacher.main([f"--pth={pth}", "--arch=resnet8", "--num_classes=10",
                               f"--out={out}", "--no-check"])
  printed = capsys.readouterr().out
  assert code == 0, printed
  assert "read 56 tensors" in printed and "epoch 240" in printed and "accuracy 71.25" in printed
  assert f"--config.teacher.checkpoint={out}" in printed
  assert not os.path.exists(f"{out}.converting")
  teacher = teachers.restore_teacher(out, "resnet8", num_classes=10)
  _assert_logits_close(convert_teacher.teacher_logits(teacher, zoo_logits["x"]),
                       zoo_logits["resnet8_c10/logits"])


def test_command_errors_are_one_line(tmp_path, capsys):
  out = tmp_path / "t"
  # Wrong class count: torch_convert names the key and both shapes; nothing is written.
  assert convert_teacher.main([f"--pth={ZIP_PTH}", "--arch=resnet8", "--num_classes=100",
                               f"--out={out}", "--no-check"]) == 1
  err = capsys.readouterr().err
  assert "error: shape mismatch for state_dict key 'fc.weight'" in err and "(10, 64)" in err
  assert not os.path.exists(out)
  os.makedirs(out)
  assert convert_teacher.main([f"--pth={ZIP_PTH}", "--arch=resnet8", "--num_classes=10",
                               f"--out={out}", "--no-check"]) == 1
  assert "exists; pass --overwrite" in capsys.readouterr().err


def test_missing_torch_is_explained(tmp_path, capsys, monkeypatch):
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
  assert convert_teacher.main([f"--pth={ZIP_PTH}", "--arch=resnet8", "--num_classes=10",
                               f"--out={tmp_path / 't'}"]) == 1
  err = capsys.readouterr().err
  assert "needs torch" in err and "--no-check" in err and "pip install torch" in err


def test_disagreement_with_pytorch_writes_nothing(tmp_path, capsys, monkeypatch, zoo_logits):
  """The check's verdict: logits off by 1e-3 of their scale fail at the default tolerance."""
  theirs = zoo_logits["resnet8_c10/logits"]
  monkeypatch.setattr(convert_teacher, "torch_module", lambda *a: "pytorch model")
  monkeypatch.setattr(convert_teacher, "random_inputs", lambda n: zoo_logits["x"])
  scale = max(1.0, float(np.abs(theirs).max()))
  monkeypatch.setattr(convert_teacher, "torch_logits",
                      lambda module, sd, x: theirs + np.where(np.arange(10) == 3, 1e-3 * scale, 0))
  out = tmp_path / "t"
  assert convert_teacher.main([f"--pth={ZIP_PTH}", "--arch=resnet8", "--num_classes=10",
                               f"--out={out}"]) == 1
  captured = capsys.readouterr()
  assert "disagrees with PyTorch" in captured.err and "nothing written" in captured.err
  assert "max |difference| 0.001" in captured.out  # printed before the verdict
  assert not os.path.exists(out) and not os.path.exists(f"{out}.converting")


def test_agreement_numbers():
  theirs = np.array([[1.0, 4.0, -2.0], [0.5, 0.0, 3.0]])
  ours = theirs + np.array([[0.0, 0.0, 0.04], [0.5, 0.0, 0.0]])  # row 2's argmax stays 2
  a = convert_teacher.agreement(ours, theirs)
  assert a == {"max_abs_diff": 0.5, "max_logit": 4.0, "scale": 4.0, "relative": 0.125, "top1": 1.0,
               "num_inputs": 2}
  assert convert_teacher.agreement(theirs[:, ::-1], theirs)["top1"] == 0.5


def test_check_against_pytorch(tmp_path, capsys, monkeypatch):
  """With torch installed: the command's own comparison passes on the real .pth file, with the
  PyTorch model from a user's `module:function` (RepDistiller's `model_dict` style)."""
  pytest.importorskip("torch", reason="the comparison with PyTorch needs torch (not a test "
                      "dependency); the conversion itself is tested above without it")
  (tmp_path / "my_models.py").write_text(
      "from kd_jax.models import torch_reference\n"
      "model_dict = {'resnet8': lambda num_classes: torch_reference.build('resnet8', "
      "num_classes)}\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  out = tmp_path / "teacher"
  code = convert_teacher.main([f"--pth={LEGACY_PTH}", "--arch=resnet8", "--num_classes=10",
                               f"--out={out}", "--num_inputs=4",
                               "--torch_model=my_models:model_dict.resnet8"])
  printed = capsys.readouterr()
  assert code == 0, printed.err
  assert "logits against PyTorch on 4 random inputs" in printed.out
  assert "top-1 agreement 100.0 %" in printed.out
  assert os.path.isdir(out)


# ------------------------------------------------------------------- the CIFAR-100 config

def test_cifar100_config_restores_a_converted_teacher(tmp_path, key_shapes, zoo_logits,
                                                      tfds_mock_data):
  """What `python -m experiments.main --config=...cifar100.py:resnet32x4-resnet8x4
  --config.teacher.checkpoint=DIR` does first: restore DIR as its teacher and check it."""
  from experiments import runner  # pylint: disable=g-import-not-at-top
  from experiments.configs import cifar100  # pylint: disable=g-import-not-at-top
  tfds_mock_data(8)
  model = convert_teacher.convert(synthetic_state_dict("resnet32x4", key_shapes["resnet32x4"]),
                                  "resnet32x4", num_classes=100)
  path = teachers.save_teacher(tmp_path / "resnet32x4", model)
  config = cifar100.get_config("resnet32x4-resnet8x4")
  config.teacher.checkpoint = path
  config.num_devices = 1
  config.eval_batch_size = 8
  r = runner.Runner(config, str(tmp_path / "work"))
  teacher, trained = runner._teacher(r, config)  # pylint: disable=protected-access
  assert not trained and teacher.path == path and teacher.num_classes == 100
  teachers.check_teacher_outputs(teacher, r.data.eval("val"), student_num_classes=100)
  _assert_logits_close(convert_teacher.teacher_logits(teacher, zoo_logits["x"]),
                       zoo_logits["resnet32x4/logits"])
  shutil.rmtree(tmp_path / "work", ignore_errors=True)
