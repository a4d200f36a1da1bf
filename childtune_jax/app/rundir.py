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

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from typing import Any

from childtune_jax import parallel
from childtune_jax.app import config, files, interrupts, modes, plots, preflight, summary
from childtune_jax.app.errors import UsageError
from childtune_jax.app.tasks import Task

try:
  import fcntl
except ImportError:  # not POSIX: no lock (one command at a time is then the user's to keep)
  fcntl = None

logger = logging.getLogger("childtune")

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
  """What childtune wrote in ``out``: its seed folders, the summary and its curves."""
  return [n for n in sorted(os.listdir(out))
          if is_seed_dir(out, n) or n in (files.SUMMARY_FILE, files.CURVES_FILE)
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


# -- which finished seeds belong to one experiment ------------------------------------------

# Config fields that do not change a run's numbers: seeds that differ only in these summarise
# together.
_BOOKKEEPING = ("seed", "save_every", "save_model", "mesh")  # a run resumes on another mesh


def filled(recorded: dict) -> dict:
  """A run's config, an older run's filled with the defaults of what it did not record."""
  defaults = {f.name: f.default for f in dataclasses.fields(config.TrainConfig)}
  return {**defaults, "backend": "hf-flax", **recorded}  # runs before the NNX models were HF's


def experiment(recorded: dict) -> dict:
  """A run's config without its seed and bookkeeping, older results filled with defaults.

  The p of a mode without a child network (vanilla) changes nothing either: it is left out.
  """
  full = filled(recorded)
  mode = modes.MODES.get(full["mode"])
  unused = ("reserve_p",) if mode is not None and mode.p_of is None else ()
  return {k: v for k, v in full.items() if k not in _BOOKKEEPING + unused}


def other_seeds(out: str, results: dict[int, dict], cfg: Any) -> dict[int, dict]:
  """Finished runs of the same experiment already in ``out``, beyond this call's seeds.

  The summary describes the folder: ``--seeds 42`` then ``--seeds 52`` into one folder
  summarises both. A finished seed with another config is left out, with a warning.
  """
  this = experiment(dataclasses.asdict(cfg))
  found = {}
  for name in sorted(os.listdir(out)):
    path = os.path.join(out, name, files.RESULTS_FILE)
    if not (name.startswith("seed-") and name[5:].lstrip("-").isdigit()
            and os.path.isfile(path)):
      continue
    seed = int(name[5:])
    if seed in results:
      continue
    try:
      with open(path) as f:
        res = json.load(f)
      res["config"], res["metrics"]  # noqa: B018 - what a summary reads
    except (OSError, ValueError, KeyError, TypeError):
      logger.warning("%s is not a readable results.json: left out of the summary", path)
      continue
    if experiment(res.get("config", {})) != this:
      logger.warning("%s was run with another config: left out of the summary", name)
      continue
    found[seed] = res
  return found


def check_same_run(seed_dir: str, cfg: Any) -> None:
  """Refuses to resume (or reuse) a seed folder that another configuration wrote."""
  for name in (files.RESULTS_FILE, files.RUN_FILE):
    path = os.path.join(seed_dir, name)
    if not os.path.exists(path):
      continue
    try:
      with open(path) as f:
        saved = json.load(f)["config"]
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise UsageError(f"cannot read {path} ({type(e).__name__}): delete {seed_dir} to run "
                       "that seed again") from None
    want, got = experiment(dataclasses.asdict(cfg)), experiment(saved)
    differ = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
    if differ:
      now, then = filled(dataclasses.asdict(cfg)), filled(saved)
      fields = ", ".join(f"{k}={then.get(k)!r} (now {now.get(k)!r})" for k in differ)
      raise UsageError(f"{seed_dir} was run with another configuration: {fields}; use another "
                       "--output-dir, or --overwrite to replace it")
    return


# -- a command's seeds, run safely in the folder --------------------------------------------


@contextlib.contextmanager
def output_folder(args: argparse.Namespace) -> Iterator[None]:
  """The output folder, locked against other commands (process 0 holds the lock) while the
  block runs, after what an interrupted ``--overwrite`` left is put right; a finished run
  there needs ``--resume`` or ``--overwrite``."""
  out = args.output_dir
  primary = parallel.is_primary()
  with locked(out) if primary else contextlib.nullcontext():
    if primary:
      recover(out)
    parallel.barrier("recovered")
    if finished(out) and not (args.resume or args.overwrite):
      raise UsageError(f"{out} already holds a finished run: pass --resume or --overwrite")
    yield


def run_seeds(args: argparse.Namespace, cache: str | None, task: Task,
               config: Callable[[int], Any], run: Callable[[Any, str], dict]) -> dict:
  """Runs ``run(config(seed), seed_dir)`` for every seed of ``args``, safely; the summary.

  Before anything runs, every seed is checked against what its folder holds (a resume of
  another configuration is refused). ``--overwrite`` trains beside the old run and
  replaces it only once every seed has finished: a failure or an interrupt on the way
  leaves the old run as it was. Only process 0 writes.
  """
  out = args.output_dir
  for seed in args.seeds:  # before anything runs: a mismatch touches nothing
    if args.resume:
      check_same_run(os.path.join(out, f"seed-{seed}"), config(seed))
    elif not args.overwrite and os.path.isdir(out) and is_seed_dir(out, f"seed-{seed}"):
      raise UsageError(f"{out} holds an unfinished run of seed {seed}: pass --resume to continue "
                       "it or --overwrite to replace it")
  # --overwrite runs beside the old run and replaces it only once every seed has finished:
  # a failure or an interrupt on the way leaves the old run as it was.
  staging = args.overwrite and os.path.isdir(out) and bool(own_entries(out))
  run_root = os.path.join(out, STAGING) if staging else out
  primary = parallel.is_primary()  # in a multi-host run, the one process that writes
  parallel.barrier("checked")  # every process has looked at the old run before it changes
  if staging and primary and os.path.exists(run_root):
    logger.warning("removing %s, the unfinished new run of an interrupted --overwrite", run_root)
    shutil.rmtree(run_root)
  if primary:
    os.makedirs(run_root, exist_ok=True)
  parallel.barrier("staged")
  results = {}
  try:
    with preflight.compilation_cache(cache):
      for seed in args.seeds:
        seed_dir = os.path.join(run_root, f"seed-{seed}")
        done = os.path.join(seed_dir, files.RESULTS_FILE)
        if args.resume and os.path.exists(done):
          with open(done) as f:
            results[seed] = json.load(f)
          logger.info("seed %d already finished", seed)
          continue
        results[seed] = run(config(seed), seed_dir)
        logger.info("seed %d: %s", seed, json.dumps(results[seed]["metrics"]))
  except BaseException:  # the old run stays exactly as it was
    if staging and primary:
      shutil.rmtree(run_root, ignore_errors=True)
    raise
  if staging and primary:
    with interrupts.deferred():  # the swap is not cut short half way
      replace_run(out, run_root)
  parallel.barrier("replaced")
  results.update(other_seeds(out, results, config(args.seeds[0])))
  summarized = summary.summarize(results, task)
  summarized["mode"] = args.mode
  if primary:
    files.write_json(os.path.join(out, files.SUMMARY_FILE), summarized)
    plots.write_curves(out, [os.path.join(out, f"seed-{s}") for s in sorted(results)])
  print(summary.format_table([(args.mode, summarized)]))
  return summarized
