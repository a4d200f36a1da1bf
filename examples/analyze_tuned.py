"""Tables and plots of the tuned study (``examples/tuned_study.py``), as far as it has run.

Writes ``OUT/summary.md`` (per task: each method's chosen point, its test mean ± std over
the test seeds, the paired difference to vanilla with a 95% bootstrap interval and the count
of seeds above and below, MRPC also in accuracy; the selection grid; the four GLUE tasks'
mean per test seed, paired; the dynamic network paired with fixed D; the multi-task arm
against the single-task runs per task and over the four; vanilla at another method's
chosen point, where run (``tuned_study.py --control-at``); the CLI's defaults),
``OUT/sensitivity.png`` (mean selection score against learning rate, one line per method,
per task), ``OUT/loss_curves.png`` (training loss of one seed at each method's chosen point)
and ``OUT/dynamic_networks.png`` (the Jaccard between successive dynamic child networks over
training) and, for the NLI arm, ``OUT/transfer.png`` (in-domain against SICK accuracy, per
test seed and method).

  python examples/analyze_tuned.py --out results/tuned
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from analyze_study import paired_bootstrap  # noqa: E402

from childtune_jax.app import files  # noqa: E402

METRIC = {"sst2": "accuracy", "cola": "matthews", "mrpc": "f1", "rte": "accuracy",
          "snli": "accuracy", "glue4": "mean main metric"}
# A second metric reported beside the chosen one (never chosen on): MRPC's F1 rewards
# answering "paraphrase" more often, so its accuracy says whether a gain is a real one.
ALSO = {"mrpc": "accuracy"}
TASKS = tuple(METRIC)
MRPC_DEV = (408, 279)  # MRPC's dev set: pairs, paraphrases (GLUE's fixed file)
MULTI, MULTI_TASKS = "glue4", ("sst2", "cola", "mrpc", "rte")
IN_DOMAIN, TRANSFER = "heldout", "sick/test"  # the NLI arm's two test splits
CONTROL = "vanilla-at-"  # control/vanilla-at-<method>: vanilla at the method's chosen point
POINT = re.compile(r"lr(?P<lr>[0-9.e+-]+)-ep(?P<epochs>\d+)$")


def _read(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


def _runs(folder: str) -> dict[int, dict]:
  out = {}
  for path in glob.glob(os.path.join(folder, "seed-*", "results.json")):
    out[int(os.path.basename(os.path.dirname(path))[5:])] = _read(path)
  return out


def load_task(root: str) -> dict:
  """Selection grid, choices and test runs of one task folder."""
  grid: dict[str, dict[tuple[float, int], list[float]]] = {}
  curves: dict[str, dict[tuple[float, int], dict[int, dict]]] = {}
  for folder in sorted(glob.glob(os.path.join(root, "select", "*", "lr*-ep*"))):
    method = os.path.basename(os.path.dirname(folder))
    m = POINT.match(os.path.basename(folder))
    point = (float(m["lr"]), int(m["epochs"]))
    runs = _runs(folder)
    if runs:
      grid.setdefault(method, {})[point] = [r["selection_score"] for r in runs.values()]
      curves.setdefault(method, {})[point] = runs
  choice_path = os.path.join(root, "choice.json")
  choices = _read(choice_path) if os.path.exists(choice_path) else {}
  tests, controls = {}, {}
  for folder in sorted(glob.glob(os.path.join(root, "test", "*"))):
    if runs := _runs(folder):  # a method whose first test run is still going has none
      tests[os.path.basename(folder)] = runs
  for folder in sorted(glob.glob(os.path.join(root, "control", CONTROL + "*"))):
    if runs := _runs(folder):
      controls[os.path.basename(folder)[len(CONTROL):]] = runs
  return {"grid": grid, "curves": curves, "choices": choices, "tests": tests,
          "controls": controls}


def paired_splits(task: str) -> tuple[str, ...]:
  """The test splits a paired comparison reports: the NLI arm's two and their gap, or dev."""
  return (IN_DOMAIN, TRANSFER, "gap") if task == "snli" else ("dev",)


