"""Child-Tuning for decoder LMs: causal-LM losses, the Fisher of an NNX model, and ``where``
predicates that name a decoder's parts across Llama, Qwen, Gemma and MaxText namings.

For a decoder, the paper's per-example term :math:`\\log p(y \\mid x)` is the summed
log-likelihood of one sequence's *response* tokens, its prompt and padding masked
(:func:`response_nll`); training averages over the response tokens of a batch
(:func:`causal_lm_loss`). :func:`nnx_fisher_information` runs
:func:`~childtune_jax.fisher_information` on an NNX model, split and merged inside.

D's scope for decoders: where a classifier's reference code restricts D to the encoder
layers (``'layer' in name``, so that the new head and the embeddings are always trained),
a decoder has no new head, and the tied embedding is the output layer too; so the
default here is every parameter (``where=None``), and :func:`decoder_layers` gives the
reference's restriction under any naming. (The reference's ``'layer' in name`` happens to
select ``layers/*`` here too, but also matches Gemma's ``input_layernorm``-style names.)
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from childtune_jax.fisher import fisher_information

# -- losses ---------------------------------------------------------------------------------


def token_log_probs(logits: jax.Array, input_ids: jax.Array) -> jax.Array:
  """``log p(x[t + 1] | x[<= t])`` for ``t < T - 1``: ``(batch, T - 1)``, float32."""
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp, input_ids[:, 1:, None], axis=-1)[..., 0]


def response_nll(logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array) -> jax.Array:
  """Each sequence's summed negative log-likelihood of its response tokens: ``(batch,)``.

  ``loss_mask[b, t]`` is 1 where token ``t`` is a response token (predicted from the
  tokens before it), 0 for the prompt and padding. This is :math:`-\\log p(y \\mid x)`,
  the paper's per-example term.
  """
  mask = loss_mask[:, 1:].astype(jnp.float32)
  return -jnp.sum(token_log_probs(logits, input_ids) * mask, axis=-1)


def causal_lm_loss(logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array,
                   weights: jax.Array | None = None) -> jax.Array:
  """The mean negative log-likelihood per response token of a batch (rows of weight 0 out).

  Args:
    logits: ``(batch, T, vocab)``, the next token's logits at every position.
    input_ids: ``(batch, T)``.
    loss_mask: ``(batch, T)``, 1 at the response tokens to predict.
    weights: ``(batch,)``, 0 for padding rows; default all 1.
  """
  mask = loss_mask[:, 1:].astype(jnp.float32)
  if weights is not None:
    mask = mask * weights[:, None].astype(jnp.float32)
  nll = -token_log_probs(logits, input_ids) * mask
  return jnp.sum(nll) / jnp.maximum(jnp.sum(mask), 1.0)


def predicted_positions(loss_mask: np.ndarray, width: int | None = None
                        ) -> tuple[np.ndarray, np.ndarray]:
  """Where a batch predicts its response tokens, for a loss that needs the logits there only.

  Returns ``(positions, valid)`` of shape ``(batch, width)``: position ``t - 1`` for each
  response token ``t`` (row by row, in order), padded with 0 where ``valid`` is 0; ``width``
  defaults to the most response tokens of a row. NumPy, on the host: the shapes are static.
  """
  shifted = np.asarray(loss_mask)[:, 1:] != 0
  counts = shifted.sum(-1)
  width = int(counts.max(initial=1)) if width is None else width
  positions = np.zeros((len(shifted), width), np.int32)
  valid = np.zeros((len(shifted), width), np.float32)
  for row, mask in enumerate(shifted):
    where = np.flatnonzero(mask)[:width]
    positions[row, :len(where)] = where
    valid[row, :len(where)] = 1.0
  return positions, valid


def gathered_nll(logits: jax.Array, input_ids: jax.Array, positions: jax.Array,
                 valid: jax.Array) -> jax.Array:
  """Each row's summed response NLL from the logits at ``positions`` only: ``logits`` is
  ``(batch, width, vocab)`` at those positions (:func:`predicted_positions`), the targets
  the tokens after them. Equals :func:`response_nll` of the full logits."""
  targets = jnp.take_along_axis(input_ids, positions + 1, axis=1)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  return jnp.sum(nll * valid, axis=-1)


# -- the Fisher of an NNX model -------------------------------------------------------------


def nnx_fisher_information(model: Any, loss_fn: Callable[[Any, Any], jax.Array],
                           batches: Iterable[Any], *, wrt: Any = None, **kwargs: Any) -> Any:
  """:func:`~childtune_jax.fisher_information` of a Flax NNX model's parameters.

  ``loss_fn(model, batch) -> scalar`` sees a model (merged from the traced parameters, as
  inside ``nnx.grad``); for the paper's per-example Fisher of a decoder it is the summed
  response negative log-likelihood of the batch (:func:`response_nll`), each example a
  batch of one. The result is an ``nnx.State`` of float32 arrays with the parameters'
  paths, for :func:`~childtune_jax.fisher_mask` and then :func:`~childtune_jax.child_tuning_d`
  as the optimizer of ``nnx.Optimizer(model, tx, wrt=nnx.Param)``.

  Args:
    model: the NNX model.
    loss_fn: ``loss_fn(model, batch) -> scalar``.
    batches: as :func:`~childtune_jax.fisher_information` takes them.
    wrt: which variables are parameters (default ``nnx.Param``).
    **kwargs: :func:`~childtune_jax.fisher_information`'s options (``microbatch_size``, ...).
  """
  from flax import nnx

  wrt = nnx.Param if wrt is None else wrt
  graphdef, params, rest = nnx.split(model, wrt, ...)

  def loss(p: Any, batch: Any) -> jax.Array:
    return loss_fn(nnx.merge(graphdef, p, rest), batch)

  return fisher_information(loss, nnx.as_pure(params), batches, **kwargs)


# -- which parameters are which -------------------------------------------------------------

_ATTENTION = {"self_attn", "attn", "attention", "self_attention"}
_MLP = {"mlp", "ffn", "feed_forward", "feedforward"}
_QUERY = {"q_proj", "q_einsum", "query", "wq", "q"}
_KEY = {"k_proj", "key", "wk", "k", "kv_einsum", "kv_proj"}
_VALUE = {"v_proj", "value", "wv", "v", "kv_einsum", "kv_proj"}
_OUTPUT = {"o_proj", "out_proj", "attn_vec_einsum", "out", "o", "wo"}
_EMBEDDING = {"embed_tokens", "embedder", "input_embedding", "wte", "tok_embeddings",
              "token_embedder"}
_LAYERS = re.compile(r"^(layers?|h|blocks?|layers?_\d+|layer_\d+)$")
_NORM = re.compile(r"norm|^ln(_|\d|f?$)", re.IGNORECASE)


def _parts(path: str) -> list[str]:
  return path.split("/")


def _under(path: str, parents: set[str], names: set[str]) -> bool:
  parts = _parts(path)
  return any(p in parents for p in parts[:-1]) and any(p in names for p in parts)


def attention_query(path: str) -> bool:
  """The query projection of attention (``q_proj``, Gemma's ``q_einsum``, MaxText's ``query``)."""
  return _under(path, _ATTENTION, _QUERY)


def attention_key(path: str) -> bool:
  """The key projection (Gemma's fused ``kv_einsum`` counts as key and as value)."""
  return _under(path, _ATTENTION, _KEY)


def attention_value(path: str) -> bool:
  """The value projection (Gemma's fused ``kv_einsum`` counts as key and as value)."""
  return _under(path, _ATTENTION, _VALUE)


def attention_output(path: str) -> bool:
  """Attention's output projection (``o_proj``, Gemma's ``attn_vec_einsum``, ``out``)."""
  return _under(path, _ATTENTION, _OUTPUT)


def attention(path: str) -> bool:
  """Every parameter of the attention blocks (projections and their biases)."""
  return any(p in _ATTENTION for p in _parts(path)[:-1])


def mlp(path: str) -> bool:
  """Every parameter of the MLP blocks (``gate_proj``, ``up_proj``, ``down_proj``, ...)."""
  return any(p in _MLP for p in _parts(path)[:-1])


def norms(path: str) -> bool:
  """The normalisation layers' parameters (RMSNorm or LayerNorm, in the layers or final)."""
  return any(_NORM.search(p) for p in _parts(path)[:-1])


def embeddings(path: str) -> bool:
  """The input token embedding (also the output layer of a tied model)."""
  parts = _parts(path)
  return any(p in _EMBEDDING for p in parts[:-1]) or parts[-1] == "input_embedding"


def lm_head(path: str) -> bool:
  """An untied output layer (``lm_head``, MaxText's ``logits_dense``)."""
  parts = _parts(path)
  return parts[0] in ("lm_head", "output") or "logits_dense" in parts


def decoder_layers(path: str) -> bool:
  """The transformer layers (``layers/...``, ``layers/3/...``, ``layer_3/...``, ``h/3/...``):
  the reference code's scope for D (``'layer' in name``), under any naming."""
  return any(_LAYERS.match(p) for p in _parts(path)[:-1])


def matrices(path: str) -> bool:
  """The weight matrices of attention and MLP (no biases, norms or embeddings): what
  LoRA adapts and what Half Fine-Tuning freezes half of."""
  last = _parts(path)[-1]
  return (attention(path) or mlp(path)) and last in ("kernel", "w", "weight")


__all__ = ["attention", "attention_key", "attention_output", "attention_query",
           "attention_value", "causal_lm_loss", "decoder_layers", "embeddings", "gathered_nll",
           "lm_head", "matrices", "mlp", "nnx_fisher_information", "norms",
           "predicted_positions", "response_nll", "token_log_probs"]
