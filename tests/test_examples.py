"""The study scripts in ``examples/``: the resumable study driver and its statistics."""

import csv
import importlib.util
import itertools
import json
import os

import jax
import numpy as np
import pytest
from conftest import GLUE, HERE, TINY

from childtune_jax.app.maskfile import RESERVE_P_KEY

EXAMPLES = os.path.join(HERE, os.pardir, "examples")


def _load(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(EXAMPLES, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


analyze = _load("analyze_study")


def _exact_bootstrap_interval(diffs):
  """Percentiles of the exact bootstrap distribution: every resample, equally likely."""
  means = np.sort([np.mean(r) for r in itertools.product(diffs, repeat=len(diffs))])
  cdf = np.arange(1, len(means) + 1) / len(means)
  return means[np.searchsorted(cdf, 0.025)], means[np.searchsorted(cdf, 0.975)]


def test_paired_bootstrap_matches_the_exact_bootstrap_distribution():
  diffs = np.array([1.0, 2.0, 4.0, 8.0, -3.0])  # 5^5 resamples, means on a grid of 0.2
  lo, hi = analyze.paired_bootstrap(diffs, reps=40_000)
  exact_lo, exact_hi = _exact_bootstrap_interval(diffs)
  assert abs(lo - exact_lo) <= 0.2 + 1e-9 and abs(hi - exact_hi) <= 0.2 + 1e-9
  assert lo < diffs.mean() < hi


def test_paired_diff_gives_no_interval_below_three_seeds():
  text = analyze.paired_diff({1: 0.80, 2: 0.70, 3: 0.9}, {1: 0.75, 2: 0.72}, "vanilla")
  assert text == "+1.50 (n=2, too few seeds for an interval; above vanilla in 1, below in 1)"


def _write_run(out, task, mode, seed, value, lr=4e-5):
  path = os.path.join(out, task, mode, f"seed-{seed}")
  os.makedirs(path)
  with open(os.path.join(path, "results.json"), "w") as f:
    json.dump({"metrics": {"dev": {analyze.METRIC[task]: value}},
               "config": {"learning_rate": lr}}, f)


def _majority(path, label_column, header):
  with open(path) as f:
    rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
  return [int(r[label_column]) for r in rows[1 if header else 0:]]


def test_summary_tables_against_hand_computed_statistics(tmp_path, monkeypatch):
  out = str(tmp_path)
  rng = np.random.default_rng(0)
  seeds = [1, 2, 3, 4]
  scores = {mode: dict(zip(seeds, rng.uniform(0.7, 0.9, 4))) for mode in ("vanilla", "D")}
  scores["random"] = {1: 0.5, 2: 0.6, 3: 0.95}  # seed 4 unfinished: pairs use seeds 1-3
  for mode, cell in scores.items():
    for seed, value in cell.items():
      _write_run(out, "sst2", mode, seed, value)
  monkeypatch.setattr("sys.argv", ["analyze_study", "--out", out, "--glue", GLUE])
  analyze.main()
  with open(os.path.join(out, "summary.md")) as f:
    text = f.read()
  assert os.path.exists(os.path.join(out, "scores.png"))

  def row(label, mode):
    return next(r for r in text.splitlines() if r.startswith(f"| {label} | {mode} |"))

  d = np.array([scores["D"][s] - scores["vanilla"][s] for s in seeds]) * 100
  values = np.array(list(scores["D"].values())) * 100
  cells = row("sst2 (accuracy)", "D").split("|")
  assert cells[4].strip() == f"{values.mean():.2f} ± {np.std(values, ddof=1):.2f}"
  assert cells[5].strip().startswith(f"{d.mean():+.2f} [")
  assert f"above vanilla in {(d > 0).sum()}, below in {(d < 0).sum()}" in cells[5]
  # Analysis (a): D against random on the three seeds both finished.
  dr = np.array([scores["D"][s] - scores["random"][s] for s in (1, 2, 3)]) * 100
  control = next(r for r in text.splitlines()
                 if r.startswith(f"| sst2 (accuracy) | {dr.mean():+.2f} ["))
  assert f"(n=3; above random in {(dr > 0).sum()}, below in {(dr < 0).sum()})" in control
  # The majority-class floor, from the fixture's labels read independently.
  train = _majority(os.path.join(GLUE, "SST-2", "train.tsv"), 1, header=True)
  dev = _majority(os.path.join(GLUE, "SST-2", "dev.tsv"), 1, header=True)
  majority = np.bincount(train).argmax()
  floor = 100 * np.mean(np.array(dev) == majority)
  assert row("sst2 (accuracy)", "majority class").split("|")[4].strip() == f"{floor:.2f}"
  assert "average of" not in text  # one task: no average rows


def test_summary_reports_each_tasks_other_metrics(tmp_path, monkeypatch):
  out = str(tmp_path)
  rng = np.random.default_rng(1)
  seeds = [1, 2, 3]
  metrics = {mode: {s: {"accuracy": rng.uniform(0.6, 0.8), "f1": rng.uniform(0.7, 0.9)}
                    for s in seeds} for mode in ("vanilla", "D")}
  for mode, cell in metrics.items():
    for seed, dev in cell.items():
      path = os.path.join(out, "mrpc", mode, f"seed-{seed}")
      os.makedirs(path)
      with open(os.path.join(path, "results.json"), "w") as f:
        json.dump({"metrics": {"dev": dev}, "config": {"learning_rate": 4e-5,
                   "max_train_samples": None, "model": "tiny"}}, f)
  monkeypatch.setattr("sys.argv", ["analyze_study", "--out", out, "--glue", GLUE])
  analyze.main()
  with open(os.path.join(out, "summary.md")) as f:
    rows = f.read().splitlines()

  def cells(label, mode):
    return next(r for r in rows if r.startswith(f"| {label} | {mode} |")).split("|")

  for metric in ("f1", "accuracy"):  # the main table holds F1, the second one accuracy
    values = np.array([metrics["D"][s][metric] for s in seeds]) * 100
    d = values - np.array([metrics["vanilla"][s][metric] for s in seeds]) * 100
    row = cells(f"mrpc ({metric})", "D")
    assert row[4].strip() == f"{values.mean():.2f} ± {np.std(values, ddof=1):.2f}"
    assert row[5].strip().startswith(f"{d.mean():+.2f} [")
  train = _majority(os.path.join(GLUE, "MRPC", "train.tsv"), 0, header=True)
  dev = np.array(_majority(os.path.join(GLUE, "MRPC", "dev.tsv"), 0, header=True))
  floor = 100 * np.mean(dev == np.bincount(train).argmax())
  assert cells("mrpc (accuracy)", "majority class")[4].strip() == f"{floor:.2f}"
  assert analyze.describe(analyze.load(out)[1]) == "tiny, the full training set, lr 4e-05"


def test_analyze_study_fails_clearly_without_runs(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr("sys.argv", ["analyze_study", "--out", str(tmp_path)])
  with pytest.raises(SystemExit):
    analyze.main()
  assert "no finished runs" in capsys.readouterr().err


def test_glue_study_pairs_random_with_d_and_skips_finished_runs(tmp_path, monkeypatch, capsys):
  study = _load("glue_study")
  out = str(tmp_path)
  argv = ["glue_study", "--glue", GLUE, "--out", out, "--model", TINY, "--backend", "nnx",
          "--tasks", "sst2",
          "--seeds", "7", "--max-train-samples", "16", "--learning-rate", "1e-3",
          "--compilation-cache", str(tmp_path / "xla")]
  # random before D is skipped (no D network to match yet), and after D it matches it.
  monkeypatch.setattr("sys.argv", [*argv, "--modes", "random", "D", "random"])
  study.main()
  assert "skip sst2/random seed 7: run D first" in capsys.readouterr().err
  runs = {m: os.path.join(out, "sst2", m, "seed-7", "results.json") for m in ("D", "random")}
  results = {}
  for mode, path in runs.items():
    with open(path) as f:
      results[mode] = json.load(f)
  assert results["D"]["config"]["learning_rate"] == 1e-3
  assert results["D"]["train_examples"] == 16
  d_net, r_net = results["D"]["child_network"], results["random"]["child_network"]
  assert r_net["kept"] == d_net["kept"]
  masks = [np.load(os.path.join(out, "sst2", m, "seed-7", "child_mask.npz")) for m in runs]
  assert any(not np.array_equal(masks[0][k], masks[1][k]) for k in masks[1].files)
  assert RESERVE_P_KEY in masks[0].files and RESERVE_P_KEY not in masks[1].files  # sized by D
  stamps = {m: os.path.getmtime(p) for m, p in runs.items()}
  study.main()  # everything finished: nothing reruns
  assert {m: os.path.getmtime(p) for m, p in runs.items()} == stamps


def test_f_step_size_against_a_numpy_adam():
  f_step = _load("f_step_size")
  p, steps, n = 0.3, 60, 20_000
  rng = np.random.default_rng(0)
  grads = (rng.random((steps, n)) < p) / p  # Bernoulli(p) keep mask, kept gradients 1/p
  m = v = np.zeros(n)
  moved = np.zeros(n)
  for t in range(steps):
    m = 0.9 * m + 0.1 * grads[t]
    v = 0.999 * v + 0.001 * grads[t] ** 2
    moved += (m / (1 - 0.9 ** (t + 1))) / (np.sqrt(v / (1 - 0.999 ** (t + 1))) + 1e-6)
  numpy_ratio = moved.mean() / steps  # unmasked Adam moves 1 per step on a constant gradient
  # hash8 draws p as 77/256; 20,000 parameters leave about 0.003 of sampling noise.
  assert f_step.relative_distance(p, steps, n) == pytest.approx(numpy_ratio, abs=0.01)
  assert numpy_ratio < 0.65  # far below 1: the effect the script is about


def test_head_first_fisher_at_zero_steps_is_the_cli_d_network(tmp_path, monkeypatch):
  from childtune_jax.app import cli

  head_first = _load("head_first_fisher")
  common = ["--max-train-samples", "16", "--max-seq-length", "64"]
  out = str(tmp_path / "d")
  assert cli.main(["train", "--task", "sst2", "--mode", "D", "--model", TINY, "--data-dir", GLUE,
                   *common, "--seeds", "3", "--epochs", "1", "--no-save-model",
                   "--output-dir", out]) == 0
  saved = str(tmp_path / "head-first")
  monkeypatch.setattr("sys.argv", ["head_first_fisher", "--glue", GLUE, "--model", TINY, *common,
                                   "--pairs", "3:3", "--head-steps", "0", "20",
                                   "--save-dir", saved, "--json", str(tmp_path / "j.json")])
  head_first.main()
  with np.load(os.path.join(out, "seed-3", "child_mask.npz")) as f:
    cli_mask = dict(f)
  masks = {}
  for steps in (0, 20):
    with np.load(os.path.join(saved, f"steps-{steps}", "data-3-head-3.npz")) as f:
      masks[steps] = dict(f)
  assert masks[0].keys() == cli_mask.keys()
  assert all(np.array_equal(masks[0][k], cli_mask[k]) for k in cli_mask)
  # Training the head moves the Fisher: the network changes.
  assert any(not np.array_equal(masks[0][k], masks[20][k]) for k in cli_mask)


def test_glue_study_full_data_passes_no_subset_size(tmp_path, monkeypatch, capsys):
  study = _load("glue_study")
  calls = []
  monkeypatch.setattr(study.cli, "main", lambda argv: calls.append(argv) or 0)
  base = ["glue_study", "--glue", GLUE, "--out", str(tmp_path), "--tasks", "rte", "--modes",
          "vanilla", "--seeds", "7"]
  for samples in ("all", "250"):
    monkeypatch.setattr("sys.argv", [*base, "--max-train-samples", samples])
    study.main()
  full, subset = calls
  assert "--max-train-samples" not in full
  assert subset[subset.index("--max-train-samples") + 1] == "250"
  monkeypatch.setattr("sys.argv", [*base, "--max-train-samples", "0"])
  with pytest.raises(SystemExit):
    study.main()
  assert "must be a positive integer or 'all', got 0" in capsys.readouterr().err


def test_clip_child_tuning_smoke_run(tmp_path):
  pytest.importorskip("sklearn")
  example = _load("clip_child_tuning")
  report = example.main(["--smoke", "--out", str(tmp_path)])
  assert set(report["methods"]) == {"vanilla", "F", "D"}
  assert report["data"] == {"pretrain": 1000, "train": 200, "selection": 200, "test": 397}
  # D keeps each tower's own 30% of its layers' scalars: the kept count, recomputed from
  # the per-layer-type fractions and the tower's tensor sizes, agrees.
  _, params = example.build()
  from childtune_jax import clip
  from childtune_jax._tree import leaf_paths

  sizes: dict = {}
  for path, x in zip(leaf_paths(params), jax.tree_util.tree_leaves(params)):
    if clip.encoder_layers()(path):
      tower = "vision" if clip.vision_tower(path) else "text"
      kind = next(k for k in ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2",
                              "layer_norm") if f"/{k}" in path)
      sizes.setdefault(tower, {}).setdefault(kind, 0)
      sizes[tower][kind] += x.size
  anatomy = report["d_network"]["anatomy"]
  for tower in ("vision", "text"):
    kept = sum(anatomy[tower][k] * n for k, n in sizes[tower].items())
    total = sum(sizes[tower].values())
    assert abs(kept / total - 0.3) < 1e-3
  assert report["d_network"]["total"] == sum(sum(v.values()) for v in sizes.values())
  with open(tmp_path / "summary.md") as f:
    assert "| zero-shot (prompts, no fine-tuning) |" in f.read()


def test_clip_child_tuning_fine_tunes_a_hugging_face_clip_folder(tmp_path):
  """``--model DIR``: a tiny random CLIP in Hugging Face's layout, with its tokenizer.json."""
  pytest.importorskip("sklearn")
  example = _load("clip_child_tuning")
  folder = os.path.join(os.path.dirname(__file__), "fixtures", "clip")
  m, params = example.hf_backbone(folder)
  ids, mask = m.tokenize(["a photo of the digit seven", "the number one"])
  assert ids.shape == (2, 8) and ids[0, 0] == 97 and ids[0, 7] == 98 and ids[1, 4] == 98
  np.testing.assert_array_equal(mask, [[1] * 8, [1] * 5 + [0] * 3])
  report = example.main(["--smoke", "--model", folder, "--out", str(tmp_path)])
  assert report["model"] == folder and report["pretrain_steps"] == 0
  assert set(report["methods"]) == {"vanilla", "F", "D"}
  assert report["d_network"]["kept"] / report["d_network"]["total"] == pytest.approx(0.3, abs=2e-3)
  assert 0.0 <= report["zero_shot"]["test"] <= 1.0
