"""Sphinx configuration: ``sphinx-build -W -b html docs docs/_build/html`` (see README)."""

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # train/ is documented too and is run from the root, not installed

project = "aacn_jax"
author = "aacn_jax authors"
copyright = "2026, aacn_jax authors"

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]
source_suffix = {".md": "markdown"}
myst_heading_anchors = 3
exclude_patterns = ["_build"]
nitpicky = True
autodoc_member_order = "bysource"
autodoc_typehints = "description"
# A model's dtype field would be described twice (its "Attributes:" entry and the field itself).
autodoc_default_options = {"show-inheritance": False, "exclude-members": "dtype"}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
html_theme = "furo"
html_title = "aacn_jax"
# Every reference inside the project must resolve; other projects' types are not linked (no
# network at build time, so no intersphinx).
nitpick_ignore_regex = [
    ("py:.*", r"(jax|jaxlib|flax|optax|numpy|ml_collections|collections|typing|orbax|grain)(\..*)?"),
    ("py:class", "ArrayTree"),  # flax's TrainState annotations, unqualified
    ("py:class", r"aacn_jax\.models\.mnasnet\.MBConvStage"),  # a field's type: the block table's rows
]
