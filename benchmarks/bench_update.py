"""Optimizer update alone on a BERT-base-sized params pytree: adamw vs Child-Tuning F and D.

Measures, side by side in one process, ms per jitted update (params and optimizer state
donated) of ``adamw`` and of ``chain(child_tuning_*, adamw)`` for each F sampler and
PRNG implementation, and D with a bool keep-mask and with bit-packed ones (``uint8`` and
``uint32`` words), with the bytes each keeps in its state. Prints a table and writes JSON.

  python benchmarks/bench_update.py --json benchmarks/results/update.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from childtune_jax import child_tuning_d, child_tuning_f, pack_keep

BERT_BASE = {  # name: shape, the leaves of BERT-base (110M scalars) grouped by shape
    "word_embeddings": ((30522, 768), 1),
    "position_embeddings": ((512, 768), 1),
    "qkvo_kernel": ((768, 768), 4 * 12),
    "ffn_in_kernel": ((768, 3072), 12),
    "ffn_out_kernel": ((3072, 768), 12),
    "pooler_kernel": ((768, 768), 1),
    "vectors_768": ((768,), 4 * 12 + 12 + 2 * 2 * 12 + 4),
    "ffn_in_bias": ((3072,), 12),
}


def bert_base_like(scale: float = 1.0, max_leaves: int | None = None) -> dict:
  """BERT-base's leaves, each matrix's rows scaled by ``scale``; at most ``max_leaves`` a shape.

  Compilation time grows with the number of leaves: ``max_leaves`` keeps smoke runs short.
  """
  params = {}
  for name, (shape, count) in BERT_BASE.items():
    shape = tuple(max(1, int(d * scale)) if len(shape) > 1 and i == 0 else d
                  for i, d in enumerate(shape))
    for i in range(min(count, max_leaves or count)):
      params[f"{name}_{i}"] = jnp.full(shape, 0.01, jnp.float32)
  return params


def time_update(tx: optax.GradientTransformation, params: dict, reps: int) -> float:
  """Median ms of a jitted, donated ``apply_updates(tx.update(...))`` step."""
  grads = jax.tree_util.tree_map(lambda x: x * 0.5, params)

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  step = jax.jit(step, donate_argnums=(0, 1))
  params = jax.tree_util.tree_map(jnp.copy, params)
  state = tx.init(params)
  params, state = step(params, state, grads)
  jax.block_until_ready(params)
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    params, state = step(params, state, grads)
    jax.block_until_ready(params)
    times.append(time.perf_counter() - t)
  return 1000 * float(np.median(times))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--reps", type=int, default=10)
  parser.add_argument("--scale", type=float, default=1.0, help="shrink the model for a smoke run")
  parser.add_argument("--impls", nargs="+", default=["threefry2x32", "rbg", "unsafe_rbg"])
  parser.add_argument("--samplers", nargs="+", default=["bernoulli", "uint16", "uint8", "hash8"])
  parser.add_argument("--json", help="write the results here")
  args = parser.parse_args()
  params = bert_base_like(args.scale)
  n = sum(x.size for x in jax.tree_util.tree_leaves(params))
  adamw = optax.adamw(1e-4, eps=1e-6, weight_decay=0.01)
  keep = jax.tree_util.tree_map(
      lambda x: jax.random.bernoulli(jax.random.key(1), 0.3, x.shape), params)
  cases = {"adamw": adamw, "D (bool keep)": optax.chain(child_tuning_d(keep), adamw)}
  mask_bytes = {"D (bool keep)": sum(x.nbytes for x in jax.tree_util.tree_leaves(keep))}
  for packing in ("uint8", "uint32"):
    packed = pack_keep(keep, packing)
    cases[f"D ({packing} packed keep)"] = optax.chain(child_tuning_d(packed), adamw)
    mask_bytes[f"D ({packing} packed keep)"] = sum(
        x.nbytes for x in jax.tree_util.tree_leaves(packed))
  for impl in args.impls:
    for sampler in args.samplers:
      key = jax.random.key(0, impl=impl)
      cases[f"F {impl} {sampler}"] = optax.chain(child_tuning_f(0.3, key, sampler=sampler), adamw)
  rows = []
  # Interleave rounds so that drifts in machine speed hit every case alike.
  samples: dict[str, list[float]] = {name: [] for name in cases}
  for _ in range(3):
    for name, tx in cases.items():
      samples[name].append(time_update(tx, params, args.reps))
  base = float(np.median(samples["adamw"]))
  for name, s in samples.items():
    ms = float(np.median(s))
    rows.append({"case": name, "ms": ms, "ratio_to_adamw": ms / base,
                 "mask_mb": mask_bytes.get(name, 0) / 2**20})
  info = {"scalars": int(n), "devices": str(jax.devices()), "cpus": os.cpu_count(),
          "machine": platform.machine(), "jax": jax.__version__, "reps": args.reps}
  print(f"update of {n / 1e6:.1f}M scalars on {jax.devices()[0].device_kind} "
        f"({os.cpu_count()} cores)")
  print(f"{'case':32s} {'ms':>9s} {'x adamw':>8s} {'mask MiB':>9s}")
  for r in rows:
    print(f"{r['case']:32s} {r['ms']:9.1f} {r['ratio_to_adamw']:8.3f} {r['mask_mb']:9.1f}")
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
      json.dump({"info": info, "rows": rows}, f, indent=2)


if __name__ == "__main__":
  main()
