"""The notebooks run top to bottom (small settings), so they never rot."""

import os

import nbformat
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quickstart_runs_top_to_bottom(monkeypatch):
  # The kernel inherits this environment: few steps, CPU, no conftest (one device).
  monkeypatch.setenv("KD_JAX_QUICKSTART_STEPS", "16")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("MPLBACKEND", "Agg")
  nb = nbformat.read(os.path.join(ROOT, "colabs", "quickstart.ipynb"), as_version=4)
  client = NotebookClient(nb, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": ROOT}})
  client.execute()
  outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                    for o in c.get("outputs", []))
  assert "KD per example" in outputs
  assert "error: unknown loss term 'kdd'" in outputs
  assert "teacher test accuracy" in outputs
  for name in ("student (ce)", "KD", "SP"):
    assert f"{name:14s} test accuracy" in outputs
