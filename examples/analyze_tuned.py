"""Tables and plots of the tuned study (``examples/tuned_study.py``), as far as it has run.

Writes ``OUT/summary.md`` (per task: each method's chosen point, its test mean ± std over
the test seeds, the paired difference to vanilla with a 95% bootstrap interval and the count
of seeds above and below; the selection grid), ``OUT/sensitivity.png`` (mean selection score
against learning rate, one line per method, per task), ``OUT/loss_curves.png`` (training
loss of one seed at each method's chosen point) and ``OUT/dynamic_networks.png`` (the
Jaccard between successive dynamic child networks over training).

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

METRIC = {"sst2": "accuracy", "cola": "matthews", "mrpc": "f1", "rte": "accuracy"}
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
  tests = {os.path.basename(f): _runs(f)
           for f in sorted(glob.glob(os.path.join(root, "test", "*")))}
  return {"grid": grid, "curves": curves, "choices": choices, "tests": tests}


def test_table(task: str, info: dict) -> list[str]:
  metric = METRIC[task]
  lines = ["| method | chosen lr, epochs | selection score | test mean ± std | seeds | "
           "Δ vs vanilla [95% CI] | above / below |", "|---|---|---:|---:|---:|---:|---:|"]
  base = {s: r["metrics"]["dev"][metric] for s, r in info["tests"].get("vanilla", {}).items()}
  for method, choice in info["choices"].items():
    point = (choice["learning_rate"], choice["epochs"])
    sel = np.mean(info["grid"].get(method, {}).get(point, [np.nan]))
    scores = {s: r["metrics"]["dev"][metric] for s, r in info["tests"].get(method, {}).items()}
    if scores:
      values = 100 * np.array(list(scores.values()))
      std = np.std(values, ddof=1) if len(values) > 1 else 0.0
      test = f"{values.mean():.2f} ± {std:.2f}"
    else:
      test = "not yet"
    paired = sorted(set(scores) & set(base))
    diff, counts = "", ""
    if method != "vanilla" and paired:
      d = 100 * np.array([scores[s] - base[s] for s in paired])
      diff = f"{d.mean():+.2f}"
      if len(d) >= 3:
        lo, hi = paired_bootstrap(d)
        diff += f" [{lo:+.2f}, {hi:+.2f}]"
      counts = f"{int((d > 0).sum())} / {int((d < 0).sum())}"
    lines.append(f"| {method} | {point[0]:g}, {point[1]} | {100 * sel:.2f} | {test} | "
                 f"{len(scores)} | {diff} | {counts} |")
  return lines


def grid_table(info: dict) -> list[str]:
  points = sorted({p for g in info["grid"].values() for p in g})
  lines = ["| method | " + " | ".join(f"lr {lr:g}, {ep} ep" for lr, ep in points) + " |",
           "|---|" + "---:|" * len(points)]
  for method, g in info["grid"].items():
    cells = [f"{100 * np.mean(g[p]):.2f} ({len(g[p])})" if p in g else "" for p in points]
    lines.append(f"| {method} | " + " | ".join(cells) + " |")
  return lines


def plots(out: str, tasks: dict[str, dict]) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  n = len(tasks)
  fig, axes = plt.subplots(1, n, figsize=(max(5.5, 4.5 * n), 3.8), squeeze=False)
  for ax, (task, info) in zip(axes[0], tasks.items()):
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

  fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 3.6), squeeze=False)
  for ax, (task, info) in zip(axes[0], tasks.items()):
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
  for ax, (task, info) in zip(axes[0], tasks.items()):
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
    ax.legend(fontsize=7)
  if drawn:
    fig.suptitle("Does the dynamic child network settle?")
    fig.tight_layout()
    files.save_figure(fig, os.path.join(out, "dynamic_networks.png"), dpi=110)
  plt.close(fig)


def main(argv: list[str] | None = None) -> str:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="results/tuned")
  parser.add_argument("--no-plots", action="store_true")
  args = parser.parse_args(argv)
  tasks = {t: load_task(os.path.join(args.out, t)) for t in ("sst2", "cola", "mrpc", "rte")
           if os.path.isdir(os.path.join(args.out, t))}
  if not tasks:
    sys.exit(f"no task folders in {args.out}: run examples/tuned_study.py first")
  lines = ["# Tuned study: results so far", "",
           "Generated by `python examples/analyze_tuned.py`; the protocol is in README.md. "
           "Scores in points (x100). Test = the official dev set, scored only at each "
           "method's chosen point.", ""]
  for task, info in tasks.items():
    lines += [f"## {task} ({METRIC[task]})", ""]
    if info["choices"]:
      lines += test_table(task, info) + [""]
    lines += ["Selection grid (mean selection score, number of seeds):", ""]
    lines += grid_table(info) + [""]
  text = "\n".join(lines)
  files.write_text(os.path.join(args.out, "summary.md"), text)
  if not args.no_plots:
    plots(args.out, tasks)
  print(text)
  return text


if __name__ == "__main__":
  main()
