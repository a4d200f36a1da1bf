"""``{childtune-help} COMMAND``: the ``--help`` of a ``childtune`` command, rendered at build
time from the parser itself, so the reference cannot drift from the code."""

from __future__ import annotations

import os

from docutils import nodes
from sphinx.util.docutils import SphinxDirective


class ChildtuneHelp(SphinxDirective):
  required_arguments = 1

  def run(self) -> list[nodes.Node]:
    from childtune_jax.app import cli

    parser = cli.build_parser()
    command = self.arguments[0]
    for action in parser._subparsers._group_actions:  # argparse has no public accessor
      if command in action.choices:
        os.environ["COLUMNS"] = "100"
        text = action.choices[command].format_help()
        return [nodes.literal_block(text, text, language="text")]
    raise self.error(f"childtune has no command {command!r}")


def setup(app):
  app.add_directive("childtune-help", ChildtuneHelp)
  return {"parallel_read_safe": True, "parallel_write_safe": True}
