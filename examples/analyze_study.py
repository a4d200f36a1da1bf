"""Tables, paired bootstrap intervals and plots of the GLUE study's finished runs.

Reads ``OUT/<task>/<mode>/seed-<s>/results.json`` and writes ``OUT/summary.md`` (mean ±
std per cell, the paired difference to vanilla with a 95% percentile bootstrap interval
over seeds and the count of seeds above and below vanilla, per task and averaged over
tasks; with 5 seeds the bootstrap interval is narrower than the truth, so read the counts
too; the same for each task's other metrics, such as MRPC's accuracy beside its F1; where
the ``random`` control ran, the paired difference of D to it) and ``OUT/scores.png`` (one
panel per task, a point per seed). With ``--glue``, it adds the score of a constant
prediction of the training set's majority class: the floor that a model which learnt
nothing reaches.

  python examples/analyze_study.py --out results/low-resource --glue ../shared/glue
"""

from __future__ import annotations

import argparse
import glob
import json
import os

import numpy as np

from childtune_jax.app import files

METRIC = {"cola": "matthews", "sst2": "accuracy", "mrpc": "f1", "rte": "accuracy"}
MODES = ["vanilla", "F", "D", "D-ref", "random"]


def majority_scores(glue: str, tasks: list[str]) -> dict[str, dict[str, float]]:
  """Every dev metric of always predicting the training set's most frequent label."""
  from childtune_jax.app import data
  from childtune_jax.app.metrics import glue_metrics
  from childtune_jax.app.tasks import TASKS

  out = {}
  for task in tasks:
    spec = TASKS[task]
    train, evals = data.load_glue_folder(spec, glue)
    labels, counts = np.unique(train.labels, return_counts=True)
    dev = evals["dev"].labels
    constant = np.full(len(dev), labels[np.argmax(counts)])
    out[task] = glue_metrics(spec.metrics, constant, dev)
  return out


def load(out: str) -> tuple[dict, dict[str, set]]:
  """``runs[task][mode][seed]`` = the run's dev metrics, and what the runs were set up with."""
  runs: dict = {}
  setup: dict[str, set] = {"learning_rate": set(), "model": set(), "max_train_samples": set()}
  for path in glob.glob(os.path.join(out, "*", "*", "seed-*", "results.json")):
    task, mode, seed_dir = path.split(os.sep)[-4:-1]
    with open(path) as f:
      res = json.load(f)
    runs.setdefault(task, {}).setdefault(mode, {})[int(seed_dir[5:])] = res["metrics"]["dev"]
    for key, values in setup.items():
      values.add(res["config"].get(key))
  return runs, setup


def select(runs: dict, metric: str | None = None) -> dict:
  """``scores[task][mode][seed]``: one metric of every run (default: each task's main one)."""
  return {task: {mode: {seed: m[metric or METRIC[task]] for seed, m in cell.items()}
                 for mode, cell in modes.items()}
          for task, modes in runs.items()}


def describe(setup: dict[str, set]) -> str:
  """The plot's title: the model, the training set size and the learning rate of the runs."""
  models = ", ".join(sorted(str(m) for m in setup["model"] - {None})) or "model not recorded"
  sizes = setup["max_train_samples"]
  data = ("the full training set" if sizes == {None} else
          ", ".join(f"{n:,}" for n in sorted(n for n in sizes if n is not None))
          + " training examples per seed" + (" or all" if None in sizes else ""))
  lr = ", ".join(f"{r:g}" for r in sorted(setup["learning_rate"] - {None}))
  return f"{models}, {data}, lr {lr}"


def paired_bootstrap(diffs: np.ndarray, reps: int = 10_000, seed: int = 0) -> tuple[float, float]:
  """95% percentile bootstrap interval of the mean paired difference."""
  rng = np.random.default_rng(seed)
  means = rng.choice(diffs, size=(reps, len(diffs)), replace=True).mean(1)
  return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def paired_diff(cell: dict, base: dict, base_name: str) -> str:
  """Mean paired difference over the common seeds, its interval, and the seeds above/below."""
  common = sorted(set(cell) & set(base))
  if not common:
    return ""
  d = np.array([cell[s] - base[s] for s in common]) * 100
  counts = f"above {base_name} in {int((d > 0).sum())}, below in {int((d < 0).sum())}"
  if len(common) < 3:  # a bootstrap of one or two values is no interval at all
    return f"{d.mean():+.2f} (n={len(common)}, too few seeds for an interval; {counts})"
  lo, hi = paired_bootstrap(d)
  return f"{d.mean():+.2f} [{lo:+.2f}, {hi:+.2f}] (n={len(common)}; {counts})"