def _test_scores(runs: dict[int, dict], split: str, metric: str) -> dict[int, float]:
  """A seed's test score on ``split``; ``gap``: in-domain minus transfer accuracy."""
  if split == "gap":
    return {s: r["metrics"][IN_DOMAIN][metric] - r["metrics"][TRANSFER][metric]
            for s, r in runs.items()}
  return {s: r["metrics"][split][metric] for s, r in runs.items()}


def paired_columns(scores: dict[int, float], base: dict[int, float]) -> tuple[str, str]:
  """The paired difference (points) with a 95% bootstrap interval, and seeds above/below."""
  paired = sorted(set(scores) & set(base))
  if not paired:
    return "", ""
  d = 100 * np.array([scores[s] - base[s] for s in paired])
  text = f"{d.mean():+.2f}"
  if len(d) >= 3:
    lo, hi = paired_bootstrap(d)
    text += f" [{lo:+.2f}, {hi:+.2f}]"
  return text, f"{int((d > 0).sum())} / {int((d < 0).sum())}"


def predicted_positives(f1: float, accuracy: float, n: int, positives: int) -> float:
  """How many examples a binary classifier called positive, from its F1 and accuracy.

  With ``tp`` true and ``fp`` false positives: ``accuracy * n = tp + (n - positives - fp)``
  and ``f1 = 2 tp / (tp + fp + positives)``; solved for ``tp + fp`` (F1 < 1).
  """
  negatives = n - positives
  tp = f1 * (negatives - accuracy * n + positives) / (2 - 2 * f1)
  return 2 * tp + negatives - accuracy * n


def mean_std(scores: dict[int, float]) -> str:
  """``mean ± std`` of the seeds' scores, in points."""
  values = 100 * np.array(list(scores.values()))
  std = np.std(values, ddof=1) if len(values) > 1 else 0.0
  return f"{values.mean():.2f} ± {std:.2f}"


def test_table(task: str, info: dict, split: str = "dev", label: str = "test",
               metric: str | None = None) -> list[str]:
  """Each method's test mean and its paired difference to vanilla, on one test split
  (in the task's main metric unless ``metric`` is given)."""
  metric = metric or METRIC[task]
  lines = [f"| method | {'split' if split != 'dev' else 'chosen lr, epochs'} | selection score | "
           f"{label} mean ± std | seeds | Δ vs vanilla [95% CI] | above / below |",
           "|---|---|---:|---:|---:|---:|---:|"]
  base = _test_scores(info["tests"].get("vanilla", {}), split, metric)
  for method, choice in info["choices"].items():
    point = (choice["learning_rate"], choice["epochs"])
    sel = np.mean(info["grid"].get(method, {}).get(point, [np.nan]))
    scores = _test_scores(info["tests"].get(method, {}), split, metric)
    test = mean_std(scores) if scores else "not yet"
    diff, counts = paired_columns(scores, base) if method != "vanilla" else ("", "")
    where = f"{point[0]:g}, {point[1]}" if split == "dev" else label
    lines.append(f"| {method} | {where} | {100 * sel:.2f} | {test} | "
                 f"{len(scores)} | {diff} | {counts} |")
  return lines


def dynamic_against_d(tasks: dict[str, dict]) -> list[str]:
  """The dynamic network's test runs paired with fixed D's (and vanilla's), per task."""
  rows = []
  for task, info in tasks.items():
    tests = info["tests"]
    if task == MULTI or "dynamic" not in tests or "D" not in tests:
      continue
    splits = paired_splits(task)
    metrics = (METRIC[task], *([ALSO[task]] if task in ALSO else []))
    for split in splits:
      for metric in metrics:
        dyn = _test_scores(tests["dynamic"], split, metric)
        cells = [*paired_columns(dyn, _test_scores(tests["D"], split, metric)),
                 *paired_columns(dyn, _test_scores(tests.get("vanilla", {}), split, metric))]
        name = metric if split == "dev" else f"{split} {metric}"
        rows.append(f"| {task} | {name} | " + " | ".join(cells) + " |")
  if not rows:
    return []
  return ["## The dynamic network against fixed D (test seeds, paired)", "",
          "| task | metric | dynamic − D [95% CI] | above / below | dynamic − vanilla "
          "[95% CI] | above / below |", "|---|---|---:|---:|---:|---:|", *rows, ""]


