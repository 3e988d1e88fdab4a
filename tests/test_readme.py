"""The README's example runs as written and computes KD + 3000 * SP (checked in numpy float64)."""

import pathlib
import re

import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _np_kd(s, t, temperature):
  def log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))
  lt, ls = log_softmax(t / temperature), log_softmax(s / temperature)
  return temperature**2 * (np.exp(lt) * (lt - ls)).sum(-1)


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
  want = (_np_kd(f64("student_logits"), f64("teacher_logits"), 4.0).mean()
          + 3000 * _np_sp(f64("student_map"), f64("teacher_map")))
  np.testing.assert_allclose(float(namespace["loss"]), want, rtol=1e-4)
  g_logits, g_map = namespace["grads"]
  assert g_logits.shape == (64, 100) and g_map.shape == (64, 8, 8, 256)
  assert np.all(np.isfinite(g_logits)) and np.all(np.isfinite(g_map))
