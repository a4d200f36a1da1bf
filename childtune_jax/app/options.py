"""argparse from the configs: each flagged field of :mod:`.config` becomes its option.

An option's argparse default is ``None`` (``False`` for a switch), so that a command can
tell what was given; the field's own default applies in :func:`config.from_args`. Mode
options list the modes that take them (from the registry) in their help.
"""

from __future__ import annotations

import argparse
from typing import Any

from childtune_jax.app import config, modes


class Parser(argparse.ArgumentParser):
  """argparse with errors in one line (no usage block), as every other error:
  ``childtune: error: ... (see childtune train --help)``."""

  def error(self, message: str) -> None:
    self.exit(2, f"childtune: error: {message} (see {self.prog} --help)\n")


def _default_text(field: Any, fl: config.Flag) -> str:
  if fl.preset or fl.switch or field.default in (None, (), "") or "default" in fl.help:
    return ""
  default = field.default
  if isinstance(default, tuple):
    default = " ".join(map(str, default))
  return f" (default {default})"


def _value_kwargs(field: Any, fl: config.Flag) -> dict[str, Any]:
  """What an option that takes a value passes to argparse: its type, choices, metavar, and
  ``nargs`` for a tuple field (or ``append`` for a repeatable one)."""
  kwargs: dict[str, Any] = {}
  if fl.type is not None:
    kwargs["type"] = fl.type
  if fl.choices is not None:
    kwargs["choices"] = fl.choices
  if fl.metavar is not None:
    kwargs["metavar"] = fl.metavar
  if fl.repeat:
    kwargs["action"] = "append"
  elif isinstance(field.default, tuple):
    kwargs["nargs"] = "+"
  return kwargs


def add_flags(parser: argparse.ArgumentParser, cls: type, command: str,
              groups: dict[str, Any] | None = None) -> None:
  """Adds an option for every field of ``cls`` that ``command`` offers."""
  groups = {} if groups is None else groups
  for field, fl in config.flags(cls):
    if command not in fl.commands:
      continue
    if fl.group and fl.group not in groups:
      groups[fl.group] = parser.add_argument_group(fl.group)
    target = groups[fl.group] if fl.group else parser
    takers = modes.owners(field.name, command)
    help_text = (fl.help + _default_text(field, fl)).strip()
    if takers and not help_text.startswith("mode"):
      help_text = f"mode {' or '.join(takers)}: {help_text}"
    kwargs: dict[str, Any] = {"help": help_text.replace("%%", "%").replace("%", "%%")}
    if fl.switch:
      kwargs.update(action="store_true", dest=fl.dest)
    else:
      kwargs.update(default=None, dest=fl.dest, **_value_kwargs(field, fl))
    target.add_argument(fl.name, **kwargs)


def add_run_options(parser: argparse.ArgumentParser, cls: type, command: str) -> None:
  """A training command's options: the mode, the config's fields and the run options."""
  offered = modes.for_command(command)
  parser.add_argument("--mode", choices=list(offered), required=True,
                      help="; ".join(f"{name}: {m.help}" for name, m in offered.items()))
  groups: dict[str, Any] = {}
  run_fields = [(f, fl) for f, fl in config.flags(config.RunOptions)
                if fl.dest not in ("resume", "overwrite")]
  for field, fl in run_fields:
    if command not in fl.commands:
      continue
    if fl.group and fl.group not in groups:
      groups[fl.group] = parser.add_argument_group(fl.group)
    target = groups[fl.group] if fl.group else parser
    default = list(field.default) if isinstance(field.default, tuple) else field.default
    kwargs: dict[str, Any] = {"help": fl.help + _default_text(field, fl), "default": default,
                              **_value_kwargs(field, fl)}
    if fl.dest == "preset":
      from childtune_jax.app import presets

      kwargs["choices"] = sorted(presets.PRESETS)
      kwargs["help"] = presets.describe_option()
    if fl.dest == "output_dir":
      kwargs["required"] = True
    target.add_argument(fl.name, **kwargs)
  add_flags(parser, cls, command, groups)
  again = parser.add_mutually_exclusive_group()
  for _, fl in config.flags(config.RunOptions):
    if fl.dest in ("resume", "overwrite"):
      again.add_argument(fl.name, action="store_true", help=fl.help)


def resolve(args: argparse.Namespace, cls: type, command: str) -> argparse.Namespace:
  """Fills in the defaults of the options of ``cls`` and :class:`config.RunOptions` that
  were not given (or that ``command`` does not offer), but for those ``--preset`` fills and
  the mode options (left ``None``: not given, which the mode checks read)."""
  for c in (cls, config.RunOptions):
    for field, fl in config.flags(c):
      offered = command in fl.commands
      if fl.switch:
        if not hasattr(args, fl.dest):
          setattr(args, fl.dest, False)
      elif not offered or (getattr(args, fl.dest, None) is None and not fl.preset
                           and not modes.owners(field.name, command)):
        if getattr(args, fl.dest, None) is None:
          default = field.default
          setattr(args, fl.dest, list(default) if isinstance(default, tuple) else default)
  return args
