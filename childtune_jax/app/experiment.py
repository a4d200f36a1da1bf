"""``childtune train``, ``multitask`` and ``sft``: from parsed arguments to finished seeds.

Each command checks what it can before anything is written (the options against the mode
registry, the presets' defaults, the devices and folders, the data, the model, the mask
files), then runs its seeds in the locked output folder (:func:`rundir.run_seeds`) and
returns their summary. One seed's run is :func:`childtune_jax.app.train.run` (or
:func:`childtune_jax.app.multitask.run`).
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from typing import Any

from childtune_jax.app import (
    classifier,
    config,
    files,
    lm,
    maskfile,
    modes,
    multitask,
    preflight,
    presets,
    rundir,
    sft,
    sources,
    train,
)
from childtune_jax.app.errors import UsageError
from childtune_jax.app.tasks import TASKS, Task


def mask_files(args: argparse.Namespace, *options: tuple[str, str | None]
               ) -> dict[str, list[str]]:
  """Each ``(option, path)``'s files, one per seed (``{seed}``); a missing one is refused."""
  masks = {option: sorted({files.for_seed(path, seed) for seed in args.seeds}) if path else []
           for option, path in options}
  for paths in masks.values():
    for path in paths:
      if not os.path.isfile(path):
        raise UsageError(f"mask file {path} does not exist")
  return masks


def check_mask_files(args: argparse.Namespace, masks: dict[str, list[str]],
                     shapes: Callable[[], Any]) -> None:
  """Every file of :func:`mask_files` against the model's ``shapes()`` (made once, if any).

  A ``--child-mask`` file must be of the run's ``--reserve-p`` and of its seed, where it
  records them.
  """
  if not any(masks.values()):
    return
  like = shapes()
  for option, paths in masks.items():
    for path in paths:
      rec = maskfile.check(option, path, like)
      if option == "--child-mask":
        for seed in args.seeds:
          if files.for_seed(args.child_mask, seed) == path:
            maskfile.check_given(path, rec, reserve_p=args.reserve_p, seed=seed)


def _prepare(args: argparse.Namespace, task: str | None) -> tuple[list[str], str | None]:
  """The defaults and checks every training command makes once its options are known to
  fit its mode: what the preset filled, and the compilation cache to use."""
  filled = presets.fill_defaults(args, task)
  modes.check_mode(args)
  return filled, preflight.check_run_options(args)


def run_train(args: argparse.Namespace) -> dict:
  """``childtune train``: one task, every seed; the summary."""
  task = TASKS[args.task]
  modes.check_options(args, config.TrainConfig, "train")
  masks = mask_files(args, ("--random-like", args.random_like),
                     ("--child-mask", args.child_mask))
  filled, cache = _prepare(args, task.name)
  with rundir.output_folder(args):
    train_set, evals, n_train = sources.load_checked(args, task)
    batches = math.ceil(n_train / args.batch_size)
    presets.fill_epochs(args, batches, filled)
    modes.check_steps(args, batches)
    preflight.check_model(args.model, args.max_seq_length, args.backend)
    check_mask_files(args, masks, lambda: classifier.param_shapes(args.model, task.num_labels,
                                                                  args.backend))

    def make_config(seed: int) -> config.TrainConfig:
      return config.from_args(config.TrainConfig, args, task=task.name, mode=args.mode,
                              seed=seed)

    return rundir.run_seeds(args, cache, task, make_config,
                            lambda cfg, seed_dir: train.run(cfg, train_set, evals, seed_dir,
                                                            resume=args.resume,
                                                            report_to=args.report_to))


def run_multitask(args: argparse.Namespace) -> dict:
  """``childtune multitask``: the tasks trained together, every seed; the summary."""
  tasks = [TASKS[name] for name in args.tasks]
  if len(set(args.tasks)) != len(args.tasks) or len(tasks) < 2:
    raise UsageError(f"--tasks takes two or more different tasks, got {' '.join(args.tasks)}")
  modes.check_options(args, config.MultitaskConfig, "multitask")
  masks = mask_files(args, ("--child-mask", args.child_mask))
  filled, cache = _prepare(args, None)
  with rundir.output_folder(args):
    loaded = {task.name: sources.load_checked(args, task) for task in tasks}
    datasets = {name: (train_set, evals) for name, (train_set, evals, _) in loaded.items()}
    batches = sum(math.ceil(n / args.batch_size) for _, _, n in loaded.values())
    presets.fill_epochs(args, batches, filled)
    modes.check_steps(args, batches)
    preflight.check_model(args.model, args.max_seq_length, args.backend)
    check_mask_files(args, masks,
                     lambda: multitask.param_shapes(args.model, tasks, args.backend))
    joined = Task(",".join(args.tasks), (), "", None,
                  tuple(dict.fromkeys(m for t in tasks for m in t.metrics)), "")

    def make_config(seed: int) -> config.MultitaskConfig:
      return config.from_args(config.MultitaskConfig, args, task=joined.name, mode=args.mode,
                              seed=seed)

    return rundir.run_seeds(args, cache, joined, make_config,
                            lambda cfg, seed_dir: multitask.run(cfg, datasets, seed_dir,
                                                                resume=args.resume,
                                                                report_to=args.report_to))


def run_sft(args: argparse.Namespace) -> dict:
  """``childtune sft``: a decoder fine-tuned on prompt-response pairs, every seed."""
  modes.check_options(args, config.SFTConfig, "sft")
  masks = mask_files(args, ("--child-mask", args.child_mask))
  filled, cache = _prepare(args, args.task)
  with rundir.output_folder(args):
    task, train_pairs, evals, texts, n_train = sources.load_pairs(args)
    batches = math.ceil(n_train / args.batch_size)
    presets.fill_epochs(args, batches, filled)
    modes.check_steps(args, batches)
    folder = lm.check(args.model, args.max_seq_length)
    check_mask_files(args, masks, lambda: lm.param_shapes(folder))

    def make_config(seed: int) -> config.SFTConfig:
      return config.from_args(config.SFTConfig, args, task=task.name if task else "pairs",
                              mode=args.mode, seed=seed)

    return rundir.run_seeds(args, cache, sft.task_of(task), make_config,
                            lambda cfg, seed_dir: sft.run(cfg, train_pairs, evals, texts,
                                                          seed_dir, task=task,
                                                          resume=args.resume,
                                                          report_to=args.report_to))
