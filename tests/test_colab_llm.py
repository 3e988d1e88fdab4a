"""colabs/llm_distillation.ipynb runs top to bottom (small setting) without an error."""

import math
import os
import pathlib
import re

import nbformat
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_llm_distillation_colab_executes(monkeypatch):
  monkeypatch.setenv("KD_JAX_COLAB_SMALL", "1")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
      [str(ROOT), os.environ.get("PYTHONPATH", "")]))
  nb = nbformat.read(ROOT / "colabs" / "llm_distillation.ipynb", as_version=4)
  NotebookClient(nb, timeout=300, kernel_name="python3",
                 resources={"metadata": {"path": str(ROOT)}}).execute()
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
  assert not [o for o in outputs if o.output_type == "error"]
  assert len([o for o in outputs if "image/png" in o.get("data", {})]) == 1
  text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
  assert "teacher:" in text and "--- teacher" in text
  for name in ("cross-entropy", "forward KL", "reverse KL", r"JSD \(beta=0.5\)"):
    row = re.search(rf"^{name} +((?:[-0-9.naninf]+ *){{4}})$", text, re.M)
    assert row, f"no result row for {name}"
    assert all(math.isfinite(float(v)) for v in row.group(1).split())
