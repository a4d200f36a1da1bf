"""The dynamic network's re-selection: 3 radix passes (11, 11, 10 bits) against 4 (8 bits each).

``child_tuning_dynamic_adamw``'s update on the BERT-base-sized pytree (109.5M scalars) with a
re-selection every step and with none, under both digit layouts of the exact radix select
(``childtune_jax.dynamic._DIGITS``, patched while each is traced), and ``adamw`` alone:
cases interleaved over rounds in one process, medians.

  python benchmarks/bench_radix.py --rounds 3 --reps 3
"""

from __future__ import annotations

import argparse

import numpy as np
import optax
from bench_update import bert_base_like, time_update

from childtune_jax import child_tuning_dynamic_adamw, dynamic

LAYOUTS = {"3 passes (11/11/10 bits)": ((21, 11), (10, 11), (0, 10)),
           "4 passes (8 bits)": ((24, 8), (16, 8), (8, 8), (0, 8))}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--reps", type=int, default=3)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--scale", type=float, default=1.0, help="shrink the model for a smoke run")
  args = parser.parse_args()
  params = bert_base_like(args.scale)
  default = dynamic._DIGITS

  def timed(digits, every):
    tx = child_tuning_dynamic_adamw(1e-4, 0.3, every=every, eps=1e-6, weight_decay=0.01)
    dynamic._DIGITS = digits
    try:
      return time_update(tx, params, args.reps)
    finally:
      dynamic._DIGITS = default

  cases = {"adamw": lambda: time_update(optax.adamw(1e-4, eps=1e-6, weight_decay=0.01),
                                        params, args.reps)}
  for name, digits in LAYOUTS.items():
    cases[f"ordinary step, {name}"] = lambda d=digits: timed(d, 2**30)
    cases[f"re-selection, {name}"] = lambda d=digits: timed(d, 1)
  samples: dict[str, list[float]] = {name: [] for name in cases}
  for _ in range(args.rounds):  # interleaved, so that drifts in speed hit every case alike
    for name, run in cases.items():
      samples[name].append(run())
  base = float(np.median(samples["adamw"]))
  for name, s in samples.items():
    print(f"{name:40s} {np.median(s):8.1f} ms {np.median(s) / base:7.3f}x adamw", flush=True)


if __name__ == "__main__":
  main()
