"""Sphinx configuration: the guides (Markdown, MyST) and the API reference
generated from the docstrings. CI builds it with warnings as errors."""

import optax_accum

project = "optax_accum"
release = optax_accum.__version__
extensions = [
  "myst_parser",
  "sphinx.ext.autodoc",
  "sphinx.ext.napoleon",
  "sphinx.ext.mathjax",
]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build"]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
napoleon_custom_sections = [("Update keyword arguments", "params_style")]
myst_heading_anchors = 2
html_theme = "alabaster"
