"""Sphinx configuration of the kd_jax API reference site.

Build from the repository root (warnings are errors):

    python -m sphinx -c docs_site -W --keep-going -q -b html . build/docs

The source directory is the repository root, so the README, the method pages under docs/, the
benchmarks' README and every notebook colabs/*.ipynb are pages as they stand (notebooks are
rendered with their stored outputs, never executed). The API pages under docs_site/api/ are
written from the docstrings (Google style) by autodoc and napoleon.
"""

import pathlib
import pkgutil
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import kd_jax  # noqa: E402

project = "kd_jax"
author = "kd_jax authors"
copyright = "kd_jax authors"  # noqa: A001
release = version = kd_jax.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "myst_nb",  # brings myst_parser for the Markdown pages
]

root_doc = "docs_site/index"
include_patterns = [
    "README.md",
    "docs/*.md",
    "benchmarks/README.md",
    "colabs/*.ipynb",
    "docs_site/*.md",
    "docs_site/api/*.rst",
]
exclude_patterns = ["build", ".ci-venv", ".venv", "**/.ipynb_checkpoints"]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}

# Markdown and notebooks.
myst_heading_anchors = 4  # GitHub-style anchors, for links such as training.md#pytorch-teachers
myst_enable_extensions = ["dollarmath"]
nb_execution_mode = "off"  # the test suite executes the notebooks; the site shows them as stored

# Docstrings.
autodoc_member_order = "bysource"
autodoc_default_options = {"show-inheritance": True}
autodoc_mock_imports = ["torch"]  # kd_jax.models.torch_reference is the PyTorch side
default_role = "code"  # `x` in a docstring is code, as in the Markdown pages
add_module_names = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # `Attributes:` as fields, not a second description of each attribute

html_theme = "furo"
html_title = f"kd_jax {release}"
templates_path = []
html_static_path = []
html_extra_path = ["_extra"]  # index.html at the site root, pointing at docs_site/index.html


def _public_modules():
  """Every importable kd_jax module whose dotted name has no `_`-prefixed part."""
  names = ["kd_jax"]
  for info in pkgutil.walk_packages(kd_jax.__path__, "kd_jax."):
    if not any(part.startswith("_") for part in info.name.split(".")):
      names.append(info.name)
  return names


def _check_api_pages(app):
  """Warn (an error under -W) about a public module that no page under docs_site/api/ documents."""
  from sphinx.util import logging  # pylint: disable=g-import-not-at-top
  documented = set()
  for page in (ROOT / "docs_site" / "api").glob("*.rst"):
    documented.update(re.findall(r"^\.\. automodule:: (\S+)", page.read_text(), re.M))
  documented.add("kd_jax")  # the package itself has only its version
  for name in _public_modules():
    if name not in documented:
      logging.getLogger(__name__).warning(
          "public module %s has no automodule directive in docs_site/api/*.rst", name)


def setup(app):
  app.connect("builder-inited", _check_api_pages)
