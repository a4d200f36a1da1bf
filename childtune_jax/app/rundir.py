"""The output folder of a run: its lock, its seed folders, and ``--overwrite``'s replace.

An output folder ``OUT`` holds a seed folder per seed (``seed-<n>/``, see
:mod:`childtune_jax.app.files`) and ``summary.json``; a user's own files beside them are
never touched. One command at a time works on a folder: :func:`locked` holds an advisory
lock on ``OUT/.childtune.lock`` for the whole command, and refuses a second one.
``--overwrite`` trains beside the old run, in ``OUT/.childtune-overwrite/``, and
:func:`replace_run` swaps the two only when every seed has finished, undoing every move if
one fails; :func:`recover` finishes or undoes a swap that a killed process left half done.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Iterator

from childtune_jax.app import files
from childtune_jax.app.errors import UsageError

try:
  import fcntl
except ImportError:  # not POSIX: no lock (one command at a time is then the user's to keep)
  fcntl = None

logger = logging.getLogger(__name__)

LOCK_FILE = ".childtune.lock"  # held by the command working on the folder
STAGING = ".childtune-overwrite"  # where --overwrite runs until it replaces the old run
OLD = STAGING + "-old"  # the old run, moved aside while the new one moves in
REPLACED = ".replaced"  # in OLD: the new run is wholly in place; OLD may go


@contextlib.contextmanager
def locked(out: str) -> Iterator[None]:
  """Holds the lock of the output folder ``out`` while the block runs.

  Raises :class:`UsageError` if another command holds it. A folder that this call made,
  and that nothing else was written into, is removed again at the end.
  """
  if fcntl is None:
    yield
    return
  created = not os.path.lexists(out)
  os.makedirs(out, exist_ok=True)
  path = os.path.join(out, LOCK_FILE)
  while True:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      os.close(fd)
      raise UsageError(f"{out} is in use by another childtune command (it holds {path}); "
                       "wait for it to finish, or use another --output-dir") from None
    try:  # the holder before us may have removed the file after we opened it: try again
      if os.stat(path).st_ino == os.fstat(fd).st_ino:
        break
    except FileNotFoundError:
      pass
    os.close(fd)
  try:
    yield
  finally:
    os.remove(path)  # while still held: no one else locks the removed file
    os.close(fd)
    if created:
      with contextlib.suppress(OSError):
        os.rmdir(out)  # only if empty


def is_seed_dir(out: str, name: str) -> bool:
  """``seed-<n>`` folders that childtune wrote (a user's ``seed-42-backup/`` is not one)."""
  path = os.path.join(out, name)
  return (name.startswith("seed-") and name[5:].isdigit() and os.path.isdir(path)
          and any(os.path.exists(os.path.join(path, f)) for f in files.SEED_FILES))


def own_entries(out: str) -> list[str]:
  """What childtune wrote in ``out``: its seed folders and the summary."""
  return [n for n in sorted(os.listdir(out))
          if is_seed_dir(out, n) or n == files.SUMMARY_FILE
          and os.path.isfile(os.path.join(out, n))]


def finished(out: str) -> bool:
  """Whether ``out`` holds a finished run (a summary, or a finished seed)."""
  if os.path.exists(os.path.join(out, files.SUMMARY_FILE)):
    return True
  return os.path.isdir(out) and any(
      os.path.exists(os.path.join(out, d, files.RESULTS_FILE)) for d in os.listdir(out))


def _move_all(pairs: list[tuple[str, str]]) -> None:
  """``os.replace`` each ``(source, target)``, in order; on a failure, every move is undone."""
  done: list[tuple[str, str]] = []
  try:
    for source, target in pairs:
      os.replace(source, target)
      done.append((source, target))
  except OSError:
    for source, target in reversed(done):
      os.replace(target, source)
    raise


def replace_run(out: str, staged: str) -> None:
  """Moves the finished run in ``staged`` into ``out`` in place of the old one.

  The old run's entries move aside into ``OUT/.childtune-overwrite-old/``, the new ones in,
  and the old folder goes. If a move fails (a file held open elsewhere, another file
  system), every move made is undone: ``out`` holds the old run as it was, the new one
  stays in ``staged``, and the ``OSError`` is raised. A process killed on the way leaves
  what :func:`recover` puts right.
  """
  old = os.path.join(out, OLD)
  os.makedirs(old)
  olds = own_entries(out)
  news = sorted(os.listdir(staged))
  try:
    _move_all([(os.path.join(out, n), os.path.join(old, n)) for n in olds]
              + [(os.path.join(staged, n), os.path.join(out, n)) for n in news])
  except OSError as e:
    os.rmdir(old)
    raise OSError(e.errno, f"cannot replace the old run ({e.strerror}); it is untouched and "
                  f"the new one is in {staged}", e.filename) from None
  with open(os.path.join(old, REPLACED), "w"):
    pass
  shutil.rmtree(staged)
  shutil.rmtree(old)


def recover(out: str) -> None:
  """Finishes or undoes a :func:`replace_run` that a killed process left half done.

  With the new run wholly in place the old one is removed; otherwise the new entries go
  back into the staging folder and the old run back into ``out``, as before the swap.
  Either way the log says what was done.
  """
  old = os.path.join(out, OLD)
  if not os.path.isdir(old):
    return
  if os.path.exists(os.path.join(old, REPLACED)):
    logger.warning("%s: an earlier --overwrite had replaced the run when it stopped; removing "
                   "the old run it had moved aside (%s)", out, old)
    shutil.rmtree(old)
    return
  staged = os.path.join(out, STAGING)
  os.makedirs(staged, exist_ok=True)
  names = sorted(os.listdir(old))
  pairs = [(os.path.join(out, n), os.path.join(staged, n)) for n in names
           if os.path.lexists(os.path.join(out, n))]
  pairs += [(os.path.join(old, n), os.path.join(out, n)) for n in names]
  _move_all(pairs)
  os.rmdir(old)
  logger.warning("%s: an earlier --overwrite stopped while replacing the run; the old run "
                 "(%s) is back in place", out, ", ".join(names) or "empty")
