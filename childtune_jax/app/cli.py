"""The ``childtune`` command line, as wiring: each subcommand's options and the function it calls.

Intentionally kept short, as Flax's ``examples/*/main.py``: a command is an importable
function of its own module (:mod:`.experiment`, :mod:`.evaluate`, :mod:`.overlap`,
:mod:`.demo`), its training options come from the configs (:mod:`.config`, :mod:`.options`)
and its modes from the registry (:mod:`.modes`). :func:`main` maps errors to exit codes.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence

from childtune_jax import parallel
from childtune_jax.app import (
    config,
    demo,
    evaluate,
    experiment,
    generate,
    interrupts,
    lmeval,
    options,
    overlap,
)
from childtune_jax.app.checkpoints import CheckpointError
from childtune_jax.app.classifier import ModelError
from childtune_jax.app.data import DataError
from childtune_jax.app.errors import TrainingFailed, UsageError
from childtune_jax.app.prompts import TEMPLATES
from childtune_jax.app.tasks import TASKS

TRAINING = {"train": config.TrainConfig, "multitask": config.MultitaskConfig,
            "sft": config.SFTConfig}
NOISY_LOGGERS = ("jax._src.xla_bridge", "jax._src.compilation_cache",
                 "transformers.modeling_flax_utils")


def build_parser() -> options.Parser:
  parser = options.Parser(
      prog="childtune",
      description="Fine-tune Flax Hugging Face models with Child-Tuning (Xu et al., EMNLP 2021).")
  sub = parser.add_subparsers(dest="command", required=True)
  train = sub.add_parser("train", help="fine-tune on a GLUE task or your own data")
  train.add_argument("--task", required=True, choices=sorted(TASKS),
                     help="GLUE task (sets the label set and metric)")
  options.add_run_options(train, config.TrainConfig, "train")
  multi = sub.add_parser("multitask", help="several GLUE tasks together: one encoder, a head "
                                           "per task, optionally one shared child network")
  multi.add_argument("--tasks", nargs="+", required=True, choices=sorted(TASKS),
                     metavar="TASK", help="two or more tasks (each with its labels and metric)")
  options.add_run_options(multi, config.MultitaskConfig, "multitask")
  sft = sub.add_parser("sft", help="fine-tune a decoder LM on prompt-response pairs or a task "
                                   "rendered as instructions (SmolLM2 by default)")
  sft.add_argument("--task", choices=sorted(TEMPLATES),
                   help="a task rendered as instructions and answers (with --data-dir); or "
                        "give your own --train-file and --validation-file")
  options.add_run_options(sft, config.SFTConfig, "sft")
  evaluate.add_arguments(sub.add_parser(
      "evaluate", help="score a fine-tuned model on evaluation splits, without training (e.g. "
                       "an SNLI model on SICK)"))
  lmeval.add_arguments(sub.add_parser(
      "lm-evaluate", help="score a decoder without training: tasks by answer likelihood, "
                          "texts by perplexity"))
  generate.add_arguments(sub.add_parser(
      "generate", help="what a decoder writes after a prompt (greedy or sampled, KV cache)"))
  demo.add_arguments(sub.add_parser(
      "demo", help="offline demo: vanilla vs F vs D on a real SST-2 sample"))
  overlap.add_arguments(sub.add_parser(
      "overlap", help="Jaccard overlap of child networks (mask .npz files)"))
  return parser


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
  """The arguments of a command line, a training command's defaults filled in."""
  args = build_parser().parse_args(argv)
  if args.command in TRAINING:
    options.resolve(args, TRAINING[args.command], args.command)
  return args


COMMANDS: dict[str, Callable[[argparse.Namespace], object]] = {
    "train": experiment.run_train,
    "multitask": experiment.run_multitask,
    "sft": experiment.run_sft,
    "evaluate": evaluate.main,
    "lm-evaluate": lmeval.main,
    "generate": generate.main,
    "overlap": overlap.run,
    "demo": lambda args: demo.run(args, parse),
}


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point of ``childtune``; returns the exit status (2 for bad input)."""
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                      datefmt="%H:%M:%S")
  for noisy in NOISY_LOGGERS:
    logging.getLogger(noisy).setLevel(logging.ERROR)
  logging.getLogger("absl").setLevel(logging.CRITICAL)  # orbax: our own errors say it once
  args = parse(argv)
  try:
    with interrupts.sigterm_as_interrupt():
      if args.command not in ("overlap", "generate"):  # several hosts: each places its rows
        parallel.initialize_if_distributed()
      COMMANDS[args.command](args)
  except (UsageError, DataError, ModelError, CheckpointError) as e:
    print(f"childtune: error: {e}", file=sys.stderr)
    return 2
  except TrainingFailed as e:
    print(f"childtune: error: {e}", file=sys.stderr)
    return 1
  except OSError as e:  # a full disk, a folder made read-only on the way, ...
    where = f" ({e.filename})" if e.filename else ""
    print(f"childtune: error: {e.strerror or e}{where}; finished runs are untouched",
          file=sys.stderr)
    return 1
  except KeyboardInterrupt as e:
    how = f" ({e})" if str(e) == "SIGTERM" else ""
    print(f"childtune: error: interrupted{how}; finished runs are untouched (--resume "
          "continues)", file=sys.stderr)
    return 130
  return 0


def console_main() -> None:
  status = main()
  if status == 130:  # interrupted: leave without tearing down XLA's and orbax's threads,
    sys.stdout.flush()  # which can crash the interpreter's shutdown after an interrupt
    sys.stderr.flush()
    os._exit(status)
  sys.exit(status)
