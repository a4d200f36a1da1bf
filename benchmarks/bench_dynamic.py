"""The dynamic child network's update against adamw's, on a BERT-base-sized pytree.

``chain(child_tuning_dynamic(0.3, every=E), adamw)`` costs an ordinary step (the score's
EMA and the packed mask) on most steps and a re-selection (the exact radix search for the
top-30% threshold, 3 histogram passes) every ``E`` steps. Measured side by side in one
process (cases interleaved over rounds, median of each): ``adamw`` alone, an ordinary
dynamic step, a re-selection step (global and per-leaf), and the amortised cost
``((E - 1) * ordinary + reselection) / E``; the same for ``child_tuning_dynamic_adamw``,
whose score is Adam's own second moment. Each case is appended to ``--jsonl`` as soon as
it is measured.

  python benchmarks/bench_dynamic.py --jsonl benchmarks/results/dynamic.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import platform

import jax
import numpy as np
import optax
from bench_update import bert_base_like, time_update

from childtune_jax import child_tuning_dynamic, child_tuning_dynamic_adamw


def state_mb(tx: optax.GradientTransformation, params: dict) -> float:
  shapes = jax.eval_shape(tx.init, params)
  return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(shapes)) / 2**20


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--scale", type=float, default=1.0, help="shrink the model for a smoke run")
  parser.add_argument("--every", type=int, nargs="+", default=[10, 50, 100])
  parser.add_argument("--jsonl", help="append each result here as it finishes")
  args = parser.parse_args()
  params = bert_base_like(args.scale)
  n = sum(x.size for x in jax.tree_util.tree_leaves(params))
  adamw = optax.adamw(1e-4, eps=1e-6, weight_decay=0.01)
  never = 2**30  # selects at step 0 (the warm-up step) and never again: ordinary steps
  cases = {
      "adamw": adamw,
      "dynamic ordinary step": optax.chain(child_tuning_dynamic(0.3, every=never), adamw),
      "dynamic ordinary step (bfloat16 score)": optax.chain(
          child_tuning_dynamic(0.3, every=never, score_dtype="bfloat16"), adamw),
      "dynamic re-selection (global)": optax.chain(child_tuning_dynamic(0.3, every=1), adamw),
      "dynamic re-selection (per leaf)": optax.chain(
          child_tuning_dynamic(0.3, every=1, scope="per_leaf"), adamw),
      # the score is Adam's own second moment: no buffer of its own
      "dynamic adamw ordinary step": child_tuning_dynamic_adamw(
          1e-4, 0.3, every=never, eps=1e-6, weight_decay=0.01),
      "dynamic adamw re-selection (global)": child_tuning_dynamic_adamw(
          1e-4, 0.3, every=1, eps=1e-6, weight_decay=0.01),
  }
  info = {"scalars": int(n), "device": jax.devices()[0].device_kind, "cpus": os.cpu_count(),
          "machine": platform.machine(), "jax": jax.__version__, "reps": args.reps}
  print(f"update of {n / 1e6:.1f}M scalars on {info['device']} ({os.cpu_count()} cores)")

  def emit(row: dict) -> None:
    row = {**row, **info}
    print(f"{row['case']:44s} {row['ms']:9.1f} ms {row['ratio_to_adamw']:7.3f}x adamw"
          + (f" {row['state_mb']:9.1f} MiB state" if "state_mb" in row else ""), flush=True)
    if args.jsonl:
      os.makedirs(os.path.dirname(os.path.abspath(args.jsonl)), exist_ok=True)
      with open(args.jsonl, "a") as f:
        f.write(json.dumps(row) + "\n")

  samples: dict[str, list[float]] = {name: [] for name in cases}
  for _ in range(args.rounds):  # interleaved, so that drifts in speed hit every case alike
    for name, tx in cases.items():
      samples[name].append(time_update(tx, params, args.reps))
  ms = {name: float(np.median(s)) for name, s in samples.items()}
  base = ms["adamw"]
  for name, tx in cases.items():
    emit({"case": name, "ms": ms[name], "ratio_to_adamw": ms[name] / base,
          "state_mb": state_mb(tx, params)})
  for name in ("dynamic", "dynamic adamw"):
    for every in args.every:
      amortised = ((every - 1) * ms[f"{name} ordinary step"]
                   + ms[f"{name} re-selection (global)"]) / every
      emit({"case": f"{name} amortised, every {every}", "ms": amortised,
            "ratio_to_adamw": amortised / base})


if __name__ == "__main__":
  main()