def glue_average(tasks: dict[str, dict]) -> list[str]:
  """Each method's mean over the four GLUE tasks' main metrics, per test seed, paired.

  A seed counts only where every task has its test run for both methods compared (the same
  seed number draws each task's own subset; methods are paired within a task and seed).
  Like GLUE's average, it mixes accuracy, MCC and F1 in points.
  """
  if any(t not in tasks for t in GLUE_TASKS):
    return []

  scores = {m: _mean_over_tasks([_test_scores(tasks[t]["tests"].get(m, {}), "dev", METRIC[t])
                                  for t in GLUE_TASKS]) for m in DEFAULT_METHODS}
  if not any(scores.values()):
    return []
  lines = ["## The four GLUE tasks together (test seeds, paired)", "",
           glue_average.__doc__.split("\n\n")[1].replace("\n  ", " ").strip(), "",
           "| method | mean of the four tasks ± std | seeds | Δ vs vanilla [95% CI] | "
           "above / below | Δ vs D [95% CI] | above / below |",
           "|---|---:|---:|---:|---:|---:|---:|"]
  for method, s in scores.items():
    if not s:
      continue
    vs_vanilla = paired_columns(s, scores["vanilla"]) if method != "vanilla" else ("", "")
    vs_d = paired_columns(s, scores["D"]) if method == "dynamic" else ("", "")
    lines.append(f"| {method} | {mean_std(s)} | {len(s)} | " + " | ".join((*vs_vanilla, *vs_d))
                 + " |")
  return lines + [""]


