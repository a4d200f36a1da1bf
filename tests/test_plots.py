"""curves.png: what it draws is the metrics stream's, per seed and across seeds (NumPy)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from childtune_jax.app import plots

pytest.importorskip("matplotlib")


def _stream(folder, losses, evals):
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
    for step, loss in enumerate(losses, 1):
      f.write(json.dumps({"step": step, "train/loss": loss, "train/learning_rate": 1e-3}) + "\n")
    for step, acc in evals:
      f.write(json.dumps({"step": step, "eval/dev/accuracy": acc}) + "\n")


def test_series_keeps_the_loss_and_evaluations_and_drops_nulls():
  records = [{"step": 1, "train/loss": 0.9, "train/grad_norm": 3.0},
             {"step": 2, "train/loss": None},
             {"step": 2, "eval/dev/accuracy": 0.5, "eval/dev/f1": None}]
  got = plots.series(records)
  assert sorted(got) == ["eval/dev/accuracy", "train/loss"]
  np.testing.assert_array_equal(got["train/loss"][0], [1])
  np.testing.assert_array_equal(got["eval/dev/accuracy"][1], [0.5])


def test_across_seeds_is_the_mean_and_range_at_the_common_steps():
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=6), rng.normal(size=4)
  per_seed = [{"train/loss": (np.arange(1, 7), a)}, {"train/loss": (np.arange(1, 5), b)}]
  steps, mean, lo, hi = plots.across_seeds(per_seed)["train/loss"]
  np.testing.assert_array_equal(steps, [1, 2, 3, 4])
  both = np.stack([a[:4], b])
  np.testing.assert_allclose(mean, both.mean(0))
  np.testing.assert_allclose(lo, both.min(0))
  np.testing.assert_allclose(hi, both.max(0))


def test_write_curves_draws_each_seed_and_the_folder(tmp_path):
  from matplotlib import image

  out = tmp_path / "run"
  _stream(out / "seed-1", [0.7, 0.6, 0.5], [(3, 0.6)])
  _stream(out / "seed-2", [0.8, 0.5, 0.4], [(3, 0.7)])
  (out / "seed-3").mkdir()  # no stream (an older run): no curves, no error
  written = plots.write_curves(str(out), [str(out / f"seed-{s}") for s in (1, 2, 3)])
  assert written == [str(out / "seed-1" / "curves.png"), str(out / "seed-2" / "curves.png"),
                     str(out / "curves.png")]
  for path in written:
    assert image.imread(path).shape == (340, 900, 4)
  assert not (out / "seed-3" / "curves.png").exists()
  assert not [n for n in os.listdir(out / "seed-1") if ".tmp" in n]
