"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Every result this library writes (run results, summaries, masks, plots) goes through
:func:`replacing`, so that a run killed mid-write, or a value that fails to serialise, leaves the
previous file in place and no temporary file behind.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator
from typing import Any

# What a seed folder (``OUT/seed-<n>/``) holds.
RUN_FILE = "run.json"  # its configuration, written before training starts
HISTORY_FILE = "history.json"  # selection scores and network changes so far, for a resume
CHECKPOINT_DIR = "checkpoints"  # orbax checkpoints while it trains
RESULTS_FILE = "results.json"  # a finished seed's results (its presence: the seed is done)
MASK_FILE = "child_mask.npz"  # the child network a D (or random) run trained
OVERLAP_FILE = "child_overlap.json"  # a multi-task network's Jaccard with each task's own
MODEL_DIR = "model"  # the fine-tuned model, in Hugging Face's layout
SUMMARY_FILE = "summary.json"  # in the output folder: every finished seed, summarised
METRICS_FILE = "metrics.jsonl"  # the metrics stream, a line a step (and TensorBoard's folder)
TENSORBOARD_DIR = "tensorboard"
CURVES_FILE = "curves.png"  # a seed's loss and evaluations drawn (and the folder's, across seeds)
SEED_FILES = (RESULTS_FILE, RUN_FILE, CHECKPOINT_DIR, MASK_FILE, OVERLAP_FILE, MODEL_DIR,
              HISTORY_FILE, METRICS_FILE, TENSORBOARD_DIR, CURVES_FILE)
SEED_FIELD = "{seed}"  # in a mask path given to train: each seed's own number


def for_seed(path: str | None, seed: int) -> str | None:
  """``path`` with every ``{seed}`` replaced by ``seed``: a file per seed (``None``: ``None``)."""
  return None if path is None else path.replace(SEED_FIELD, str(seed))


@contextlib.contextmanager
def replacing(path: str) -> Iterator[str]:
  """Yields a temporary path beside ``path`` and moves it onto ``path`` when the block succeeds.

  The temporary path keeps ``path``'s extension (``a.png`` -> ``a.tmp.png``), so writers that
  choose a format by extension (matplotlib, ``np.savez``) write the right one. If the block
  raises, the temporary file is removed and ``path`` is left as it was.
  """
  root, ext = os.path.splitext(path)
  tmp = f"{root}.tmp{ext}"
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_text(path: str, text: str) -> None:
  """Writes ``text`` to ``path`` atomically."""
  with replacing(path) as tmp, open(tmp, "w") as f:
    f.write(text)


def finite(obj: Any) -> Any:
  """``obj`` with every NaN or infinite float replaced by ``None`` (JSON has no NaN)."""
  if isinstance(obj, float) and not math.isfinite(obj):
    return None
  if isinstance(obj, dict):
    return {k: finite(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [finite(v) for v in obj]
  return obj


def write_json(path: str, obj: Any) -> None:
  """Writes ``obj`` as indented, key-sorted, strict JSON to ``path`` atomically.

  NaN and infinities become ``null`` (JSON has neither; Python would write invalid tokens).
  """
  with replacing(path) as tmp, open(tmp, "w") as f:
    json.dump(finite(obj), f, indent=2, sort_keys=True, allow_nan=False)
    f.write("\n")


def save_figure(fig: Any, path: str, **kwargs: Any) -> None:
  """Saves a matplotlib figure to ``path`` atomically; ``kwargs`` go to ``fig.savefig``."""
  with replacing(path) as tmp:
    fig.savefig(tmp, **kwargs)


def sha256(path: str) -> str:
  """The SHA-256 hex digest of a file's bytes."""
  import hashlib

  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()
