"""A full jitted train step of FlaxBertForSequenceClassification, and the Fisher pass.

Side by side in one process (cases interleaved over rounds, medians): the step time of
vanilla AdamW, Child-Tuning_F and Child-Tuning_D (forward, backward, clip, update; params
and optimizer state donated), and the examples per second of the per-example Fisher
(several microbatch sizes; the time per batch is the difference between a call of
1 + reps batches and a call of 1, which both compile once), the per-batch Fisher and
plain training, with the peak
resident memory of each (Linux ``VmHWM``, reset before each case).

  python benchmarks/bench_train_step.py --size mini --json benchmarks/results/step_mini.json
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from transformers import BertConfig, FlaxBertForSequenceClassification

from childtune_jax import (
    child_tuning_adamw,
    child_tuning_dynamic,
    fisher_information,
    fisher_mask,
    is_encoder_layer,
)

SIZES = {
    "mini": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                 intermediate_size=1024),
    "minilm": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                   intermediate_size=1536),  # all-MiniLM-L6-v2, the CLI's default model
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072),
}


def peak_gb() -> float:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) / 2**20
  return float("nan")


def reset_peak() -> None:
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")


def step_parser(doc: str) -> argparse.ArgumentParser:
  """The options shared by the train-step benchmarks: model size, batch shape, repetitions."""
  parser = argparse.ArgumentParser(description=doc.splitlines()[0])
  parser.add_argument("--size", choices=sorted(SIZES), default="mini")
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--seq", type=int, default=128)
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--json", help="write the results here")
  return parser


def main() -> None:
  parser = step_parser(__doc__)
  parser.add_argument("--microbatches", type=int, nargs="+", default=[1, 4, 16])
  parser.add_argument("--no-fisher", action="store_true", help="time the train steps only")
  args = parser.parse_args()
  config = BertConfig(vocab_size=30522, num_labels=2, **SIZES[args.size])
  model = FlaxBertForSequenceClassification(config, seed=0)
  params = model.params
  rng = np.random.default_rng(0)
  batch = {"input_ids": rng.integers(1000, 30000, (args.batch, args.seq)).astype(np.int32),
           "attention_mask": np.ones((args.batch, args.seq), np.int32),
           "token_type_ids": np.zeros((args.batch, args.seq), np.int32),
           "labels": rng.integers(0, 2, args.batch).astype(np.int32)}

  def loss_fn(params, batch, dropout_rng=None):
    logits = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                   params=params, dropout_rng=dropout_rng, train=dropout_rng is not None).logits
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()

  fisher = fisher_information(loss_fn, params, [batch], per_example=False, progress=False)
  keep = fisher_mask(fisher, 0.3, where=is_encoder_layer)
  del fisher
  kw = dict(eps=1e-6, weight_decay=0.01)
  optimizers = {
      "vanilla": optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(4e-5, **kw)),
      "F (hash8, default)": optax.chain(optax.clip_by_global_norm(1.0),
                                        child_tuning_adamw(4e-5, mode="F", key=0, **kw)),
      "F (bernoulli)": optax.chain(optax.clip_by_global_norm(1.0),
                                   child_tuning_adamw(4e-5, mode="F", key=0,
                                                      sampler="bernoulli", **kw)),
      "D (bool mask)": optax.chain(optax.clip_by_global_norm(1.0),
                                   child_tuning_adamw(4e-5, mode="D", keep=keep, **kw)),
      "D (uint8 packed mask)": optax.chain(
          optax.clip_by_global_norm(1.0),
          child_tuning_adamw(4e-5, mode="D", keep=keep, packing="uint8", **kw)),
      # re-selects every 10 steps, so the timed steps include re-selections (amortised)
      "dynamic (every 10)": optax.chain(
          optax.clip_by_global_norm(1.0),
          child_tuning_dynamic(0.3, every=10, where=is_encoder_layer),
          optax.adamw(4e-5, **kw)),
  }

  def make_step(tx):
    def step(params, state, batch, i):
      loss, grads = jax.value_and_grad(loss_fn)(
          params, batch, jax.random.fold_in(jax.random.key(0), i))
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state, loss
    return jax.jit(step, donate_argnums=(0, 1))

  steps = {name: make_step(tx) for name, tx in optimizers.items()}
  states = {name: (jax.tree_util.tree_map(jnp.copy, params), tx.init(params))
            for name, tx in optimizers.items()}
  times: dict[str, list[float]] = {name: [] for name in optimizers}
  peaks: dict[str, float] = {}
  for name in optimizers:  # compile
    p, s = states[name]
    p, s, _ = steps[name](p, s, batch, 0)
    states[name] = (p, s)
  jax.block_until_ready(states)
  for _ in range(args.rounds):
    for name in optimizers:
      p, s = states[name]
      reset_peak()
      for i in range(args.reps):
        t = time.perf_counter()
        p, s, loss = steps[name](p, s, batch, i)
        loss.block_until_ready()
        times[name].append(time.perf_counter() - t)
      peaks[name] = max(peaks.get(name, 0.0), peak_gb())
      states[name] = (p, s)
  base = float(np.median(times["vanilla"]))
  rows = [{"case": f"train step {name}", "ms": 1000 * float(np.median(t)),
           "ratio_to_vanilla": float(np.median(t)) / base,
           "examples_per_s": args.batch / float(np.median(t)), "peak_rss_gb": peaks[name]}
          for name, t in times.items()]
  del states
  # The peak memory of training alone (above, every optimizer's state was alive).
  reset_peak()
  p, st = jax.tree_util.tree_map(jnp.copy, params), optimizers["vanilla"].init(params)
  for i in range(2):
    p, st, loss = steps["vanilla"](p, st, batch, i)
  loss.block_until_ready()
  rows.append({"case": "train step vanilla (alone, for memory)", "ms": float("nan"),
               "ratio_to_vanilla": float("nan"), "examples_per_s": float("nan"),
               "peak_rss_gb": peak_gb()})
  del p, st

  fisher_cases = {f"Fisher per-example, microbatch {m}": dict(per_example=True, microbatch_size=m)
                  for m in args.microbatches}
  fisher_cases["Fisher per-batch"] = dict(per_example=False)
  if args.no_fisher:
    fisher_cases = {}

  def fisher_seconds(n_batches: int, kwargs: dict) -> float:
    t = time.perf_counter()
    jax.block_until_ready(fisher_information(loss_fn, params, [batch] * n_batches,
                                             progress=False, **kwargs))
    return time.perf_counter() - t

  for name, kwargs in fisher_cases.items():
    # Each call compiles once: the time per batch is the difference of a long and a short call.
    reset_peak()
    short, long = fisher_seconds(1, kwargs), fisher_seconds(1 + args.reps, kwargs)
    sec = (long - short) / args.reps
    rows.append({"case": name, "ms": 1000 * sec, "ratio_to_vanilla": sec / base,
                 "examples_per_s": args.batch / sec, "peak_rss_gb": peak_gb()})
  n = sum(x.size for x in jax.tree_util.tree_leaves(params))
  print(f"BERT-{args.size} ({n / 1e6:.1f}M params), batch {args.batch} x {args.seq} tokens, "
        f"{jax.devices()[0].device_kind}, {os.cpu_count()} cores")
  print(f"{'case':40s} {'ms':>9s} {'x vanilla':>9s} {'ex/s':>8s} {'peak GB':>8s}")
  for r in rows:
    print(f"{r['case']:40s} {r['ms']:9.1f} {r['ratio_to_vanilla']:9.3f} "
          f"{r['examples_per_s']:8.1f} {r['peak_rss_gb']:8.2f}")
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
      json.dump({"size": args.size, "params": int(n), "batch": args.batch, "seq": args.seq,
                 "device": jax.devices()[0].device_kind, "cpus": os.cpu_count(),
                 "jax": jax.__version__, "rows": rows}, f, indent=2)


if __name__ == "__main__":
  main()
