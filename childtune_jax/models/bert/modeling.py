"""BERT, RoBERTa and ELECTRA sequence classifiers in Flax NNX, without ``transformers``.

The modules compute what Hugging Face's implementations compute (post-LayerNorm encoder,
exact-erf GELU, additive attention mask) and their parameters carry Hugging Face Flax's
names (``bert/encoder/layer/0/attention/self/query/kernel``), so that path-based choices
such as :func:`childtune_jax.is_encoder_layer` and the weight-decay rule read them alike.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from childtune_jax.models.checkpoint import ConfigError

FAMILIES = ("bert", "roberta", "electra")
_ACTIVATIONS = {"gelu": lambda x: jax.nn.gelu(x, approximate=False), "relu": jax.nn.relu,
                "gelu_new": lambda x: jax.nn.gelu(x, approximate=True), "tanh": jnp.tanh}


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  """The fields of a Hugging Face ``config.json`` that the encoder needs."""

  model_type: str
  vocab_size: int
  hidden_size: int
  num_hidden_layers: int
  num_attention_heads: int
  intermediate_size: int
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  hidden_act: str = "gelu"
  layer_norm_eps: float = 1e-12
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  classifier_dropout: float | None = None
  pad_token_id: int = 0
  embedding_size: int | None = None  # ELECTRA: embeddings narrower than the encoder
  num_labels: int = 2

  @classmethod
  def from_dict(cls, config: dict, **overrides: Any) -> EncoderConfig:
    config = {**config, **overrides}
    kind = config.get("model_type")
    if kind not in FAMILIES:
      raise ConfigError(f"model_type {kind!r} is not one of {FAMILIES}")
    if kind == "roberta":  # transformers' RobertaConfig default
      config.setdefault("layer_norm_eps", 1e-5)
    names = {f.name for f in dataclasses.fields(cls)}
    missing = [n for n in ("vocab_size", "hidden_size", "num_hidden_layers",
                           "num_attention_heads", "intermediate_size") if n not in config]
    if missing:
      raise ConfigError(f"the config lacks {missing}")
    if config.get("hidden_act", "gelu") not in _ACTIVATIONS:
      raise ConfigError(f"hidden_act {config['hidden_act']!r} is not one of "
                        f"{sorted(_ACTIVATIONS)}")
    if "id2label" in config and "num_labels" not in overrides:
      config["num_labels"] = len(config["id2label"])
    return cls(**{k: v for k, v in config.items() if k in names})

  @classmethod
  def from_file(cls, path: str, **overrides: Any) -> EncoderConfig:
    with open(path, encoding="utf-8") as f:
      config = json.load(f)
    if not isinstance(config, dict):
      raise ConfigError(f"{path} is not a JSON object")
    return cls.from_dict(config, **overrides)

  @property
  def max_positions(self) -> int:
    """Usable sequence length (RoBERTa's positions start after the padding index)."""
    offset = self.pad_token_id + 1 if self.model_type == "roberta" else 0
    return self.max_position_embeddings - offset


def _drop(dropout: nnx.Dropout, x: jax.Array, rngs: nnx.Rngs | None) -> jax.Array:
  """Dropout with its own mask for every element, as PyTorch BERT (and the reference code).

  (transformers' Flax BERT shares one attention-dropout mask across the batch,
  ``broadcast_dropout=True``: cheaper, not the same regulariser.) The kept values are scaled
  by a multiply, which XLA keeps in fewer bytes than ``nnx.Dropout``'s select.
  """
  if rngs is None or dropout.rate == 0.0:
    return x
  keep = 1.0 - dropout.rate
  mask = jax.random.bernoulli(rngs[dropout.rng_collection](), keep, x.shape)
  return x * (mask.astype(x.dtype) / jnp.asarray(keep, x.dtype))


def _dense(rngs: nnx.Rngs, din: int, dout: int, dtype: Any, param_dtype: Any,
           std: float = 0.02) -> nnx.Linear:
  return nnx.Linear(din, dout, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                    kernel_init=nnx.initializers.normal(std))


def _norm(rngs: nnx.Rngs, dim: int, eps: float, dtype: Any, param_dtype: Any) -> nnx.LayerNorm:
  return nnx.LayerNorm(dim, epsilon=eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class Embeddings(nnx.Module):
  """Word + position + token-type embeddings, LayerNorm, dropout."""

  def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs, dtype: Any, param_dtype: Any):
    width = cfg.embedding_size or cfg.hidden_size
    embed = lambda n: nnx.Embed(n, width, dtype=dtype, param_dtype=param_dtype, rngs=rngs,  # noqa: E731
                                embedding_init=nnx.initializers.normal(0.02))
    self.word_embeddings = embed(cfg.vocab_size)
    self.position_embeddings = embed(cfg.max_position_embeddings)
    self.token_type_embeddings = embed(cfg.type_vocab_size)
    self.LayerNorm = _norm(rngs, width, cfg.layer_norm_eps, dtype, param_dtype)
    self.dropout = nnx.Dropout(cfg.hidden_dropout_prob)
    self.roberta = cfg.model_type == "roberta"
    self.pad = cfg.pad_token_id

  def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    if self.roberta:  # positions count the non-padding tokens, after the padding index
      mask = (input_ids != self.pad).astype(jnp.int32)
      positions = jnp.cumsum(mask, axis=1) * mask + self.pad
    else:
      positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
    x = (self.word_embeddings(input_ids) + self.position_embeddings(positions)
         + self.token_type_embeddings(token_type_ids))
    return _drop(self.dropout, self.LayerNorm(x), rngs)


class SelfAttention(nnx.Module):
  def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs, dtype: Any, param_dtype: Any):
    h = cfg.hidden_size
    if h % cfg.num_attention_heads:
      raise ConfigError(f"hidden_size {h} is not a multiple of num_attention_heads "
                        f"{cfg.num_attention_heads}")
    self.query = _dense(rngs, h, h, dtype, param_dtype)
    self.key = _dense(rngs, h, h, dtype, param_dtype)
    self.value = _dense(rngs, h, h, dtype, param_dtype)
    self.heads = cfg.num_attention_heads
    self.dropout = nnx.Dropout(cfg.attention_probs_dropout_prob)

  def __call__(self, x: jax.Array, bias: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
    b, t, h = x.shape
    split = lambda y: y.reshape(b, t, self.heads, h // self.heads)  # noqa: E731
    q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(h // self.heads)
    probs = jax.nn.softmax((scores + bias).astype(jnp.float32), axis=-1).astype(x.dtype)
    probs = _drop(self.dropout, probs, rngs)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, h)


class AddNorm(nnx.Module):
  """``LayerNorm(dropout(dense(x)) + residual)``: the ``output`` block of HF's layers."""

  def __init__(self, din: int, cfg: EncoderConfig, *, rngs: nnx.Rngs, dtype: Any,
               param_dtype: Any):
    self.dense = _dense(rngs, din, cfg.hidden_size, dtype, param_dtype)
    self.LayerNorm = _norm(rngs, cfg.hidden_size, cfg.layer_norm_eps, dtype, param_dtype)
    self.dropout = nnx.Dropout(cfg.hidden_dropout_prob)

  def __call__(self, x: jax.Array, residual: jax.Array,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    return self.LayerNorm(_drop(self.dropout, self.dense(x), rngs) + residual)


class Attention(nnx.Module):
  def __init__(self, cfg: EncoderConfig, **kw: Any):
    self.self = SelfAttention(cfg, **kw)
    self.output = AddNorm(cfg.hidden_size, cfg, **kw)

  def __call__(self, x: jax.Array, bias: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
    return self.output(self.self(x, bias, rngs), x, rngs)


class Intermediate(nnx.Module):
  def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs, dtype: Any, param_dtype: Any):
    self.dense = _dense(rngs, cfg.hidden_size, cfg.intermediate_size, dtype, param_dtype)
    self.act = _ACTIVATIONS[cfg.hidden_act]

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.act(self.dense(x))


class Layer(nnx.Module):
  def __init__(self, cfg: EncoderConfig, **kw: Any):
    self.attention = Attention(cfg, **kw)
    self.intermediate = Intermediate(cfg, **kw)
    self.output = AddNorm(cfg.intermediate_size, cfg, **kw)

  def __call__(self, x: jax.Array, bias: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
    x = self.attention(x, bias, rngs)
    return self.output(self.intermediate(x), x, rngs)


class Encoder(nnx.Module):
  def __init__(self, cfg: EncoderConfig, **kw: Any):
    self.layer = nnx.List([Layer(cfg, **kw) for _ in range(cfg.num_hidden_layers)])

  def __call__(self, x: jax.Array, bias: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
    for layer in self.layer:
      x = layer(x, bias, rngs)
    return x


class Pooler(nnx.Module):
  def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs, dtype: Any, param_dtype: Any):
    self.dense = _dense(rngs, cfg.hidden_size, cfg.hidden_size, dtype, param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    return jnp.tanh(self.dense(x[:, 0]))


class Backbone(nnx.Module):
  """The encoder of one family (``bert``, ``roberta`` or ``electra``), and BERT's pooler."""

  def __init__(self, cfg: EncoderConfig, **kw: Any):
    self.embeddings = Embeddings(cfg, **kw)
    if cfg.embedding_size and cfg.embedding_size != cfg.hidden_size:
      self.embeddings_project = _dense(kw["rngs"], cfg.embedding_size, cfg.hidden_size,
                                       kw["dtype"], kw["param_dtype"])
    self.encoder = Encoder(cfg, **kw)
    if cfg.model_type == "bert":
      self.pooler = Pooler(cfg, **kw)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array,
               token_type_ids: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
    x = self.embeddings(input_ids, token_type_ids, rngs)
    if hasattr(self, "embeddings_project"):
      x = self.embeddings_project(x)
    bias = jnp.where(attention_mask[:, None, None, :] > 0, 0.0,
                     jnp.finfo(x.dtype).min).astype(x.dtype)
    return self.encoder(x, bias, rngs)


class ClassificationHead(nnx.Module):
  """RoBERTa's and ELECTRA's head: ``out_proj(dropout(act(dense(dropout(h[:, 0])))))``."""

  def __init__(self, cfg: EncoderConfig, act: str, *, rngs: nnx.Rngs, dtype: Any,
               param_dtype: Any):
    self.dense = _dense(rngs, cfg.hidden_size, cfg.hidden_size, dtype, param_dtype)
    self.out_proj = _dense(rngs, cfg.hidden_size, cfg.num_labels, dtype, param_dtype)
    rate = cfg.classifier_dropout if cfg.classifier_dropout is not None else cfg.hidden_dropout_prob
    self.dropout = nnx.Dropout(rate)
    self.act = _ACTIVATIONS[act]

  def __call__(self, h: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
    x = self.act(self.dense(_drop(self.dropout, h[:, 0], rngs)))
    return self.out_proj(_drop(self.dropout, x, rngs))


class SequenceClassifier(nnx.Module):
  """A sequence classifier of any of the three families, named as Hugging Face Flax names it.

  BERT: ``bert`` (with its pooler) and a linear ``classifier`` on the pooled output;
  RoBERTa and ELECTRA: ``roberta``/``electra`` and a ``classifier`` head (``dense`` +
  ``out_proj``; tanh for RoBERTa, GELU for ELECTRA) on the first token.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from childtune_jax.models import EncoderConfig, SequenceClassifier
    >>> cfg = EncoderConfig("bert", vocab_size=50, hidden_size=8, num_hidden_layers=1,
    ...                     num_attention_heads=2, intermediate_size=16)
    >>> model = SequenceClassifier(cfg, rngs=nnx.Rngs(0))
    >>> ids = jnp.ones((2, 5), jnp.int32)
    >>> model(ids, jnp.ones_like(ids), jnp.zeros_like(ids)).shape
    (2, 2)
  """

  def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.config = cfg
    setattr(self, cfg.model_type, Backbone(cfg, **kw))
    if cfg.model_type == "bert":
      rate = (cfg.classifier_dropout if cfg.classifier_dropout is not None
              else cfg.hidden_dropout_prob)
      self.dropout = nnx.Dropout(rate)
      self.classifier = _dense(rngs, cfg.hidden_size, cfg.num_labels, dtype, param_dtype)
    else:
      act = "tanh" if cfg.model_type == "roberta" else cfg.hidden_act
      self.classifier = ClassificationHead(cfg, act, **kw)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array,
               token_type_ids: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
    """Logits; dropout is on when ``rngs`` (e.g. ``nnx.Rngs(dropout=key)``) is given."""
    backbone = getattr(self, self.config.model_type)
    h = backbone(input_ids, attention_mask, token_type_ids, rngs)
    if self.config.model_type == "bert":
      return self.classifier(_drop(self.dropout, backbone.pooler(h), rngs))
    return self.classifier(h, rngs)