def multitask_tables(tasks: dict[str, dict]) -> list[str]:
  """Per task: single-task vanilla and D and multi-task vanilla and shared-D, paired by seed.

  Each row's difference to single-task D and to single-task vanilla; shared-D's also to
  multi-task vanilla (what the shared child network adds to training the tasks together).
  Last, the same for the four tasks' mean main metric, per seed (as in
  :func:`glue_average`: a seed counts where all four tasks have its run).
  """
  multi = tasks[MULTI]["tests"]
  per_task = {}
  for task in MULTI_TASKS:
    single = tasks.get(task, {}).get("tests", {})
    rows = {f"single-task {m}": _test_scores(single.get(m, {}), "dev", METRIC[task])
            for m in ("vanilla", "D")}
    rows.update({f"multi-task {m}": _test_scores(multi.get(m, {}), f"{task}/dev", METRIC[task])
                 for m in ("vanilla", "shared-D")})
    per_task[f"{task} ({METRIC[task]})"] = rows
  per_task["the tasks' mean main metric (per seed)"] = {
      name: _mean_over_tasks([rows[name] for rows in per_task.values()])
      for name in next(iter(per_task.values()))}
  lines = []
  for title, rows in per_task.items():
    lines += [f"### {title} in the multi-task arm", "",
              "| run | test mean ± std | seeds | Δ vs single-task D [95% CI] | above / below | "
              "Δ vs single-task vanilla [95% CI] | above / below | "
              "Δ vs multi-task vanilla [95% CI] | above / below |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, scores in rows.items():
      if not scores:
        lines.append(f"| {name} | not yet | 0 |" + " |" * 6)
        continue
      against = ["single-task D", "single-task vanilla"]
      if name == "multi-task shared-D":
        against.append("multi-task vanilla")
      cells = [paired_columns(scores, rows[base]) if name != base else ("", "")
               for base in against]
      cells += [("", "")] * (3 - len(cells))
      lines.append(f"| {name} | {mean_std(scores)} | {len(scores)} | "
                   + " | ".join(c for pair in cells for c in pair) + " |")
    lines.append("")
  return lines


def _mean_over_tasks(per_task: list[dict[int, float]]) -> dict[int, float]:
  """Per seed, the mean of the tasks' scores, for the seeds that every task has."""
  seeds = set.intersection(*(set(s) for s in per_task))
  return {s: float(np.mean([scores[s] for scores in per_task])) for s in sorted(seeds)}


def shared_jaccard(tasks: dict[str, dict]) -> dict[str, dict[int, float]]:
  """Per task and test seed: the Jaccard of the shared network with the task's own.

  The task's own network is the top p of its Fisher information alone, from the same run
  (the same examples and head as its single-task D run of the seed, and the shared
  network's p); each shared-D run records it (``child_network.jaccard_with_task_network``).
  """
  found: dict[str, dict[int, float]] = {}
  for seed, r in tasks[MULTI]["tests"].get("shared-D", {}).items():
    for task, j in r["child_network"].get("jaccard_with_task_network", {}).items():
      found.setdefault(task, {})[seed] = j
  return found


def transfer_tables(task: str, info: dict) -> list[str]:
  """The NLI arm: in-domain (held-out SNLI), SICK zero-shot, and the gap between them."""
  lines = []
  for split, label in ((IN_DOMAIN, "in-domain (SNLI held-out)"), (TRANSFER, "SICK test"),
                       ("gap", "in-domain − SICK (gap)")):
    lines += test_table(task, info, split, label) + [""]
  return lines


def control_table(task: str, info: dict) -> list[str]:
  """Vanilla at another method's chosen point, on the test seeds: paired with vanilla at its
  own point (what the schedule does) and with the method (what the masks do on top)."""
  splits = paired_splits(task)
  metric = METRIC[task]
  rows = []
  for method, runs in info.get("controls", {}).items():
    c = info["choices"][method]
    for split in splits:
      control = _test_scores(runs, split, metric)
      cells = [mean_std(control), str(len(control)),
               *paired_columns(control, _test_scores(info["tests"].get("vanilla", {}),
                                                     split, metric)),
               *paired_columns(_test_scores(info["tests"].get(method, {}), split, metric),
                               control)]
      name = metric if split == "dev" else f"{split} {metric}"
      rows.append(f"| vanilla at {method}'s point ({c['learning_rate']:g}, {c['epochs']} ep) "
                  f"| {name} | " + " | ".join(cells) + " |")
  if not rows:
    return []
  return ["Control: vanilla at another method's chosen point (its learning rate and epochs, "
          "no masks), paired over the test seeds with vanilla at its own point and with the "
          "method:", "",
          "| control | metric | mean ± std | seeds | control − vanilla [95% CI] | above / below "
          "| method − control [95% CI] | above / below |",
          "|---|---|---:|---:|---:|---:|---:|---:|", *rows, ""]


def grid_table(info: dict) -> list[str]:
  points = sorted({p for g in info["grid"].values() for p in g})
  lines = ["| method | " + " | ".join(f"lr {lr:g}, {ep} ep" for lr, ep in points) + " |",
           "|---|" + "---:|" * len(points)]
  for method, g in info["grid"].items():
    cells = [f"{100 * np.mean(g[p]):.2f} ({len(g[p])})" if p in g else "" for p in points]
    lines.append(f"| {method} | " + " | ".join(cells) + " |")
  return lines


GLUE_TASKS = ("sst2", "cola", "mrpc", "rte")  # the tasks whose choices set the CLI's defaults
DEFAULT_METHODS = ("vanilla", "F", "D", "dynamic")
SHORT, LONG, STUDY_STEPS_PER_EPOCH = 3, 10, 63  # 1,000 examples in batches of 16


def _grid_means(choice: dict) -> dict[tuple[float, int], float]:
  """A choice's selection grid, mean score per point; a diverged point scores ``-inf``."""
  return {(g["learning_rate"], g["epochs"]): -np.inf if g["mean"] is None else g["mean"]
          for g in choice["grid"]}


def mean_ranks(grids: list[dict[float, float]]) -> dict[float, float]:
  """Each learning rate's rank (1 = best; ties share their mean rank), averaged over grids."""
  ranks: dict[float, list[float]] = {}
  for grid in grids:
    for lr, score in grid.items():
      above = sum(s > score for s in grid.values())
      tied = sum(s == score for s in grid.values()) - 1
      ranks.setdefault(lr, []).append(1 + above + tied / 2)
  return {lr: float(np.mean(r)) for lr, r in ranks.items() if len(r) == len(grids)}


def derive_defaults(tasks: dict[str, dict]) -> dict[str, dict]:
  """The CLI's ``tuned`` preset: per method, one learning rate and training length.

  The rule, over the GLUE tasks whose choice of the method is made: the learning rate is the
  one with the best mean rank in the tasks' 3-epoch selection grids (complete for every
  rate; ties go to the lower rate); the training length is 10 epochs of 1,000 examples
  (630 steps) if, on average over the tasks, the 10-epoch runs scored above the 3-epoch
  runs at the same rate (measured at each task's best 3-epoch rate), else 3 (189 steps).
  """
  out = {}
  for method in DEFAULT_METHODS:
    grids = {t: _grid_means(tasks[t]["choices"][method]) for t in GLUE_TASKS
             if t in tasks and method in tasks[t]["choices"]}
    ranks = mean_ranks([{lr: s for (lr, ep), s in g.items() if ep == SHORT}
                        for g in grids.values()])
    if not ranks:  # no task has its choice of the method, or no 3-epoch grid
      continue
    lr = min(ranks, key=lambda r: (ranks[r], r))
    gains = [g[(r, LONG)] - g[(r, SHORT)] for g in grids.values()
             for (r, ep) in g if ep == LONG]
    epochs = LONG if gains and np.mean(gains) > 0 else SHORT
    out[method] = {"learning_rate": lr, "min_steps": epochs * STUDY_STEPS_PER_EPOCH,
                   "tasks": sorted(grids), "mean_rank": ranks,
                   "long_gain": float(np.mean(gains)) if gains else None}
  return out


def defaults_section(defaults: dict[str, dict]) -> list[str]:
  """The summary's "Defaults" section: the rule's output, which `presets.TUNED` must equal."""
  lines = ["## Defaults for the CLI (`childtune_jax.app.presets.TUNED`)", "",
           derive_defaults.__doc__.split("\n\n")[1].replace("\n  ", " ").strip(), "",
           "| method | tasks | mean rank per lr (3 epochs) | lr | 10 − 3 epochs (points) | "
           "min steps |", "|---|---|---|---:|---:|---:|"]
  for method, d in defaults.items():
    ranks = ", ".join(f"{lr:g}: {r:.2f}" for lr, r in sorted(d["mean_rank"].items()))
    gain = "" if d["long_gain"] is None else f"{100 * d['long_gain']:+.2f}"
    lines.append(f"| {method} | {' '.join(d['tasks'])} | {ranks} | {d['learning_rate']:g} | "
                 f"{gain} | {d['min_steps']} |")
  return lines + [""]


def plots(out: str, tasks: dict[str, dict]) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  gridded = {t: info for t, info in tasks.items() if info["grid"]}  # a task not yet run: none
  n = len(gridded)
  if not n:
    return
  fig, axes = plt.subplots(1, n, figsize=(max(5.5, 4.5 * n), 3.8), squeeze=False)
  for ax, (task, info) in zip(axes[0], gridded.items()):
    for method, g in info["grid"].items():
      pts = sorted(p for p in g if p[1] == 3)
      ax.plot([p[0] for p in pts], [100 * np.mean(g[p]) for p in pts], "o-", label=method)
    ax.set_xscale("log")
    lrs = sorted({p[0] for g in info["grid"].values() for p in g})
    ax.set_xticks(lrs, [f"{lr:g}" for lr in lrs], rotation=30)
    ax.minorticks_off()
    ax.set_xlabel("learning rate (3 epochs)")
    ax.set_ylabel(f"selection {METRIC[task]}")
    ax.set_title(task)
    ax.legend(fontsize=8)
  fig.suptitle("Mean selection score over the selection seeds", fontsize=10)
  fig.tight_layout()
  files.save_figure(fig, os.path.join(out, "sensitivity.png"), dpi=110)
  plt.close(fig)

  chosen = {t: info for t, info in tasks.items() if info["choices"]}
  fig, axes = plt.subplots(1, len(chosen), figsize=(4.5 * len(chosen), 3.6), squeeze=False)
  for ax, (task, info) in zip(axes[0], chosen.items()):
    for method, choice in info["choices"].items():
      runs = info["curves"].get(method, {}).get((choice["learning_rate"], choice["epochs"]), {})
      if runs:
        seed = min(runs)
        losses = np.array(runs[seed]["train_losses"], dtype=float)
        window = max(1, len(losses) // 30)
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax.plot(smooth, label=f"{method} (lr {choice['learning_rate']:g}, {choice['epochs']} ep)")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (moving mean)")
    ax.set_title(f"{task}, selection seed at the chosen point")
    ax.legend(fontsize=8)
  fig.tight_layout()
  files.save_figure(fig, os.path.join(out, "loss_curves.png"), dpi=110)
  plt.close(fig)

  fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 3.6), squeeze=False)
  drawn = False
  for ax, (task, info) in zip(axes[0], gridded.items()):
    for point, runs in sorted(info["curves"].get("dynamic", {}).items()):
      seed = min(runs)
      sel = runs[seed].get("child_network", {}).get("selections", [])[1:]  # the first: vs all
      if sel:
        drawn = True
        ax.plot([s["step"] for s in sel], [s["jaccard_previous"] for s in sel],
                label=f"lr {point[0]:g}, {point[1]} ep")
    ax.set_xlabel("step")
    ax.set_ylabel("Jaccard with the previous network")
    ax.set_title(task)
    if ax.get_legend_handles_labels()[0]:  # a task whose dynamic runs have not started: blank
      ax.legend(fontsize=7)
  if drawn:
    fig.suptitle("Does the dynamic child network settle?")
    fig.tight_layout()
    files.save_figure(fig, os.path.join(out, "dynamic_networks.png"), dpi=110)
  plt.close(fig)
  if tasks.get("snli", {}).get("tests"):
    transfer_plot(out, tasks["snli"], plt)


