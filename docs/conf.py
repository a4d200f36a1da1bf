"""Sphinx configuration of the childtune-jax documentation (MyST Markdown, autodoc).

Build: ``sphinx-build -W -b html docs docs/_build/html`` (warnings are errors, as in CI).
"""

import os
import sys

sys.path.insert(0, os.path.abspath("_ext"))

import childtune_jax  # noqa: E402

project = "childtune-jax"
author = "the childtune-jax authors"
copyright = "2026, the childtune-jax authors"  # noqa: A001
release = version = childtune_jax.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "childtune_help",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build"]
myst_enable_extensions = ["colon_fence", "dollarmath"]
myst_heading_anchors = 3

autodoc_typehints = "description"
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # a NamedTuple's "Attributes:" would describe its fields twice
# Type names in signatures that Sphinx cannot resolve to a page of ours are not errors.
nitpicky = False

html_theme = "furo"
html_title = f"childtune-jax {release}"
