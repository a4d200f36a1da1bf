"""The device check: Child-Tuning's costs on whatever ``jax.devices()`` shows, in one command.

Each case is appended to ``--out DIR/results.jsonl`` the moment it finishes (and printed), so
a run cut short at its time limit still returns every case it finished. Cases run in order
of importance; with ``--budget-s`` a case that would not fit in the time left is skipped,
with a line saying so. Compilation is timed apart from the steady state (``compile_s``);
steady-state times are medians over ``--reps`` calls, each synchronised with the device.

Cases:
1. ``update``: the optimizer update alone on a BERT-base-shaped pytree (110M scalars):
   ``adamw``, F (``hash8``, ``bernoulli``), D (bool and ``uint8``-packed masks), dynamic, with
   the memory bandwidth it achieves against the bytes the update must move.
2. ``train_step``: forward, backward, clip and update of BERT-base and BERT-large (the
   project's own NNX BERT, random init from a config: no weights and no transformers
   needed), vanilla / F / D, float32 and bfloat16 compute.
3. ``fisher``: the per-example Fisher pass (examples/s) and ``fisher_mask``.

  python benchmarks/accelerator.py --out DIR [--budget-s 420] [--smoke]

``--smoke`` uses tiny sizes and few leaves (under a minute on 2 CPU cores); the suite runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_update import bert_base_like  # noqa: E402

from childtune_jax import (  # noqa: E402
    child_tuning_d,
    child_tuning_dynamic,
    child_tuning_f,
    fisher_information,
    fisher_mask,
    is_encoder_layer,
    pack_keep,
)

MODELS = {
    "tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=64, vocab_size=1000),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, vocab_size=30522),
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                  intermediate_size=4096, vocab_size=30522),
}
ADAMW_BYTES = 28  # per float32 scalar: params r/w, gradient r, two moments r/w


class Bench:
  """Runs cases in order, writes each as it finishes, skips what the budget cannot hold."""

  def __init__(self, out: str, budget_s: float | None, reps: int):
    os.makedirs(out, exist_ok=True)
    self.path = os.path.join(out, "results.jsonl")
    self.start, self.budget, self.reps = time.perf_counter(), budget_s, reps
    self.info = {"device_kind": jax.devices()[0].device_kind, "devices": jax.device_count(),
                 "platform": jax.devices()[0].platform, "jax": jax.__version__}
    self.last_s: dict[str, float] = {}  # how long the last case of each group took

  def emit(self, row: dict) -> None:
    row = {**row, **self.info}
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    shown = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()
             if k not in self.info}
    print(json.dumps(shown), flush=True)

  def fits(self, case: str, group: str, guess_s: float) -> bool:
    if self.budget is None:
      return True
    left = self.budget - (time.perf_counter() - self.start)
    need = 1.2 * self.last_s.get(group, guess_s)
    if need > left:
      self.emit({"case": case, "skipped": f"needs ~{need:.0f}s, {max(left, 0):.0f}s left"})
      return False
    return True

  def time_fn(self, fn: Callable, args: tuple, *, steps: int | None = None,
              carry: Callable[[Any, tuple], tuple] | None = None) -> tuple[float, float]:
    """``(compile_s, median ms)`` of a jitted ``fn``; ``carry`` feeds outputs to the next call."""
    t = time.perf_counter()
    compiled = fn.lower(*args).compile()
    compile_s = time.perf_counter() - t
    out = compiled(*args)  # one warm-up call
    jax.block_until_ready(out)
    if carry is not None:
      args = carry(out, args)
    times = []
    for _ in range(steps or self.reps):
      t = time.perf_counter()
      out = compiled(*args)
      jax.block_until_ready(out)
      times.append(time.perf_counter() - t)
      if carry is not None:
        args = carry(out, args)
    return compile_s, 1000 * float(np.median(times))


def update_cases(bench: Bench, scale: float, max_leaves: int | None = None) -> None:
  params = bert_base_like(scale, max_leaves)
  n = sum(x.size for x in jax.tree_util.tree_leaves(params))
  grads = jax.tree_util.tree_map(lambda x: x * 0.5, params)
  keep = jax.tree_util.tree_map(
      lambda x: jax.random.bernoulli(jax.random.key(1), 0.3, x.shape), params)
  adamw = optax.adamw(1e-4, eps=1e-6, weight_decay=0.01)
  cases = {  # name: (transformation, extra bytes per scalar beyond adamw's)
      "adamw": (adamw, 0.0),
      "D uint8-packed": (optax.chain(child_tuning_d(pack_keep(keep)), adamw), 1 / 8),
      "F hash8": (optax.chain(child_tuning_f(0.3, 0), adamw), 0.0),
      "D bool": (optax.chain(child_tuning_d(keep), adamw), 1.0),
      "F bernoulli": (optax.chain(child_tuning_f(0.3, 0, sampler="bernoulli"), adamw), 0.0),
      "dynamic ordinary step": (optax.chain(child_tuning_dynamic(0.3, every=10**6), adamw), 12.0),
  }
  base = None
  for name, (tx, extra) in cases.items():
    case = f"update {name}"
    if not bench.fits(case, "update", 30.0):
      continue
    t0 = time.perf_counter()

    def step(p, s, g, tx=tx):
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s

    fn = jax.jit(step, donate_argnums=(0, 1))
    p = jax.tree_util.tree_map(jnp.copy, params)
    compile_s, ms = bench.time_fn(fn, (p, tx.init(p), grads),
                                  carry=lambda out, args: (out[0], out[1], args[2]))
    base = base or ms
    moved = n * (ADAMW_BYTES + extra)
    bench.emit({"case": case, "group": "update", "scalars": int(n), "dtype": "float32",
                "ms": ms, "compile_s": compile_s, "ratio": ms / base, "baseline": "adamw",
                "bytes_moved": moved, "gb_per_s": moved / (ms / 1000) / 1e9})
    bench.last_s["update"] = time.perf_counter() - t0


def _bert(size: str, dtype: Any) -> tuple[Callable, Any]:
  """``apply(params, batch, dropout_key=None)`` and params of a random-init NNX BERT."""
  from flax import nnx

  from childtune_jax.models import EncoderConfig, SequenceClassifier

  cfg = EncoderConfig("bert", **MODELS[size])
  graphdef, state = nnx.split(SequenceClassifier(cfg, rngs=nnx.Rngs(0), dtype=dtype))

  def apply(params: Any, b: dict, key: jax.Array | None = None) -> jax.Array:
    rngs = None if key is None else nnx.Rngs(dropout=key)
    return nnx.merge(graphdef, params)(b["input_ids"], b["attention_mask"],
                                       b["token_type_ids"], rngs=rngs)

  return apply, nnx.to_pure_dict(state)


def _batch(size: str, batch: int, seq: int) -> dict:
  rng = np.random.default_rng(0)
  vocab = MODELS[size]["vocab_size"]
  return {"input_ids": rng.integers(5, vocab, (batch, seq)).astype(np.int32),
          "attention_mask": np.ones((batch, seq), np.int32),
          "token_type_ids": np.zeros((batch, seq), np.int32),
          "labels": rng.integers(0, 2, batch).astype(np.int32)}


def train_step_cases(bench: Bench, sizes: list[str], batch: int, seq: int) -> None:
  for size in sizes:
    for dtype_name in ("float32", "bfloat16"):
      dtype = jnp.dtype(dtype_name)
      group = f"train_step {size}"
      if not bench.fits(f"train_step {size} {dtype_name}", group, 60.0):
        continue
      model, params = _bert(size, dtype)
      data = _batch(size, batch, seq)

      def loss_fn(p, b, rng=None, model=model):
        logits = model(p, b, rng).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, b["labels"]).mean()

      keep = jax.tree_util.tree_map(
          lambda x: jax.random.bernoulli(jax.random.key(1), 0.3, x.shape), params)
      adamw = optax.adamw(4e-5, eps=1e-6, weight_decay=0.01)
      modes = {"vanilla": adamw, "F": optax.chain(child_tuning_f(0.3, 0), adamw),
               "D": optax.chain(child_tuning_d(pack_keep(keep)), adamw)}
      base = None
      for mode, core in modes.items():
        case = f"train_step {size} {dtype_name} {mode}"
        if not bench.fits(case, group, 60.0):
          continue
        t0 = time.perf_counter()
        tx = optax.chain(optax.clip_by_global_norm(1.0), core)

        def step(p, s, b, i, tx=tx, loss_fn=loss_fn):
          loss, g = jax.value_and_grad(loss_fn)(p, b, jax.random.fold_in(jax.random.key(0), i))
          u, s = tx.update(g, s, p)
          return optax.apply_updates(p, u), s, loss

        fn = jax.jit(step, donate_argnums=(0, 1))
        p = jax.tree_util.tree_map(jnp.copy, params)
        compile_s, ms = bench.time_fn(
            fn, (p, tx.init(p), data, jnp.int32(0)),
            carry=lambda out, args: (out[0], out[1], args[2], args[3] + 1))
        base = base or ms
        bench.emit({"case": case, "group": "train_step", "model": size, "batch": batch,
                    "seq": seq, "dtype": dtype_name, "ms": ms, "compile_s": compile_s,
                    "ratio": ms / base, "baseline": f"vanilla {dtype_name}",
                    "examples_per_s": batch / (ms / 1000)})
        bench.last_s[group] = time.perf_counter() - t0


def fisher_cases(bench: Bench, size: str, batch: int, seq: int, microbatch: int) -> None:
  if not bench.fits(f"fisher {size}", "fisher", 90.0):
    return
  model, params = _bert(size, jnp.float32)
  data = _batch(size, batch, seq)

  def loss_fn(p, b):
    return optax.softmax_cross_entropy_with_integer_labels(model(p, b), b["labels"]).mean()

  batches = [data] * 3
  t = time.perf_counter()
  fisher_information(loss_fn, params, batches[:1], microbatch_size=microbatch, progress=False)
  first = time.perf_counter() - t  # compile + one batch
  t = time.perf_counter()
  fisher = fisher_information(loss_fn, params, batches, microbatch_size=microbatch,
                              progress=False)
  jax.block_until_ready(fisher)
  total = time.perf_counter() - t
  # The second call reuses the first one's compiled step: 3 batches of steady work.
  bench.emit({"case": f"fisher per-example {size}", "group": "fisher", "model": size,
              "batch": batch, "seq": seq, "microbatch": microbatch, "dtype": "float32",
              "first_call_s": first, "examples_per_s": 3 * batch / total})
  t = time.perf_counter()
  keep = fisher_mask(fisher, 0.3, where=is_encoder_layer)
  jax.block_until_ready(keep)
  scalars = sum(x.size for x in jax.tree_util.tree_leaves(fisher))
  bench.emit({"case": f"fisher_mask {size}", "group": "fisher", "scalars": int(scalars),
              "ms": 1000 * (time.perf_counter() - t)})


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="results.jsonl is appended here")
  parser.add_argument("--budget-s", type=float, help="skip cases that would not fit")
  parser.add_argument("--smoke", action="store_true", help="tiny sizes, for CPU and CI")
  parser.add_argument("--reps", type=int, default=10)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--seq", type=int, default=128)
  args = parser.parse_args(argv)
  if args.smoke:
    bench = Bench(args.out, args.budget_s, reps=2)
    update_cases(bench, scale=0.01, max_leaves=2)
    train_step_cases(bench, ["tiny"], batch=4, seq=16)
    fisher_cases(bench, "tiny", batch=4, seq=16, microbatch=2)
  else:
    bench = Bench(args.out, args.budget_s, reps=args.reps)
    update_cases(bench, scale=1.0)
    train_step_cases(bench, ["base", "large"], batch=args.batch, seq=args.seq)
    fisher_cases(bench, "base", batch=args.batch, seq=args.seq, microbatch=8)
  bench.emit({"case": "done", "elapsed_s": time.perf_counter() - bench.start})


if __name__ == "__main__":
  main()
