"""Where a command's examples come from: the task's folder, your own files, or the hub.

Each function reads the command's arguments and returns the splits by name, checked
(labels, text, sizes) before anything is written.
"""

from __future__ import annotations

import argparse

from childtune_jax.app import data, lmdata, prompts
from childtune_jax.app.errors import UsageError
from childtune_jax.app.lmdata import Pairs
from childtune_jax.app.tasks import TASKS, Task, eval_split_names


def load_checked(args: argparse.Namespace, task: Task):
  """:func:`load_data`, the checks its splits allow before any seed runs, and how many
  examples every seed trains on."""
  train_set, evals = load_data(args, task)
  # the sizes of a seed's splits do not depend on the seed: drawn (and checked) once, early
  train, _ = data.training_split(train_set, args.max_train_samples, args.selection_samples, 0)
  for split in evals.values():
    if task.is_regression and len(split) < 2:
      raise UsageError(f"{split.source}: {task.name} needs at least 2 evaluation examples for "
                       f"its correlations, got {len(split)}")
  return train_set, evals, len(train)


def eval_tasks_of(specs: list[str] | None, task: Task) -> list[tuple[Task, str]]:
  """``--eval-task TASK[:SPLIT]`` as (task, split) pairs; the labels must be the run's own."""
  out = []
  for spec in specs or []:
    name, _, split = spec.partition(":")
    other = TASKS.get(name)
    if other is None:
      raise UsageError(f"--eval-task {spec!r}: unknown task {name!r} "
                       f"(one of {', '.join(sorted(TASKS))})")
    if other.labels != task.labels:
      raise UsageError(f"--eval-task {spec!r}: {name}'s labels {other.labels} are not "
                       f"{task.name}'s {task.labels}")
    out.append((other, split or eval_split_names(other)[-1]))
  return out


def text_columns(args: argparse.Namespace) -> list[str]:
  """Your own files' ``--text-columns`` (one or two), checked with ``--label-column``."""
  if not args.text_columns or not args.label_column:
    raise UsageError("your own files need --text-columns A[,B] and --label-column L")
  cols = [c for c in args.text_columns.split(",") if c]
  if not 1 <= len(cols) <= 2:
    raise UsageError(f"--text-columns takes one or two names, got {args.text_columns!r}")
  if args.label_column in cols:
    raise UsageError(f"--label-column {args.label_column} is also one of --text-columns: the "
                     "label would be fed to the model as text")
  if len(set(cols)) != len(cols):
    raise UsageError(f"--text-columns names {cols[0]} twice")
  return cols


def load_data(args: argparse.Namespace, task: Task):
  own = [args.train_file, args.validation_file]
  eval_tasks = eval_tasks_of(args.eval_task, task)
  if not args.data_dir and (eval_tasks or args.train_split != "train"):
    raise UsageError("--eval-task and --train-split read from --data-dir")
  if any(own):
    if not all(own):
      raise UsageError("--train-file and --validation-file go together")
    if args.data_dir:
      raise UsageError("use either --data-dir or --train-file/--validation-file")
    cols = text_columns(args)
    train = data.read_user_file(task, args.train_file, cols, args.label_column)
    evals = {"dev": data.read_user_file(task, args.validation_file, cols, args.label_column)}
  elif args.data_dir:
    train, evals = data.load_glue_folder(task, args.data_dir, args.train_split)
  else:
    train, evals = data.load_hf_glue(task)
  if args.heldout_samples:  # before any seed's draws: the same held-out examples for all
    train, evals["heldout"] = data.split_heldout(train, args.heldout_samples)
  for other, split in eval_tasks:
    evals[f"{other.name}/{split}"] = data.read_split(other, args.data_dir, split)
  return train, evals


def evaluation_splits(args: argparse.Namespace, task: Task) -> dict[str, data.Examples]:
  """``childtune evaluate``'s splits by name, read (and checked) before the model loads."""
  eval_tasks = eval_tasks_of(args.eval_task, task)
  if eval_tasks and not args.data_dir:
    raise UsageError("--eval-task reads from --data-dir")
  if args.validation_file:
    if args.data_dir or args.split:
      raise UsageError("use either --validation-file or --data-dir/--split")
    evals = {"validation": data.read_user_file(task, args.validation_file, text_columns(args),
                                               args.label_column)}
  elif args.data_dir:
    evals = {name: data.read_split(task, args.data_dir, name)
             for name in args.split or eval_split_names(task)}
  else:
    _, evals = data.load_hf_glue(task)
    unknown = sorted(set(args.split or []) - set(evals))
    if unknown:
      raise UsageError(f"--split {unknown[0]}: {task.name}'s splits are {', '.join(evals)}")
    evals = {name: evals[name] for name in args.split or evals}
  for other, split in eval_tasks:
    evals[f"{other.name}/{split}"] = data.read_split(other, args.data_dir, split)
  return evals


def load_pairs(args: argparse.Namespace) -> tuple[Task | None, Pairs, dict[str, Pairs],
                                                  dict[str, list[str]], int]:
  """``childtune sft``'s data: the task (``None`` for your own pairs), the training pairs,
  the evaluation pairs by name, the plain texts by name, and how many pairs a seed trains on.

  A task comes from ``--data-dir`` rendered by its template; your own pairs from
  ``--train-file`` and ``--validation-file``. ``--eval-task`` renders any task with a
  template (scored zero-shot by answer likelihood), ``--eval-text NAME=FILE`` a plain text.
  """
  own = [args.train_file, args.validation_file]
  if any(own) and args.task:
    raise UsageError("use either --task (with --data-dir) or --train-file/--validation-file")
  if not any(own) and not args.task:
    raise UsageError("give --task (with --data-dir) or --train-file and --validation-file")
  if any(own) and not all(own):
    raise UsageError("--train-file and --validation-file go together")
  if (args.eval_task or args.train_split != "train") and not args.data_dir:
    raise UsageError("--eval-task and --train-split read from --data-dir")
  task = None
  if args.task:
    if not args.data_dir:
      raise UsageError("--task reads from --data-dir (a folder in the GLUE layout)")
    task, template = prompts.template(args.task)
    examples, evals = data.load_glue_folder(task, args.data_dir, args.train_split)
    if args.heldout_samples:
      examples, evals["heldout"] = data.split_heldout(examples, args.heldout_samples)
    train = lmdata.from_examples(examples, template)
    pairs = {name: lmdata.from_examples(v, template) for name, v in evals.items()}
  else:
    train = lmdata.read_pairs(args.train_file, args.prompt_column, args.response_column)
    pairs = {"dev": lmdata.read_pairs(args.validation_file, args.prompt_column,
                                      args.response_column)}
    if args.heldout_samples:
      train, pairs["heldout"] = data.split_heldout(train, args.heldout_samples)
  for spec in args.eval_task or []:
    name, _, split = spec.partition(":")
    other, template = prompts.template(name)
    split = split or eval_split_names(other)[-1]
    examples = data.subsample(data.read_split(other, args.data_dir, split), args.eval_samples,
                              0)  # the same subset for every seed and run
    pairs[f"{other.name}/{split}"] = lmdata.from_examples(examples, template)
  texts = {}
  for spec in args.eval_text or []:
    name, sep, path = spec.partition("=")
    if not sep or not name or "/" in name:
      raise UsageError(f"--eval-text {spec!r}: give NAME=FILE (a name without '/')")
    texts[name] = lmdata.read_texts(path)
  n_train, _ = data.training_split(train, args.max_train_samples, args.selection_samples, 0)
  return task, train, pairs, texts, len(n_train)
