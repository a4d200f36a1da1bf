"""Tables, paired bootstrap intervals and plots of the GLUE study's finished runs.

Reads ``OUT/<task>/<mode>/seed-<s>/results.json`` and writes ``OUT/summary.md`` (mean ±
std per cell, the paired difference to vanilla with a 95% bootstrap interval over seeds)
and ``OUT/scores.png`` (one panel per task, a point per seed).

  python examples/analyze_study.py --out results/low-resource
"""

from __future__ import annotations

import argparse
import glob
import json
import os

import numpy as np

METRIC = {"cola": "matthews", "sst2": "accuracy", "mrpc": "f1", "rte": "accuracy"}


def load(out: str) -> dict:
  """``scores[task][mode][seed]`` = the task's main dev metric."""
  scores: dict = {}
  for path in glob.glob(os.path.join(out, "*", "*", "seed-*", "results.json")):
    task, mode, seed_dir = path.split(os.sep)[-4:-1]
    with open(path) as f:
      res = json.load(f)
    value = res["metrics"]["dev"][METRIC[task]]
    scores.setdefault(task, {}).setdefault(mode, {})[int(seed_dir[5:])] = value
  return scores


def paired_bootstrap(diffs: np.ndarray, reps: int = 10_000, seed: int = 0) -> tuple[float, float]:
  """95% percentile bootstrap interval of the mean paired difference."""
  rng = np.random.default_rng(seed)
  means = rng.choice(diffs, size=(reps, len(diffs)), replace=True).mean(1)
  return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="results/low-resource")
  args = parser.parse_args()
  scores = load(args.out)
  tasks = [t for t in ("rte", "mrpc", "cola", "sst2") if t in scores]
  modes = ["vanilla", "F", "D", "D-ref", "random"]
  lines = ["| task | mode | seeds | mean ± std | paired diff to vanilla [95% bootstrap CI] |",
           "|---|---|---|---|---|"]
  averages: dict = {}
  for task in tasks:
    base = scores[task].get("vanilla", {})
    for mode in modes:
      cell = scores[task].get(mode)
      if not cell:
        continue
      values = np.array([cell[s] for s in sorted(cell)]) * 100
      std = values.std(ddof=1) if len(values) > 1 else 0.0
      common = sorted(set(cell) & set(base))
      diff = ""
      if mode != "vanilla" and len(common) >= 2:
        d = np.array([cell[s] - base[s] for s in common]) * 100
        lo, hi = paired_bootstrap(d)
        diff = f"{d.mean():+.2f} [{lo:+.2f}, {hi:+.2f}] (n={len(common)})"
      lines.append(f"| {task} ({METRIC[task]}) | {mode} | {len(values)} | "
                   f"{values.mean():.2f} ± {std:.2f} | {diff} |")
      averages.setdefault(mode, {})[task] = cell
  lines += ["", "Average over tasks (seeds present in every task of the mode):", ""]
  for mode, by_task in averages.items():
    if set(by_task) != set(tasks):
      continue
    seeds = sorted(set.intersection(*(set(c) for c in by_task.values())))
    if seeds:
      avg = np.mean([[by_task[t][s] for t in tasks] for s in seeds], axis=1) * 100
      lines.append(f"- {mode}: {avg.mean():.2f} over {len(seeds)} seeds")
  text = "\n".join(lines) + "\n"
  with open(os.path.join(args.out, "summary.md"), "w") as f:
    f.write(text)
  print(text)
  try:
    import matplotlib
  except ImportError:
    return
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.5), squeeze=False)
  for ax, task in zip(axes[0], tasks):
    present = [m for m in modes if m in scores[task]]
    for i, mode in enumerate(present):
      values = np.array(list(scores[task][mode].values())) * 100
      ax.scatter(np.full(len(values), i) + np.linspace(-0.1, 0.1, len(values)), values, s=18)
      ax.hlines(values.mean(), i - 0.25, i + 0.25, color="black")
    ax.set_xticks(range(len(present)), present)
    ax.set_title(f"{task} ({METRIC[task]}, dev)")
  fig.suptitle("all-MiniLM-L6-v2, 1,000 training examples per seed")
  fig.tight_layout()
  fig.savefig(os.path.join(args.out, "scores.png"), dpi=110)


if __name__ == "__main__":
  main()