def transfer_plot(out: str, info: dict, plt: object) -> None:
  """Left: in-domain (held-out SNLI) against SICK accuracy, one point per test seed and
  method (and control, as crosses). Right: each seed's difference to vanilla's same seed on
  both; above the diagonal, the method's gap (in-domain minus SICK) is smaller than vanilla's."""
  fig, (ax, paired) = plt.subplots(1, 2, figsize=(10.4, 4.4))
  tests = info["tests"]
  base = {split: _test_scores(tests.get("vanilla", {}), split, "accuracy")
          for split in (IN_DOMAIN, TRANSFER)}
  shown = [(method, runs, "o") for method, runs in tests.items()]
  shown += [(f"vanilla at {method}'s point", runs, "x")
            for method, runs in info.get("controls", {}).items()]
  for i, (name, runs, marker) in enumerate(shown):
    x, y = (_test_scores(runs, split, "accuracy") for split in (IN_DOMAIN, TRANSFER))
    ax.scatter([100 * x[s] for s in x], [100 * y[s] for s in x],
               label=name, alpha=0.8, color=f"C{i}", marker=marker)
    seeds = sorted(set(runs) & set(base[IN_DOMAIN])) if name != "vanilla" else []
    if seeds:
      paired.scatter([100 * (x[s] - base[IN_DOMAIN][s]) for s in seeds],
                     [100 * (y[s] - base[TRANSFER][s]) for s in seeds],
                     label=name, alpha=0.8, color=f"C{i}", marker=marker)
  ax.set_xlabel("in-domain accuracy (SNLI held-out)")
  ax.set_ylabel("out-of-domain accuracy (SICK test, zero-shot)")
  ax.set_title("SNLI → SICK, one point per test seed", fontsize=10)
  ax.legend(fontsize=8)
  (x0, x1), (y0, y1) = paired.get_xlim(), paired.get_ylim()
  lo, hi = min(x0, y0), max(x1, y1)  # one square, so that the diagonal is the equal-gap line
  paired.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="gap as vanilla's")
  paired.set(xlim=(lo, hi), ylim=(lo, hi), aspect="equal")
  paired.axhline(0, color="gray", lw=0.5)
  paired.axvline(0, color="gray", lw=0.5)
  paired.set_xlabel("in-domain − vanilla's, same seed (points)")
  paired.set_ylabel("SICK − vanilla's, same seed (points)")
  paired.set_title("Paired with vanilla: above the diagonal, a smaller gap", fontsize=10)
  paired.legend(fontsize=8)
  fig.tight_layout()
  files.save_figure(fig, os.path.join(out, "transfer.png"), dpi=110)
  plt.close(fig)


