"""Sphinx configuration of the mpisgd user guide.

The API reference is autodoc over the package's docstrings (Google style, read by napoleon); the table
of ``MPISGD_*`` variables is rendered from :data:`mpisgd.environment.VARIABLES`, the one place that
declares them, so the page cannot drift from the code.
"""

from __future__ import annotations

import sys
from pathlib import Path

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mpisgd  # noqa: E402  (after the path: the docs build from a checkout)
from mpisgd.environment import VARIABLES  # noqa: E402
from mpisgd.errors import ConfigError  # noqa: E402

project = "mpisgd"
author = "the mpisgd authors"
copyright = "the mpisgd authors"
release = version = mpisgd.__version__

extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon"]
exclude_patterns = ["_build"]
html_theme = "alabaster"
html_static_path: list[str] = []

autodoc_mock_imports = ["cupy"]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
nitpicky = False


def accepted_values(name: str) -> str:
    """What a variable accepts, in the words of its own parser's errors ("must be ..."), from two probes."""
    phrases: list[str] = []
    for probe in ("\x00not a value", "-1"):
        try:
            VARIABLES[name].parse(name, probe)
        except ConfigError as exc:
            phrase = str(exc).split(" must be ", 1)[-1].split(", got ", 1)[0]
            if phrase not in phrases:
                phrases.append(phrase)
    return " ".join(phrases) or "text"


class EnvironmentTable(SphinxDirective):
    """``.. mpisgd-environment::``: one row per declared ``MPISGD_*`` variable."""

    has_content = False

    def run(self) -> list[nodes.Node]:
        lines = [".. list-table::", "   :header-rows: 1", "   :widths: 30 25 45", "",
                 "   * - variable", "     - accepts", "     - meaning"]
        for name in sorted(VARIABLES):
            lines += [f"   * - ``{name}``", f"     - {accepted_values(name)}",
                      f"     - {VARIABLES[name].meaning}"]
        container = nodes.container()
        self.state.nested_parse(StringList(lines, source="mpisgd.environment.VARIABLES"), 0, container)
        return container.children


def setup(app: Sphinx) -> dict[str, object]:
    app.add_directive("mpisgd-environment", EnvironmentTable)
    return {"parallel_read_safe": True}
