"""``curves.png``: a run's training loss and evaluation metrics, where people would rather look.

Each seed's folder gets one from its ``metrics.jsonl`` (the loss at every step, and each
evaluation's metrics at its step), and the output folder one across its seeds (the mean
loss by step with its range, and each metric's mean by evaluation step). Written with
matplotlib (the ``cli`` extra) when a command finishes; without matplotlib, nothing.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import Any

import numpy as np

from childtune_jax.app import files, stream

logger = logging.getLogger(__name__)

CURVES_FILE = files.CURVES_FILE
LOSS = "train/loss"


def series(records: list[dict]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """``{name: (steps, values)}`` of a stream: the loss, and each ``eval/...`` metric
  (``None`` values, the non-finite ones, left out)."""
  out: dict[str, tuple[list[int], list[float]]] = {}
  for r in records:
    for name, value in r.items():
      if (name == LOSS or name.startswith("eval/")) and value is not None:
        steps, values = out.setdefault(name, ([], []))
        steps.append(r["step"])
        values.append(value)
  return {k: (np.asarray(s), np.asarray(v, float)) for k, (s, v) in out.items()}


def across_seeds(per_seed: list[dict[str, tuple[np.ndarray, np.ndarray]]]
                 ) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
  """``{name: (steps, mean, min, max)}`` over the seeds, at the steps every seed has."""
  out = {}
  names = set.intersection(*(set(s) for s in per_seed)) if per_seed else set()
  for name in sorted(names):
    common = sorted(set.intersection(*(set(s[name][0].tolist()) for s in per_seed)))
    if not common:
      continue
    by_step = [dict(zip(s[name][0].tolist(), s[name][1])) for s in per_seed]
    rows = np.stack([np.asarray([seed[t] for t in common]) for seed in by_step])
    out[name] = (np.asarray(common), rows.mean(0), rows.min(0), rows.max(0))
  return out


def _figure(curves: dict[str, tuple], title: str) -> Any:
  import matplotlib

  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  metrics = [n for n in curves if n != LOSS]
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), squeeze=False)
  loss_ax, eval_ax = axes[0]
  if LOSS in curves:
    steps, mean, *band = curves[LOSS]
    loss_ax.plot(steps, mean, lw=0.8, color="C0")
    if band:
      loss_ax.fill_between(steps, band[0], band[1], color="C0", alpha=0.25, lw=0)
  loss_ax.set(title="train loss", xlabel="step")
  for i, name in enumerate(metrics):
    steps, mean, *_ = curves[name]
    eval_ax.plot(steps, mean, marker="o", ms=3, color=f"C{i % 10}",
                 label=name.removeprefix("eval/"))
  eval_ax.set(title="evaluations", xlabel="step")
  if metrics:
    eval_ax.legend(fontsize=7)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  return fig


def write_curves(out: str, seed_dirs: list[str]) -> list[str]:
  """Each seed's ``curves.png`` and, with several seeds, the folder's; the paths written.

  A failure to draw is logged and leaves the run as it is: the plots are a view of
  ``metrics.jsonl``, never a result."""
  if importlib.util.find_spec("matplotlib") is None:
    return []
  from matplotlib import pyplot as plt

  written, per_seed = [], []
  try:
    for seed_dir in seed_dirs:
      records = stream.read(os.path.join(seed_dir, files.METRICS_FILE))
      if not records:
        continue
      s = series(records)
      per_seed.append(s)
      fig = _figure(s, os.path.basename(seed_dir))
      path = os.path.join(seed_dir, CURVES_FILE)
      files.save_figure(fig, path, dpi=100)
      plt.close(fig)
      written.append(path)
    if len(per_seed) > 1:
      fig = _figure(across_seeds(per_seed), f"{len(per_seed)} seeds: mean (range)")
      path = os.path.join(out, CURVES_FILE)
      files.save_figure(fig, path, dpi=100)
      plt.close(fig)
      written.append(path)
  except Exception as e:  # noqa: BLE001 - a plot never fails a finished run
    logger.warning("could not draw %s: %s", CURVES_FILE, e)
  return written
