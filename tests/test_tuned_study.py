"""examples/tuned_study.py: choices from selection runs only, tests at the chosen point."""

import importlib.util
import json
import os

import numpy as np
import pytest
from conftest import GLUE, HERE, TINY

from childtune_jax.app import cli, files


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
  # ... given as one path for every seed, so that the grid point's summary holds both seeds
  assert _read(os.path.join(root, "select", "D", "lr0.003-ep1", "summary.json"))["seeds"] == [1, 2]
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


def test_nli_arm_selects_on_snli_and_tests_on_heldout_and_sick(tmp_path, monkeypatch):
  study, analyze = _load(), _load("analyze_tuned")
  for name, value in (("LEARNING_RATES", (1e-4, 3e-3)), ("SELECTION_SEEDS", (1,)),
                      ("TEST_SEEDS", (7, 8, 9)), ("NLI_TRAIN", 16), ("NLI_SELECTION", 8),
                      ("NLI_HELDOUT", 10), ("EPOCHS", 1), ("LONG_EPOCHS", 2),
                      ("MAX_LEN", {"snli": 32})):
    monkeypatch.setattr(study, name, value)
  out = str(tmp_path / "tuned")
  study.main(["--nli", os.path.join(HERE, "fixtures", "nli"), "--out", out, "--model", TINY,
              "--backend", "nnx", "--tasks", "snli", "--methods", "vanilla", "F",
              "--control-at", "F", "--compilation-cache", ""])
  root = os.path.join(out, "snli")
  for lr in (1e-4, 3e-3):  # selection runs see neither the held-out split nor SICK
    r = _read(os.path.join(root, "select", "F", f"lr{lr:g}-ep1", "seed-1", "results.json"))
    assert set(r["metrics"]) == {"selection"}
  tests = {m: {s: _read(os.path.join(root, "test", m, f"seed-{s}", "results.json"))
               for s in (7, 8, 9)} for m in ("vanilla", "F")}
  for runs in tests.values():
    for r in runs.values():
      assert set(r["metrics"]) == {"heldout", "sick/test", "selection"}
  text = analyze.main(["--out", out, "--no-plots"])
  # The transfer table: each split's mean, and the paired gap (in-domain minus SICK) vs vanilla.
  gap = {m: [100 * (r["metrics"]["heldout"]["accuracy"] - r["metrics"]["sick/test"]["accuracy"])
             for _, r in sorted(runs.items())] for m, runs in tests.items()}
  d = np.array(gap["F"]) - np.array(gap["vanilla"])
  row = next(line for line in text.splitlines() if line.startswith("| F | in-domain − SICK"))
  assert f"| {np.mean(gap['F']):.2f} ± {np.std(gap['F'], ddof=1):.2f} | 3 |" in row
  assert f"| {d.mean():+.2f} [" in row
  # The control: vanilla on the test seeds at F's chosen point, paired with vanilla and F.
  choice = _read(os.path.join(root, "choice.json"))["F"]
  control = {s: _read(os.path.join(root, "control", "vanilla-at-F", f"seed-{s}", "results.json"))
             for s in (7, 8, 9)}
  for r in control.values():
    assert r["config"]["mode"] == "vanilla"
    assert (r["config"]["learning_rate"], r["config"]["epochs"]) == (
        choice["learning_rate"], choice["epochs"])
    assert set(r["metrics"]) == {"heldout", "sick/test", "selection"}
  control_gap = [100 * (r["metrics"]["heldout"]["accuracy"] - r["metrics"]["sick/test"]["accuracy"])
                 for _, r in sorted(control.items())]
  row = next(line for line in text.splitlines()
             if line.startswith("| vanilla at F's point") and "| gap accuracy |" in line)
  cells = [c.strip() for c in row.split("|")[3:-1]]
  assert cells[:2] == [f"{np.mean(control_gap):.2f} ± {np.std(control_gap, ddof=1):.2f}", "3"]
  assert cells[2].startswith(f"{np.mean(np.subtract(control_gap, gap['vanilla'])):+.2f} [")
  assert cells[4].startswith(f"{np.mean(np.subtract(gap['F'], control_gap)):+.2f} [")


