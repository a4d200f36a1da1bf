"""Summaries of finished seeds, and the plain-text tables the commands print."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from childtune_jax.app import tasks


def summarize(all_results: dict[int, dict], task: tasks.Task) -> dict:
  """Mean and sample standard deviation across seeds of every metric.

  Metrics come in the task's order (the main metric first), whether a seed's results were
  computed now or read back from its ``results.json`` (whose keys are sorted).
  """
  def rank(name: str) -> int:
    return task.metrics.index(name) if name in task.metrics else len(task.metrics)

  per_metric: dict[str, list[float]] = {}
  for _, res in sorted(all_results.items()):
    for split, metrics in res["metrics"].items():
      for name in sorted(metrics, key=rank):
        per_metric.setdefault(f"{split}/{name}", []).append(metrics[name])
    if res.get("score") is not None:
      per_metric.setdefault("score", []).append(res["score"])
    if res.get("selection_score") is not None:
      per_metric.setdefault("selection_score", []).append(res["selection_score"])
  out = {"seeds": sorted(all_results), "task": task.name, "metrics": {}}
  for key, values in per_metric.items():
    defined = [v for v in values if v is not None]  # an undefined metric is null
    std = float(np.std(defined, ddof=1)) if len(defined) > 1 else 0.0
    mean = float(np.mean(defined)) if defined else None
    out["metrics"][key] = {"mean": mean, "std": std if defined else None, "values": values}
  return out


RAW = ("loss", "perplexity")  # metrics shown as they are; the others, fractions, in points


def cell(name: str, mean: float | None, std: float | None = None) -> str:
  """A metric as a table shows it: a fraction in points (``100 x``), a loss as it is."""
  if mean is None:
    return "undefined"
  scale, digits = (1.0, 3) if name.rsplit("/", 1)[-1] in RAW else (100.0, 2)
  text = f"{scale * mean:.{digits}f}"
  return text if std is None else f"{text} ± {scale * std:.{digits}f}"


def format_table(rows: list[tuple[str, dict]]) -> str:
  """A plain-text table of mean ± std per metric, one row per run."""
  keys = [k for k in rows[0][1]["metrics"] if k not in ("score", "selection_score")]
  header = ["mode"] + keys + ["seeds"]
  lines = []
  for name, summary in rows:
    cells = [name]
    for k in keys:
      m = summary["metrics"][k]
      cells.append(cell(k, m["mean"], m["std"]))
    cells.append(str(len(summary["seeds"])))
    lines.append(cells)
  return text_table([header] + lines)


def text_table(rows: list[list[str]]) -> str:
  """``rows`` (the first the header) in left-aligned columns, a rule under the header."""
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths))  # noqa: E731
  return "\n".join([fmt(rows[0]), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows[1:]])


def confusion_table(labels: tuple[str, ...], matrix: list[list[int]]) -> str:
  """A confusion matrix with each row's and column's total."""
  rows = [[label, *row] for label, row in zip(labels, matrix)]
  rows.append(["all", *map(sum, zip(*matrix))])
  return text_table([["gold \\ predicted", *labels, "all"]]
                     + [[name, *map(str, counts), str(sum(counts))] for name, *counts in rows])


def print_matrix(title: str, names: list[str], matrix: Any) -> None:
  width = max(len(x) for x in names)
  print(title)
  print(" " * width + "  " + "  ".join(x.rjust(6) for x in names))
  for name, row in zip(names, matrix):
    print(name.ljust(width) + "  " + "  ".join(
        ("undef." if math.isnan(v) else f"{v:6.3f}").rjust(max(6, len(x)))
        for v, x in zip(row, names)))
