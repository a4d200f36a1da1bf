"""Our NNX BERT against transformers' Flax BERT: the same jitted train step, side by side.

Forward, backward, gradient clip and AdamW on random-init models of the same config (the
NNX model takes the HF model's weights, so both compute the same function), cases interleaved
over rounds in one process, and the first step (compile included). Needs transformers < 5
for the HF side.

  python benchmarks/bench_models.py --jsonl benchmarks/results/models.jsonl
  python benchmarks/bench_models.py --memory --shapes minilm:16x64 base:16x128 \
      --jsonl benchmarks/results/models.jsonl
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from bench_train_step import SIZES
from flax import nnx

from childtune_jax.models import EncoderConfig, SequenceClassifier, load_params
from childtune_jax.models.checkpoint import flax_to_pytorch_layout

TX = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(4e-5))


def make_batch(batch: int, seq: int) -> dict:
  rng = np.random.default_rng(0)
  return {"input_ids": rng.integers(1000, 30000, (batch, seq)).astype(np.int32),
          "attention_mask": np.ones((batch, seq), np.int32),
          "token_type_ids": np.zeros((batch, seq), np.int32),
          "labels": rng.integers(0, 2, batch).astype(np.int32)}


def hf_apply(hf, dropout: bool = True):
  def apply(p, b, k):
    return hf(b["input_ids"], b["attention_mask"], b["token_type_ids"], params=p,
              dropout_rng=k if dropout else None, train=dropout).logits
  return apply


def nnx_apply(graphdef, dropout: bool = True):
  def apply(p, b, k):
    return nnx.merge(graphdef, p)(b["input_ids"], b["attention_mask"], b["token_type_ids"],
                                  rngs=nnx.Rngs(dropout=k) if dropout else None)
  return apply


def make_step(apply, tx: optax.GradientTransformation = TX):
  """The jitted train step (forward, backward, and ``tx``: clip and AdamW unless given),
  params donated."""
  def step(p, s, b, i):
    def objective(p):
      logits = apply(p, b, jax.random.fold_in(jax.random.key(0), i))
      return optax.softmax_cross_entropy_with_integer_labels(logits, b["labels"]).mean()
    value, g = jax.value_and_grad(objective)(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, value
  return jax.jit(step, donate_argnums=(0, 1))


def measure(size: str, batch: int, seq: int, reps: int, rounds: int) -> list[dict]:
  from transformers import BertConfig, FlaxBertForSequenceClassification

  cfg = dict(vocab_size=30522, num_labels=2, **SIZES[size])
  hf = FlaxBertForSequenceClassification(BertConfig(**cfg), seed=0)
  nnx_model = SequenceClassifier(EncoderConfig("bert", **cfg), rngs=nnx.Rngs(0))
  load_params(nnx_model, flax_to_pytorch_layout(hf.params))  # the same weights: the same function
  graphdef, state = nnx.split(nnx_model)
  data = make_batch(batch, seq)
  # With dropout (each its own: transformers' Flax BERT shares one attention-dropout mask
  # across the batch, ours draws one per element as PyTorch BERT) and without (the same
  # function: their first losses must agree).
  applies = {"hf-flax": (hf_apply(hf), hf.params),
             "nnx": (nnx_apply(graphdef), nnx.to_pure_dict(state)),
             "hf-flax, no dropout": (hf_apply(hf, False), hf.params),
             "nnx, no dropout": (nnx_apply(graphdef, False), nnx.to_pure_dict(state))}
  steps, states, first, loss = {}, {}, {}, {}
  for name, (apply, params) in applies.items():
    steps[name] = make_step(apply)
    p = jax.tree_util.tree_map(jnp.copy, params)
    t = time.perf_counter()
    p, s, value = steps[name](p, TX.init(p), data, 0)
    jax.block_until_ready(p)
    states[name], first[name], loss[name] = (p, s), time.perf_counter() - t, float(value)
  if abs(loss["nnx, no dropout"] - loss["hf-flax, no dropout"]) > 1e-4:
    raise AssertionError(f"the two models differ: {loss}")
  times: dict[str, list[float]] = {n: [] for n in applies}
  for _ in range(rounds):  # interleaved, so that drifts in speed hit both alike
    for name in applies:
      p, s = states[name]
      for i in range(reps):
        t = time.perf_counter()
        p, s, value = steps[name](p, s, data, i + 1)
        value.block_until_ready()
        times[name].append(time.perf_counter() - t)
      states[name] = (p, s)
  def base(name: str) -> float:
    return float(np.median(times[name.replace("nnx", "hf-flax")]))
  return [{"case": f"train step {name}", "size": size, "batch": batch, "seq": seq,
           "ms": 1000 * float(np.median(times[name])),
           "ratio_to_hf_flax": float(np.median(times[name])) / base(name),
           "first_step_s": first[name], "device": jax.devices()[0].device_kind,
           "jax": jax.__version__} for name in applies]


def memory(impl: str, size: str, batch: int, seq: int) -> dict:
  """One implementation alone in this process: XLA's memory plan of its train step, and the
  process's peak resident memory over 3 steps (Linux ``VmHWM``; CPU: host memory is device
  memory)."""
  cfg = dict(vocab_size=30522, num_labels=2, **SIZES[size])
  if impl == "nnx":
    graphdef, state = nnx.split(SequenceClassifier(EncoderConfig("bert", **cfg), rngs=nnx.Rngs(0)))
    params, apply = nnx.to_pure_dict(state), nnx_apply(graphdef)
  else:
    from transformers import BertConfig, FlaxBertForSequenceClassification

    hf = FlaxBertForSequenceClassification(BertConfig(**cfg), seed=0)
    params, apply = hf.params, hf_apply(hf)
  data = make_batch(batch, seq)
  fn = make_step(apply)
  s = TX.init(params)
  plan = fn.lower(params, s, data, 0).compile().memory_analysis()
  for i in range(3):
    params, s, value = fn(params, s, data, i)
  value.block_until_ready()
  with open("/proc/self/status") as f:
    peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 2**20
  mib = 2**20
  return {"case": f"memory {impl}", "size": size, "batch": batch, "seq": seq,
          "arguments_mib": plan.argument_size_in_bytes / mib,
          "temp_mib": plan.temp_size_in_bytes / mib, "output_mib": plan.output_size_in_bytes / mib,
          "alias_mib": plan.alias_size_in_bytes / mib, "peak_rss_gib": peak,
          "device": jax.devices()[0].device_kind, "jax": jax.__version__}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shapes", nargs="+", default=["minilm:16x64", "base:16x128"])
  parser.add_argument("--reps", type=int, default=3)
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--jsonl")
  parser.add_argument("--memory", action="store_true",
                      help="instead: each implementation's memory, each in its own process")
  parser.add_argument("--memory-child", nargs=2, metavar=("IMPL", "SHAPE"),
                      help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.memory_child:
    impl, spec = args.memory_child
    size, shape = spec.split(":")
    print(json.dumps(memory(impl, size, *map(int, shape.split("x")))), flush=True)
    return
  for spec in args.shapes:
    size, shape = spec.split(":")
    batch, seq = map(int, shape.split("x"))
    if args.memory:
      import subprocess
      import sys

      rows = [json.loads(subprocess.run(
          [sys.executable, __file__, "--memory-child", impl, spec], check=True,
          capture_output=True, text=True).stdout.strip().splitlines()[-1])
          for impl in ("hf-flax", "nnx")]
    else:
      rows = measure(size, batch, seq, args.reps, args.rounds)
    for row in rows:
      print(json.dumps(row), flush=True)
      if args.jsonl:
        with open(args.jsonl, "a") as f:
          f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
  main()