def test_control_at_a_method_without_a_choice_is_refused_before_any_run(tmp_path, monkeypatch):
  study = _load()
  monkeypatch.setattr(cli, "main", lambda argv: pytest.fail(f"ran {argv}"))
  out = tmp_path / "tuned"
  _write(out / "sst2" / "choice.json", {"vanilla": {"learning_rate": 1e-4, "epochs": 3}})
  with pytest.raises(SystemExit, match="--control-at D: sst2 has no choice"):
    study.main(["--glue", GLUE, "--out", str(out), "--tasks", "sst2", "--methods", "vanilla",
                "--control-at", "D"])


def test_control_is_paired_with_vanilla_and_with_its_method_on_the_dev_metric():
  analyze = _load("analyze_tuned")
  rng = np.random.default_rng(5)
  seeds = (101, 102, 103, 104)

  def runs():
    return {s: {"metrics": {"dev": {"matthews": float(rng.random())}}} for s in seeds}

  info = {"choices": {"vanilla": {"learning_rate": 1e-4, "epochs": 3},
                      "F": {"learning_rate": 2e-4, "epochs": 10}},
          "tests": {"vanilla": runs(), "F": runs()}, "controls": {"F": runs()}}
  lines = analyze.control_table("cola", info)
  (row,) = [line for line in lines if line.startswith("| vanilla at F's point (0.0002, 10 ep)")]
  cells = [c.strip() for c in row.split("|")[2:-1]]

  def score(runs):
    return 100 * np.array([runs[s]["metrics"]["dev"]["matthews"] for s in seeds])

  control, vanilla, f = score(info["controls"]["F"]), score(info["tests"]["vanilla"]), score(
      info["tests"]["F"])
  assert cells[0] == "matthews"
  assert cells[1] == f"{control.mean():.2f} ± {control.std(ddof=1):.2f}"
  assert cells[2] == "4"
  assert cells[3].startswith(f"{(control - vanilla).mean():+.2f} [")
  assert cells[4] == f"{(control > vanilla).sum()} / {(control < vanilla).sum()}"
  assert cells[5].startswith(f"{(f - control).mean():+.2f} [")
  assert cells[6] == f"{(f > control).sum()} / {(f < control).sum()}"
  assert analyze.control_table("cola", {**info, "controls": {}}) == []


