"""colabs/ptloss.ipynb runs top to bottom (small setting) without an error."""

import os
import pathlib

import nbformat
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_ptloss_colab_executes(monkeypatch):
  monkeypatch.setenv("KD_JAX_COLAB_SMALL", "1")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
      [str(ROOT), os.environ.get("PYTHONPATH", "")]))
  nb = nbformat.read(ROOT / "colabs" / "ptloss.ipynb", as_version=4)
  NotebookClient(nb, timeout=300, kernel_name="python3",
                 resources={"metadata": {"path": str(ROOT)}}).execute()
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
  assert not [o for o in outputs if o.output_type == "error"]
  images = [o for o in outputs if "image/png" in o.get("data", {})]
  assert len(images) == 3, f"expected 3 plots, got {len(images)}"
  text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
  assert "teacher test accuracy" in text and "selected candidate" in text
