"""Interrupts as the command line treats them: SIGTERM as Ctrl-C, and writes that finish first.

A run stopped by Ctrl-C or SIGTERM exits 130 with one line. While a checkpoint or a
finished run's files are being written, both signals wait (:func:`deferred`): the write
completes, then the interrupt is raised, so that no orbax thread is cut off mid-save (whose
tracebacks would bury the one line) and nothing is left half-written.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _raise(signum: int, frame: Any) -> None:
  del frame
  raise KeyboardInterrupt(signal.Signals(signum).name)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
  """SIGTERM raises ``KeyboardInterrupt`` while the block runs (main thread only)."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  previous = signal.signal(signal.SIGTERM, _raise)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
  """Holds SIGINT and SIGTERM back until the block is done, then raises ``KeyboardInterrupt``
  if one came (main thread only; elsewhere the block runs as it is)."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  caught: list[int] = []
  previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in SIGNALS}
  try:
    yield
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
  if caught:
    raise KeyboardInterrupt(signal.Signals(caught[0]).name)