def test_multitask_arm_compares_each_task_with_its_single_task_runs(tmp_path, monkeypatch):
  study, analyze = _load(), _load("analyze_tuned")
  for name, value in (("LEARNING_RATES", (1e-3, 2e-3)), ("SELECTION_SEEDS", (1,)),
                      ("TEST_SEEDS", (7,)), ("TRAIN_SAMPLES", 16), ("SELECTION_SAMPLES", 8),
                      ("EPOCHS", 1), ("LONG_EPOCHS", 2), ("MULTI_TASKS", ("rte", "mrpc")),
                      ("MAX_LEN", {"rte": 32, "mrpc": 32, "glue4": 32})):
    monkeypatch.setattr(study, name, value)
  monkeypatch.setattr(analyze, "MULTI_TASKS", ("rte", "mrpc"))
  out = str(tmp_path / "tuned")
  study.main(["--glue", GLUE, "--out", out, "--model", TINY, "--backend", "nnx", "--tasks",
              "rte", "mrpc", "glue4", "--methods", "vanilla", "D", "shared-D",
              "--compilation-cache", ""])
  assert not os.path.exists(os.path.join(out, "rte", "test", "shared-D"))  # multi-task only
  assert set(os.listdir(os.path.join(out, "glue4", "test"))) == {"vanilla", "shared-D"}
  multi = _read(os.path.join(out, "glue4", "test", "shared-D", "seed-7", "results.json"))
  assert multi["config"]["task"] == "rte,mrpc" and "rte/dev" in multi["metrics"]
  # shared-D's four Fisher passes run once per seed: the grid's first point chose the network
  # that the others train (as the single-task D grids do).
  mask = os.path.join(out, "glue4", "masks", "shared-D-seed-1.npz")
  first, second = (os.path.join(out, "glue4", "select", "shared-D", f"lr{lr:g}-ep1", "seed-1")
                   for lr in (1e-3, 2e-3))
  assert files.sha256(mask) == files.sha256(os.path.join(first, "child_mask.npz"))
  assert _read(os.path.join(second, "results.json"))["child_mask_sha256"] == files.sha256(mask)
  assert "child_mask_sha256" not in multi  # a test seed chooses its own
  text = analyze.main(["--out", out, "--no-plots"])
  # Multi-task shared-D against single-task D on RTE, paired by seed.
  single = {s: _read(os.path.join(out, "rte", "test", "D", f"seed-{s}", "results.json"))
            for s in (7,)}
  shared = {s: _read(os.path.join(out, "glue4", "test", "shared-D", f"seed-{s}",
                                  "results.json")) for s in (7,)}
  d = np.mean([100 * (shared[s]["metrics"]["rte/dev"]["accuracy"]
                      - single[s]["metrics"]["dev"]["accuracy"]) for s in (7,)])
  section = text[text.index("### rte"):]
  row = next(line for line in section.splitlines() if line.startswith("| multi-task shared-D"))
  assert row.split("|")[4].strip() == f"{d:+.2f}"
  # ... and against multi-task vanilla of the same seed (what the shared network adds).
  together = _read(os.path.join(out, "glue4", "test", "vanilla", "seed-7", "results.json"))
  d = 100 * (shared[7]["metrics"]["rte/dev"]["accuracy"]
             - together["metrics"]["rte/dev"]["accuracy"])
  assert row.split("|")[8].strip() == f"{d:+.2f}"
  assert row.split("|")[9].strip() == f"{int(d > 0)} / {int(d < 0)}"
  vanilla_row = next(line for line in section.splitlines()
                     if line.startswith("| multi-task vanilla"))
  assert [c.strip() for c in vanilla_row.split("|")[8:10]] == ["", ""]  # none to itself
  # The tasks' mean main metric (RTE accuracy, MRPC F1), seed 7: shared-D against single D.
  single_mrpc = _read(os.path.join(out, "mrpc", "test", "D", "seed-7", "results.json"))
  mean_shared = (shared[7]["metrics"]["rte/dev"]["accuracy"]
                 + shared[7]["metrics"]["mrpc/dev"]["f1"]) / 2
  mean_single = (single[7]["metrics"]["dev"]["accuracy"]
                 + single_mrpc["metrics"]["dev"]["f1"]) / 2
  section = text[text.index("### the tasks' mean"):]
  row = next(line for line in section.splitlines() if line.startswith("| multi-task shared-D"))
  assert row.split("|")[2].strip().startswith(f"{100 * mean_shared:.2f}")
  assert row.split("|")[4].strip() == f"{100 * (mean_shared - mean_single):+.2f}"
  # The Jaccard of the shared network with RTE's own network of the same size, as the run
  # recorded it: recomputed here from its mask and RTE's single-task D network of the seed
  # (the same examples, head and Fisher pass; RTE's D p is the shared network's 0.3).
  own_dir = os.path.join(out, "rte", "test", "D", "seed-7")
  assert _read(os.path.join(own_dir, "results.json"))["config"]["reserve_p"] == 0.3
  own = np.load(os.path.join(own_dir, "child_mask.npz"))
  a = np.load(os.path.join(out, "glue4", "test", "shared-D", "seed-7", "child_mask.npz"))
  keys = [k for k in own if "layer" in k]
  x = np.concatenate([a["shared/" + k].ravel() for k in keys])
  y = np.concatenate([own[k].ravel() for k in keys])
  want = np.sum(x & y) / np.sum(x | y)
  recorded = shared[7]["child_network"]["jaccard_with_task_network"]
  assert set(recorded) == {"rte", "mrpc"} and recorded["rte"] == pytest.approx(want, rel=1e-12)
  row = next(line for line in text.splitlines() if line.startswith("| rte | "))
  assert row.startswith(f"| rte | {want:.3f} | {want:.3f} | {want:.3f} | 1 |")