def main(argv: list[str] | None = None) -> str:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="results/tuned")
  parser.add_argument("--no-plots", action="store_true")
  args = parser.parse_args(argv)
  tasks = {t: load_task(os.path.join(args.out, t)) for t in TASKS
           if os.path.isdir(os.path.join(args.out, t))}
  if not tasks:
    sys.exit(f"no task folders in {args.out}: run examples/tuned_study.py first")
  lines = ["# Tuned study: results so far", "",
           "Generated by `python examples/analyze_tuned.py`; the protocol is in README.md. "
           "Scores in points (x100). Test = the official dev set (snli: the held-out SNLI "
           "split and SICK's test part), scored only at each method's chosen point.", ""]
  for task, info in tasks.items():
    lines += [f"## {task} ({METRIC[task]})", ""]
    if info["choices"] and task == "snli":
      lines += transfer_tables(task, info)
    elif task == MULTI:
      if info["choices"]:
        lines += ["| method | chosen lr, epochs | selection score (the tasks' mean) |",
                  "|---|---|---:|"]
        for method, c in info["choices"].items():
          point = (c["learning_rate"], c["epochs"])
          sel = np.mean(info["grid"].get(method, {}).get(point, [np.nan]))
          lines.append(f"| {method} | {point[0]:g}, {point[1]} | {100 * sel:.2f} |")
        lines += [""] + multitask_tables(tasks)
      jac = shared_jaccard(tasks)
      if jac:
        p = next(iter(tasks[MULTI]["tests"]["shared-D"].values()))["config"]["reserve_p"]
        lines += ["Jaccard of the shared network with each task's own network of the same "
                  f"size (encoder layers, per test seed; two independent random networks of "
                  f"p = {p:g}: {p / (2 - p):.3f}):", "",
                  "| task | mean | min | max | seeds |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {t} | {np.mean(list(v.values())):.3f} | {min(v.values()):.3f} | "
                  f"{max(v.values()):.3f} | {len(v)} |" for t, v in jac.items()] + [""]
    elif info["choices"]:
      lines += test_table(task, info) + [""]
      if task in ALSO:
        lines += [f"The same test runs in {ALSO[task]} (not the selection metric):", ""]
        lines += test_table(task, info, label=f"test {ALSO[task]}", metric=ALSO[task]) + [""]
      if task == "mrpc":
        lines += [f"Dev pairs answered \"paraphrase\" (of {MRPC_DEV[0]}; {MRPC_DEV[1]} "
                  "are), from each test seed's F1 and accuracy:", ""]
        for method, runs in info["tests"].items():
          counts = sorted(round(predicted_positives(r["metrics"]["dev"]["f1"],
                                                    r["metrics"]["dev"]["accuracy"], *MRPC_DEV))
                          for r in runs.values())
          lines.append(f"- {method}: {', '.join(map(str, counts))}")
        lines.append("")
    if task != MULTI:
      lines += control_table(task, info)
    lines += ["Selection grid (mean selection score, number of seeds):", ""]
    lines += grid_table(info) + [""]
  lines += glue_average(tasks) + dynamic_against_d(tasks)
  defaults = derive_defaults(tasks)
  if defaults:
    lines += defaults_section(defaults)
  text = "\n".join(lines)
  files.write_text(os.path.join(args.out, "summary.md"), text)
  if not args.no_plots:
    plots(args.out, tasks)
  print(text)
  return text


if __name__ == "__main__":
  main()
