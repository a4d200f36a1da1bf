"""examples/tuned_study.py: choices from selection runs only, tests at the chosen point."""

import importlib.util
import json
import os

import numpy as np

from childtune_jax.app import cli, files

HERE = os.path.dirname(__file__)
GLUE = os.path.join(HERE, "fixtures", "glue")
TINY = os.path.join(HERE, "fixtures", "tiny-bert")


def _load(name="tuned_study"):
  path = os.path.join(HERE, os.pardir, "examples", f"{name}.py")
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _read(path):
  with open(path) as f:
    return json.load(f)


def test_choose_prefers_the_best_mean_then_fewer_epochs_then_lower_lr():
  study = _load()
  assert study.choose({(1e-4, 3): [0.5, 0.7], (2e-4, 3): [0.6, 0.5]}) == (1e-4, 3)
  assert study.choose({(1e-4, 10): [0.6], (2e-4, 3): [0.6], (1e-4, 3): [0.6]}) == (1e-4, 3)
  assert study.still_rising({1: {"selection_by_epoch": [0.5, 0.6, 0.7]},
                             2: {"selection_by_epoch": [0.5, 0.7, 0.65]}})
  assert not study.still_rising({1: {"selection_by_epoch": [0.5, 0.7, 0.6]}})


def test_tuned_study_selects_on_the_selection_split_and_tests_once(tmp_path, monkeypatch):
  study = _load()
  monkeypatch.setattr(study, "LEARNING_RATES", (1e-4, 3e-3))
  monkeypatch.setattr(study, "SELECTION_SEEDS", (1, 2))
  monkeypatch.setattr(study, "TEST_SEEDS", (7,))
  monkeypatch.setattr(study, "TRAIN_SAMPLES", 12)
  monkeypatch.setattr(study, "SELECTION_SAMPLES", 8)
  monkeypatch.setattr(study, "EPOCHS", 1)
  monkeypatch.setattr(study, "LONG_EPOCHS", 2)
  monkeypatch.setattr(study, "MAX_LEN", {"sst2": 32})
  calls = []
  real = cli.main

  def counting(argv):
    calls.append(argv)
    return real(argv)

  monkeypatch.setattr(cli, "main", counting)
  out = str(tmp_path / "tuned")
  argv = ["--glue", GLUE, "--out", out, "--model", TINY, "--backend", "nnx", "--tasks", "sst2",
          "--methods", "vanilla", "D", "--compilation-cache", ""]
  study.main(argv)
  root = os.path.join(out, "sst2")
  choices = _read(os.path.join(root, "choice.json"))
  for method in ("vanilla", "D"):
    # the choice is the best mean selection score over the selection runs on disk
    means = {}
    for lr in (1e-4, 3e-3):
      runs = [_read(os.path.join(root, "select", method, f"lr{lr:g}-ep1", f"seed-{s}",
                                 "results.json")) for s in (1, 2)]
      for r in runs:  # the dev set is never scored by a selection run
        assert set(r["metrics"]) == {"selection"} and r["score"] is None
      means[lr] = np.mean([r["selection_score"] for r in runs])
    best = max(sorted(means), key=lambda lr: means[lr])
    assert choices[method]["learning_rate"] == best and choices[method]["epochs"] == 1
    test = _read(os.path.join(root, "test", method, "seed-7", "results.json"))
    assert test["config"]["learning_rate"] == best and "dev" in test["metrics"]
  # D's Fisher pass runs once per seed; the other grid points reuse its network.
  for seed in (1, 2):
    mask = os.path.join(root, "masks", f"D-seed-{seed}.npz")
    other = _read(os.path.join(root, "select", "D", "lr0.003-ep1", f"seed-{seed}",
                               "results.json"))
    assert other["child_mask_sha256"] == files.sha256(mask)
  # every method of a seed saw the same training and selection data
  v = _read(os.path.join(root, "select", "vanilla", "lr0.0001-ep1", "seed-1", "results.json"))
  d = _read(os.path.join(root, "select", "D", "lr0.0001-ep1", "seed-1", "results.json"))
  assert v["data_sha256"] == d["data_sha256"]
  # the report: chosen point, test score and the paired difference from the files
  text = _load("analyze_tuned").main(["--out", out, "--no-plots"])
  tests = {m: _read(os.path.join(root, "test", m, "seed-7", "results.json"))["metrics"]["dev"]
           ["accuracy"] for m in ("vanilla", "D")}
  row = next(line for line in text.splitlines() if line.startswith("| D |"))
  assert f"| {choices['D']['learning_rate']:g}, 1 |" in row
  assert f"| {100 * tests['D']:.2f} ± 0.00 | 1 | {100 * (tests['D'] - tests['vanilla']):+.2f} |" \
      in row
  n = len(calls)
  assert n == 2 * 2 * 2 + 2  # 2 methods x 2 lrs x 2 seeds, 1 test seed each
  study.main(argv)  # resumable: nothing left to run
  assert len(calls) == n


def test_driver_extends_rising_points_records_failures_and_never_chooses_them(
    tmp_path, monkeypatch):
  study = _load()
  calls = []

  def fake_main(argv):  # a stand-in for childtune train: scores are a function of lr, epochs
    calls.append(argv)
    get = lambda flag: argv[argv.index(flag) + 1]  # noqa: E731
    lr, epochs, seed = float(get("--learning-rate")), int(get("--epochs")), int(get("--seeds"))
    if lr == 5e-4:
      return 1  # diverged
    seed_dir = os.path.join(get("--output-dir"), f"seed-{seed}")
    os.makedirs(seed_dir)
    peak = {2e-5: 0.6, 5e-5: 0.7, 1e-4: 0.75, 2e-4: 0.72}[lr] + 0.01 * (epochs == 10)
    by_epoch = [peak - 0.1 * (epochs - e) / epochs for e in range(1, epochs + 1)]  # rising
    test = "--selection-only" not in argv
    files.write_json(os.path.join(seed_dir, "results.json"), {
        "selection_score": by_epoch[-1], "selection_by_epoch": by_epoch,
        "metrics": {"dev": {"accuracy": 0.5}} if test else {}, "config": {}})
    return 0

  monkeypatch.setattr(study.cli, "main", fake_main)
  out = str(tmp_path / "tuned")
  study.main(["--glue", GLUE, "--out", out, "--tasks", "sst2", "--methods", "F",
              "--compilation-cache", ""])
  root = os.path.join(out, "sst2")
  for seed in study.SELECTION_SEEDS:
    failed = _read(os.path.join(root, "select", "F", "lr0.0005-ep3", f"seed-{seed}",
                                "failed.json"))
    assert failed["failed"] and failed["selection_score"] is None
  choice = _read(os.path.join(root, "choice.json"))["F"]
  # 1e-4 is best at 3 epochs and still rising there: its 10-epoch point ran and won
  assert (choice["learning_rate"], choice["epochs"]) == (1e-4, 10)
  grid = {(g["learning_rate"], g["epochs"]): g["scores"] for g in choice["grid"]}
  assert grid[(5e-4, 3)] == [None, None] and (2e-4, 10) not in grid
  tests = [c for c in calls if "--selection-only" not in c]
  assert len(tests) == len(study.TEST_SEEDS)
  assert all(c[c.index("--learning-rate") + 1] == "0.0001" and c[c.index("--epochs") + 1] == "10"
             for c in tests)
  n = len(calls)
  study.main(["--glue", GLUE, "--out", out, "--tasks", "sst2", "--methods", "F",
              "--compilation-cache", ""])
  assert len(calls) == n  # failed runs are results too: not retried