def _choice(points):
  return {"grid": [{"learning_rate": lr, "epochs": ep, "mean": mean, "scores": [mean]}
                   for (lr, ep), mean in points.items()]}


def test_defaults_rule_ranks_rates_over_tasks_and_extends_on_average():
  analyze = _load("analyze_tuned")
  a = {(1e-4, 3): 0.80, (2e-4, 3): 0.82, (5e-4, 3): 0.70, (2e-4, 10): 0.81}
  b = {(1e-4, 3): 0.30, (2e-4, 3): 0.20, (5e-4, 3): None, (1e-4, 10): 0.34}
  c = {(1e-4, 3): 0.50, (2e-4, 3): 0.50, (5e-4, 3): 0.10}  # a tie shares ranks 1 and 2
  tasks = {"sst2": {"choices": {"F": _choice(a), "D": _choice(a)}},
           "cola": {"choices": {"F": _choice(b), "D": _choice(b)}},
           "rte": {"choices": {"F": _choice(c)}},
           "snli": {"choices": {"F": _choice(b)}}}  # not a GLUE task: no say
  got = analyze.derive_defaults(tasks)
  # ranks: a 2, 1, 3; b 1, 2, 3 (diverged last); c 1.5, 1.5, 3
  assert got["F"]["mean_rank"] == {1e-4: pytest.approx(1.5), 2e-4: pytest.approx(1.5),
                                   5e-4: 3.0}
  assert got["F"]["learning_rate"] == 1e-4  # a tie in mean rank goes to the lower rate
  assert got["F"]["long_gain"] == pytest.approx(((0.81 - 0.82) + (0.34 - 0.30)) / 2)
  assert got["F"]["min_steps"] == 630 and got["F"]["tasks"] == ["cola", "rte", "sst2"]
  assert got["D"]["learning_rate"] == 1e-4 and got["D"]["mean_rank"][2e-4] == 1.5
  tasks["sst2"]["choices"]["F"] = _choice({**a, (2e-4, 10): 0.70})  # now 10 epochs lose
  assert analyze.derive_defaults(tasks)["F"]["min_steps"] == 189
  assert "vanilla" not in got


def test_the_cli_tuned_preset_is_the_rule_on_the_committed_study():
  from childtune_jax.app import presets

  analyze = _load("analyze_tuned")
  root = os.path.join(HERE, os.pardir, "results", "tuned")
  tasks = {t: analyze.load_task(os.path.join(root, t)) for t in analyze.GLUE_TASKS
           if os.path.isdir(os.path.join(root, t))}
  got = analyze.derive_defaults(tasks)
  assert set(got) == set(presets.TUNED.learning_rate)
  for method, d in got.items():
    assert presets.TUNED.learning_rate[method] == d["learning_rate"], method
    assert presets.TUNED.min_steps[method] == d["min_steps"], method


def _write(path, obj):
  os.makedirs(path.parent, exist_ok=True)
  files.write_json(str(path), obj)


def test_report_gives_mrpc_accuracy_beside_the_chosen_f1(tmp_path):
  analyze = _load("analyze_tuned")
  root = tmp_path / "mrpc"
  rng = np.random.default_rng(0)
  seeds = (101, 102, 103, 104)
  scores = {m: {s: {"f1": float(rng.uniform(0.7, 0.9)), "accuracy": float(rng.uniform(0.6, 0.8))}
                for s in seeds} for m in ("vanilla", "D")}
  choices = {}
  for method in ("vanilla", "D"):
    grid = [{"learning_rate": 1e-4, "epochs": 3, "mean": 0.8, "scores": [0.8, 0.8]}]
    choices[method] = {"learning_rate": 1e-4, "epochs": 3, "grid": grid}
    for s in (1, 2):
      _write(root / "select" / method / "lr0.0001-ep3" / f"seed-{s}" / "results.json",
             {"selection_score": 0.8})
    for s in seeds:
      _write(root / "test" / method / f"seed-{s}" / "results.json",
             {"metrics": {"dev": scores[method][s]}})
  _write(root / "choice.json", choices)
  text = analyze.main(["--out", str(tmp_path), "--no-plots"])
  rows = [line for line in text.splitlines() if line.startswith("| D | 0.0001, 3 |")]
  assert len(rows) == 2  # the test tables: the chosen metric (F1), then accuracy
  for row, metric in zip(rows, ("f1", "accuracy")):
    v = 100 * np.array([scores["vanilla"][s][metric] for s in seeds])
    d = 100 * np.array([scores["D"][s][metric] for s in seeds])
    assert f"| {d.mean():.2f} ± {d.std(ddof=1):.2f} | 4 | {(d - v).mean():+.2f} [" in row
    assert row.endswith(f"| {(d > v).sum()} / {(d < v).sum()} |")
  assert "in accuracy (not the selection metric)" in text


