"""The errors the command line reports in one line, and the exit status of each.

``main`` maps them: :class:`UsageError` (and the data, model and checkpoint errors, which
are bad input too) exit 2; :class:`TrainingFailed` and ``OSError`` 1; an interrupt 130.
"""

from __future__ import annotations


class UsageError(Exception):
  """Bad input or options: printed as one line, exit status 2."""


class TrainingFailed(RuntimeError):
  """A run that cannot finish (e.g. a non-finite loss): exit status 1, last good checkpoint kept."""
