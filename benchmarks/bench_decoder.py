"""A decoder LM's jitted train step with vanilla AdamW, Child-Tuning_F and _D, and D's
per-sequence Fisher pass: SmolLM2-135M's architecture (30 layers, GQA, tied embeddings).

Side by side in one process, the cases interleaved over rounds (medians): each mode's step
(forward, backward, clip, update; parameters and optimizer state donated) and its compile
time; then the Fisher pass's time per sequence (one gradient a sequence, ``vmap(grad)`` over
a microbatch), as the difference between a pass of ``1 + reps`` batches and one of 1 batch.
The weights are random (timing does not depend on them), so no checkpoint is needed.

  LD_PRELOAD=libtcmalloc_minimal.so.4 python benchmarks/bench_decoder.py \
      --json benchmarks/results/decoder.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from childtune_jax import child_tuning_d, child_tuning_f, decoder, fisher_mask
from childtune_jax.models import llama

SMOLLM2_135M = dict(model_type="llama", vocab_size=49152, hidden_size=576,
                    intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, rope_theta=100000.0, rms_norm_eps=1e-5,
                    tie_word_embeddings=True, max_position_embeddings=8192)


def batch_of(cfg: llama.DecoderConfig, batch: int, seq: int, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, cfg.vocab_size, size=(batch, seq)).astype(np.int32)
  loss_mask = np.zeros((batch, seq), np.float32)
  loss_mask[:, seq // 2:] = 1.0  # the second half is the response
  return {"input_ids": ids, "loss_mask": loss_mask}


def make_step(graphdef, rest, tx):
  def loss(params, batch):
    model = nnx.merge(graphdef, params, rest)
    logits = model(batch["input_ids"])
    return decoder.causal_lm_loss(logits, batch["input_ids"], batch["loss_mask"])

  def step(params, opt_state, batch):
    value, grads = jax.value_and_grad(loss)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  return jax.jit(step, donate_argnums=(0, 1))


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--layers", type=int, default=30, help="fewer for a quick run")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=64)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--fisher-reps", type=int, default=2)
  parser.add_argument("--json", default=None)
  args = parser.parse_args(argv)

  cfg = llama.DecoderConfig.from_dict({**SMOLLM2_135M, "num_hidden_layers": args.layers})
  model = llama.CausalLM(cfg, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  params = nnx.as_pure(params)
  n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
  batch = {k: jnp.asarray(v) for k, v in batch_of(cfg, args.batch, args.seq).items()}
  keep = fisher_mask(jax.tree_util.tree_map(
      lambda x: jax.random.uniform(jax.random.key(1), x.shape), params), 0.3)
  adamw = optax.adamw(1e-4, weight_decay=0.01)
  modes = {"vanilla": adamw,
           "F": optax.chain(child_tuning_f(0.3, key=0), adamw),
           "D": optax.chain(child_tuning_d(keep), adamw)}
  copy = lambda tree: jax.tree_util.tree_map(jnp.array, tree)  # noqa: E731 (donated)
  states, steps, compile_s = {}, {}, {}
  for name, tx in modes.items():
    steps[name] = make_step(graphdef, rest, tx)
    p = copy(params)
    start = time.perf_counter()
    p, o, v = steps[name](p, tx.init(p), batch)
    jax.block_until_ready(v)
    compile_s[name] = time.perf_counter() - start  # the first call: compile and one step
    states[name] = (p, o)
  times = {name: [] for name in modes}
  for _ in range(args.rounds):
    for name in modes:
      p, o = states[name]
      start = time.perf_counter()
      p, o, v = steps[name](p, o, batch)
      jax.block_until_ready(v)
      times[name].append(time.perf_counter() - start)
      states[name] = (p, o)
  med = {name: statistics.median(t) for name, t in times.items()}
  rows = [{"case": f"train step {name}", "s": med[name], "ratio": med[name] / med["vanilla"],
           "first_call_s": compile_s[name], "tokens_per_s": args.batch * args.seq / med[name]}
          for name in modes]
  del states

  def nll(m, b):
    return jnp.sum(decoder.response_nll(m(b["input_ids"]), b["input_ids"], b["loss_mask"]))

  for micro in (1, 4):
    def run(n, micro=micro):
      start = time.perf_counter()
      f = decoder.nnx_fisher_information(model, nll, [batch] * n, microbatch_size=micro)
      jax.block_until_ready(jax.tree_util.tree_leaves(f))
      return time.perf_counter() - start
    run(1)  # compile
    one, more = run(1), run(1 + args.fisher_reps)
    per_seq = (more - one) / (args.fisher_reps * args.batch)
    rows.append({"case": f"fisher per-example microbatch {micro}", "s_per_sequence": per_seq,
                 "ratio_to_step_per_sequence": per_seq / (med["vanilla"] / args.batch)})
  meta = {"model": f"SmolLM2-135M architecture, {args.layers} layers, {n_params:,} params",
          "batch": args.batch, "seq": args.seq, "rounds": args.rounds, "jax": jax.__version__,
          "backend": jax.default_backend(), "cpu": platform.processor() or platform.machine()}
  for r in rows:
    print(json.dumps(r))
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
