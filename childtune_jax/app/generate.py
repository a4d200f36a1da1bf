"""``childtune generate``: what a decoder says to a prompt, one token a step with a KV cache."""

from __future__ import annotations

import argparse
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from childtune_jax.app import argtypes, config, lm, lmdata
from childtune_jax.app.data import padded_length
from childtune_jax.app.errors import UsageError
from childtune_jax.models import llama


def add_arguments(p: argparse.ArgumentParser) -> None:
  """``childtune generate``'s options."""
  p.add_argument("--model", default=config.DEFAULT_LM,
                 help="a decoder folder (e.g. an sft run's OUT/seed-N/model), a GGUF file, or "
                      "the default SmolLM2-135M-Instruct")
  p.add_argument("--prompt", action="append", required=True, help="a prompt; repeatable")
  p.add_argument("--max-new-tokens", type=argtypes.positive_int, default=64)
  p.add_argument("--temperature", type=argtypes.non_negative, default=0.0,
                 help="0 (the default): greedy; above 0, sampled at this temperature")
  p.add_argument("--top-k", type=argtypes.non_negative_int, default=0,
                 help="sample among the k likeliest tokens only (0: all)")
  p.add_argument("--seed", type=argtypes.seed, default=0, help="the sampling's seed")
  p.add_argument("--no-chat-template", action="store_true",
                 help="give the prompt as plain text, not in the model's chat template")


def generate(model: llama.CausalLM, prompt_ids: list[int], *, max_new_tokens: int,
             eos: tuple[int, ...], temperature: float = 0.0, top_k: int = 0,
             key: jax.Array | None = None) -> list[int]:
  """The tokens ``model`` writes after ``prompt_ids``: greedy, or sampled at ``temperature``
  (among the ``top_k`` likeliest), until an end token or ``max_new_tokens``.

  The prompt fills the cache in one pass (padded to a multiple of 16, so that similar
  lengths share a compiled program); then one jitted step a token.
  """
  n = len(prompt_ids)
  padded = padded_length(n, n + 15, 16)
  length = padded + max_new_tokens
  if length > model.config.max_position_embeddings:
    raise UsageError(f"the prompt's {n} tokens and --max-new-tokens {max_new_tokens} exceed "
                     f"the model's {model.config.max_position_embeddings} positions")
  ids = np.zeros((1, padded), np.int32)
  ids[0, :n] = prompt_ids
  graphdef, state = nnx.split(model)

  @jax.jit
  def prefill(state: Any, ids: jax.Array) -> tuple[jax.Array, Any]:
    m = nnx.merge(graphdef, state)
    logits, cache = m(ids, cache=m.init_cache(1, length), index=0)
    return logits[0, n - 1], cache

  @jax.jit
  def step(state: Any, token: jax.Array, cache: Any, index: jax.Array) -> tuple[jax.Array, Any]:
    logits, cache = nnx.merge(graphdef, state)(token[None, None], cache=cache, index=index)
    return logits[0, -1], cache

  def pick(logits: jax.Array, t: int) -> int:
    if temperature == 0:
      return int(jnp.argmax(logits))
    logits = logits / temperature
    if top_k:
      cut = jnp.sort(logits)[-top_k]
      logits = jnp.where(logits >= cut, logits, -jnp.inf)
    return int(jax.random.categorical(jax.random.fold_in(key, t), logits))

  logits, cache = prefill(state, jnp.asarray(ids))
  out: list[int] = []
  for t in range(max_new_tokens):
    token = pick(logits, t)
    out.append(token)
    if token in eos:
      break
    logits, cache = step(state, jnp.asarray(token, jnp.int32), cache, jnp.int32(n + t))
  return out


def main(args: argparse.Namespace) -> list[str]:
  """Prints what ``--model`` writes after each ``--prompt``."""
  folder = lm.check(args.model, 1)
  loaded = lm.load(folder)
  model = nnx.merge(nnx.graphdef(llama.CausalLM(loaded.config, rngs=nnx.Rngs(0))),
                    loaded.params)
  tok = loaded.tokenizer
  eos = tuple({*loaded.config.eos_ids, *([tok.eos_id] if tok.eos_id is not None else [])})
  answers = []
  for i, prompt in enumerate(args.prompt):
    text = lmdata.render_prompt(tok, prompt, chat=not args.no_chat_template)
    out = generate(model, tok.encode(text), max_new_tokens=args.max_new_tokens, eos=eos,
                   temperature=args.temperature, top_k=args.top_k,
                   key=jax.random.fold_in(jax.random.key(args.seed), i))
    answers.append(tok.decode(out))
    print(answers[-1])
  return answers