def test_predicted_positives_from_f1_and_accuracy_matches_the_confusion_matrix():
  analyze = _load("analyze_tuned")
  rng = np.random.default_rng(1)
  labels = rng.random(408) < 279 / 408
  for rate in (0.3, 0.7, 0.95):
    preds = np.where(rng.random(408) < 0.8, labels, ~labels) | (rng.random(408) < rate)
    tp = int((preds & labels).sum())
    f1 = 2 * tp / (preds.sum() + labels.sum())
    acc = float((preds == labels).mean())
    got = analyze.predicted_positives(f1, acc, 408, int(labels.sum()))
    assert got == pytest.approx(preds.sum())


def test_dynamic_is_paired_with_fixed_d_and_vanilla_per_task_and_metric():
  analyze = _load("analyze_tuned")
  rng = np.random.default_rng(2)
  seeds = (101, 102, 103)

  def runs(keys):
    return {s: {"metrics": {"dev": {k: float(rng.random()) for k in keys}}} for s in seeds}

  tasks = {"mrpc": {"tests": {m: runs(("f1", "accuracy")) for m in ("vanilla", "D", "dynamic")}},
           "cola": {"tests": {m: runs(("matthews",)) for m in ("vanilla", "D")}}}  # no dynamic
  lines = analyze.dynamic_against_d(tasks)
  rows = [line for line in lines if line.startswith("| mrpc |")]
  assert len(rows) == 2 and not any(line.startswith("| cola |") for line in lines)
  for row, metric in zip(rows, ("f1", "accuracy")):
    t = tasks["mrpc"]["tests"]
    dyn, d, v = (100 * np.array([t[m][s]["metrics"]["dev"][metric] for s in seeds])
                 for m in ("dynamic", "D", "vanilla"))
    cells = [c.strip() for c in row.split("|")[3:-1]]
    assert cells[0].startswith(f"{(dyn - d).mean():+.2f} [")
    assert cells[1] == f"{(dyn > d).sum()} / {(dyn < d).sum()}"
    assert cells[2].startswith(f"{(dyn - v).mean():+.2f} [")
    assert cells[3] == f"{(dyn > v).sum()} / {(dyn < v).sum()}"
  assert analyze.dynamic_against_d({"cola": tasks["cola"]}) == []


def test_dynamic_is_paired_with_fixed_d_in_domain_out_of_domain_and_on_the_gap():
  analyze = _load("analyze_tuned")
  rng = np.random.default_rng(3)
  seeds = (101, 102, 103)
  splits = ("heldout", "sick/test")
  tests = {m: {s: {"metrics": {split: {"accuracy": float(rng.random())} for split in splits}}
               for s in seeds} for m in ("vanilla", "D", "dynamic")}
  rows = [line for line in analyze.dynamic_against_d({"snli": {"tests": tests}})
          if line.startswith("| snli |")]
  assert [row.split("|")[2].strip() for row in rows] == [
      "heldout accuracy", "sick/test accuracy", "gap accuracy"]

  def score(method, split):
    return 100 * np.array([tests[method][s]["metrics"][split]["accuracy"] for s in seeds])

  for row, split in zip(rows, splits):
    cells = [c.strip() for c in row.split("|")[3:-1]]
    assert cells[0].startswith(f"{(score('dynamic', split) - score('D', split)).mean():+.2f} [")
  gap = {m: score(m, "heldout") - score(m, "sick/test") for m in ("dynamic", "D", "vanilla")}
  cells = [c.strip() for c in rows[2].split("|")[3:-1]]
  assert cells[0].startswith(f"{(gap['dynamic'] - gap['D']).mean():+.2f} [")
  assert cells[1] == f"{(gap['dynamic'] > gap['D']).sum()} / {(gap['dynamic'] < gap['D']).sum()}"
  assert cells[2].startswith(f"{(gap['dynamic'] - gap['vanilla']).mean():+.2f} [")