def _row(label: str, mode: str, cell: dict, base: dict) -> str:
  """One table row: mean ± std over seeds (no std of one seed), and the paired difference."""
  values = np.array([cell[s] for s in sorted(cell)]) * 100
  spread = f"{values.mean():.2f}" + (f" ± {values.std(ddof=1):.2f}" if len(values) > 1 else "")
  diff = paired_diff(cell, base, "vanilla") if mode != "vanilla" else ""
  return f"| {label} | {mode} | {len(values)} | {spread} | {diff} |"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="results/low-resource")
  parser.add_argument("--glue", help="GLUE folder, for the majority-class floor")
  args = parser.parse_args()
  runs, setup = load(args.out)
  if not runs:
    parser.error(f"no finished runs (<task>/<mode>/seed-<s>/results.json) under {args.out}")
  scores = select(runs)
  tasks = [t for t in ("rte", "mrpc", "cola", "sst2") if t in scores]
  floors = majority_scores(args.glue, tasks) if args.glue else {}
  floor = {t: f[METRIC[t]] for t, f in floors.items()}
  lines = ["| task | mode | seeds | mean ± std | paired diff to vanilla [95% bootstrap CI] |",
           "|---|---|---|---|---|"]
  for task in tasks:
    if task in floor:
      lines.append(f"| {task} ({METRIC[task]}) | majority class | | {100 * floor[task]:.2f} | |")
    lines += [_row(f"{task} ({METRIC[task]})", mode, scores[task][mode],
                   scores[task].get("vanilla", {}))
              for mode in MODES if scores[task].get(mode)]
  # Per seed, the mean over tasks; a mode counts where every task has that seed.
  average: dict = {}
  for mode in MODES if len(tasks) > 1 else []:
    if all(scores[t].get(mode) for t in tasks):
      seeds = set.intersection(*(set(scores[t][mode]) for t in tasks))
      average[mode] = {s: float(np.mean([scores[t][mode][s] for t in tasks])) for s in seeds}
  lines += [_row(f"average of {len(tasks)} tasks", mode, cell, average.get("vanilla", {}))
            for mode, cell in average.items() if cell]
  if floor and average:
    lines.append(f"| average of {len(tasks)} tasks | majority class | | "
                 f"{100 * np.mean(list(floor.values())):.2f} | |")
  # The other metrics of a task: a gain in the main one may be a shift of the decision rule.
  others = {t: sorted({k for cell in runs[t].values() for m in cell.values() for k in m}
                      - {METRIC[t]}) for t in tasks}
  if any(others.values()):
    lines += ["", "Each task's other metrics.", "",
              "| task | mode | seeds | mean ± std | paired diff to vanilla [95% bootstrap CI] |",
              "|---|---|---|---|---|"]
    for task in tasks:
      for metric in others[task]:
        label = f"{task} ({metric})"
        if task in floors and metric in floors[task]:
          lines.append(f"| {label} | majority class | | {100 * floors[task][metric]:.2f} | |")
        cells = {mode: {s: m[metric] for s, m in runs[task][mode].items() if metric in m}
                 for mode in MODES if runs[task].get(mode)}
        lines += [_row(label, mode, cell, cells.get("vanilla", {}))
                  for mode, cell in cells.items() if cell]
  controlled = [t for t in tasks if scores[t].get("D") and scores[t].get("random")]
  if controlled:
    lines += ["", "Analysis (a): the task-driven child network against a fixed random one of the "
              "same size.", "", "| task | D − random [95% bootstrap CI] |", "|---|---|"]
    for t in controlled:
      diff = paired_diff(scores[t]["D"], scores[t]["random"], "random")
      lines.append(f"| {t} ({METRIC[t]}) | {diff} |")
  text = "\n".join(lines) + "\n"
  files.write_text(os.path.join(args.out, "summary.md"), text)
  print(text)
  try:
    import matplotlib
  except ImportError:
    return
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.5), squeeze=False)
  for ax, task in zip(axes[0], tasks):
    present = [m for m in MODES if m in scores[task]]
    for i, mode in enumerate(present):
      values = np.array(list(scores[task][mode].values())) * 100
      ax.scatter(np.full(len(values), i) + np.linspace(-0.1, 0.1, len(values)), values, s=18)
      ax.hlines(values.mean(), i - 0.25, i + 0.25, color="black")
    if task in floor:
      ax.axhline(100 * floor[task], color="gray", linestyle="--", linewidth=1,
                 label="majority class")
      ax.legend(loc="lower right", fontsize=8)
    ax.set_xticks(range(len(present)), present)
    ax.set_title(f"{task} ({METRIC[task]}, dev)")
  fig.suptitle(describe(setup))
  fig.tight_layout()
  files.save_figure(fig, os.path.join(args.out, "scores.png"), dpi=110)
  plt.close(fig)


if __name__ == "__main__":
  main()
