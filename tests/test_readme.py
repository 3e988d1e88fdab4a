"""The README's example runs as written and computes KD + 3000 * SP (checked in numpy float64)."""

import pathlib
import re

import numpy as np

from tests import _numpy_reference

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _np_sp(fs, ft):
  def gram(f):
    q = f.reshape(f.shape[0], -1)
    g = q @ q.T
    return g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)
  b = fs.shape[0]
  return ((gram(ft) - gram(fs)) ** 2).sum() / b**2


def test_readme_example_runs_and_is_kd_plus_sp():
  code = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
  assert code, "README has no python example"
  namespace = {}
  exec(compile(code[0], str(README), "exec"), namespace)  # noqa: S102
  f64 = lambda name: np.asarray(namespace[name], np.float64)
  want = (_numpy_reference.kd(f64("student_logits"), f64("teacher_logits"), 4.0).mean()
          + 3000 * _np_sp(f64("student_map"), f64("teacher_map")))
  np.testing.assert_allclose(float(namespace["loss"]), want, rtol=1e-4)
  g_logits, g_map = namespace["grads"]
  assert g_logits.shape == (64, 100) and g_map.shape == (64, 8, 8, 256)
  assert np.all(np.isfinite(g_logits)) and np.all(np.isfinite(g_map))


ROOT = README.parent
# Every method the feature table lists with the test file that verifies it: a token that must
# appear in one of the table's rows, and that row must name an existing tests/...py file.
TABLE_METHODS = ("`ls_kd`", "`dist`", "`reverse_kl`", "`jsd`", "`tv`", "`topk_kl`",
                 "`kd_jax.train.dot`", "`kd_jax.teachers.ensemble`", "`config.teachers`",
                 "`kd_jax.data.Mixing`", "teacher_input_key", "`vocab_axis=`", "`losses.ptloss`",
                 "`losses.sp`")
TEST_PATH = re.compile(r"tests/[A-Za-z0-9_/]+\.py")


def _feature_rows():
  text = README.read_text()
  section = text.split("## What is in it", 1)[1].split("\n## ", 1)[0]
  return [line for line in section.splitlines() if line.startswith("| ")][2:]


def test_every_test_file_the_readme_names_exists():
  named = sorted(set(TEST_PATH.findall(README.read_text())))
  assert len(named) >= 10, named
  missing = [p for p in named if not (ROOT / p).is_file()]
  assert not missing, f"README.md names test files that do not exist: {missing}"


def test_every_listed_method_appears_with_its_test_file():
  rows = _feature_rows()
  assert len(rows) >= 15
  for token in TABLE_METHODS:
    hits = [r for r in rows if token in r]
    assert hits, f"{token} is not in README's feature table"
    assert any(TEST_PATH.search(r) for r in hits), (
        f"README's feature-table row of {token} names no tests/...py file")