def test_glue_average_pairs_the_four_tasks_mean_per_seed():
  analyze = _load("analyze_tuned")
  rng = np.random.default_rng(3)
  methods = ("vanilla", "F", "D", "dynamic")

  def runs(task, seeds):
    return {s: {"metrics": {"dev": {analyze.METRIC[task]: float(rng.random())}}} for s in seeds}

  full, partial = (101, 102, 103, 104), (101, 102, 103)  # rte's F is missing seed 104
  tasks = {t: {"tests": {m: runs(t, partial if (t, m) == ("rte", "F") else full)
                         for m in methods}} for t in analyze.GLUE_TASKS}
  lines = analyze.glue_average(tasks)
  rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
          for line in lines if line.startswith("| ") and not line.startswith("| method")}
  assert set(rows) == set(methods)

  def mean(method, seeds):  # the reference: per seed, the plain mean of the four scores
    return 100 * np.array([np.mean([tasks[t]["tests"][method][s]["metrics"]["dev"]
                                    [analyze.METRIC[t]] for t in analyze.GLUE_TASKS])
                           for s in seeds])

  assert rows["F"][1] == "3" and rows["vanilla"][1] == "4"
  f, v = mean("F", partial), mean("vanilla", partial)
  assert rows["F"][0].startswith(f"{f.mean():.2f} ± {f.std(ddof=1):.2f}")
  assert rows["F"][2].startswith(f"{(f - v).mean():+.2f} [")
  assert rows["F"][3] == f"{(f > v).sum()} / {(f < v).sum()}"
  dyn, d = mean("dynamic", full), mean("D", full)
  assert rows["dynamic"][4].startswith(f"{(dyn - d).mean():+.2f} [")
  assert rows["dynamic"][5] == f"{(dyn > d).sum()} / {(dyn < d).sum()}"
  assert rows["D"][4] == ""
  assert analyze.glue_average({t: tasks[t] for t in ("sst2", "cola", "mrpc")}) == []


def test_a_method_whose_first_test_run_is_unfinished_is_not_reported(tmp_path):
  analyze = _load("analyze_tuned")
  root = tmp_path / "snli"
  _write(root / "test" / "vanilla" / "seed-101" / "results.json",
         {"metrics": {"heldout": {"accuracy": 0.8}, "sick/test": {"accuracy": 0.5}}})
  os.makedirs(root / "test" / "F" / "seed-101" / "checkpoints" / "100")  # running
  assert list(analyze.load_task(str(root))["tests"]) == ["vanilla"]


def test_the_readme_counts_the_dynamic_networks_selections_as_the_records_do():
  # The README's count of a test run's selections (the first one included) against the
  # records: every selection is an entry of child_network/selections.
  import glob
  import re

  root = os.path.join(HERE, os.pardir, "results", "tuned")
  counts = {len(json.load(open(f))["child_network"]["selections"])
            for f in glob.glob(os.path.join(root, "*", "test", "dynamic", "seed-*",
                                            "results.json"))}
  with open(os.path.join(root, "README.md")) as f:
    said = re.search(r"test runs' selections \((\d+)-(\d+) a run, the first included", f.read())
  assert said, "the README no longer says how many selections a run made"
  assert counts and (min(counts), max(counts)) == (int(said[1]), int(said[2]))
