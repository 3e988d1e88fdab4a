"""Runs the notebooks top to bottom at their full size and stores them with their outputs.

  python colabs/execute.py                      # every notebook in colabs/
  python colabs/execute.py refilled hetcomp     # some of them (names without .ipynb)
  KD_JAX_DATA_DIR=path/to/ml-100k python colabs/execute.py hetcomp

The kernel (python3) runs in the repository root with it on PYTHONPATH and JAX on the CPU.
Volatile metadata (execution timestamps, the kernel's exact Python version) is dropped, so a
rerun changes only the outputs. Prints each notebook's wall time and stored size.
"""

import os
import sys
import time

import nbformat
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLABS = os.path.join(ROOT, "colabs")
MAX_BYTES = 1_000_000


def strip_volatile(nb) -> None:
  """Drops execution timestamps and the kernel's version details from `nb` (in place)."""
  for cell in nb.cells:
    cell.metadata.pop("execution", None)
    cell.metadata.pop("ExecuteTime", None)
  nb.metadata["language_info"] = {"name": "python"}
  nb.metadata.pop("widgets", None)


def execute(name: str) -> None:
  path = os.path.join(COLABS, name + ".ipynb")
  if not os.path.exists(path):
    raise SystemExit(f"error: no notebook {path}")
  nb = nbformat.read(path, as_version=4)
  os.environ.pop("KD_JAX_COLAB_SMALL", None)  # full size
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH"))
                                             if p)
  start = time.time()
  NotebookClient(nb, timeout=3600, kernel_name="python3",
                 resources={"metadata": {"path": ROOT}}).execute()
  strip_volatile(nb)
  nbformat.write(nb, path)
  size = os.path.getsize(path)
  print(f"{name}: {time.time() - start:.0f} s, {size / 1e3:.0f} kB")
  if size > MAX_BYTES:
    print(f"warning: {path} is over {MAX_BYTES / 1e6:.0f} MB", file=sys.stderr)


def main(argv) -> None:
  names = argv or sorted(f[:-6] for f in os.listdir(COLABS) if f.endswith(".ipynb"))
  for name in names:
    execute(name.removesuffix(".ipynb"))


if __name__ == "__main__":
  main(sys.argv[1:])
