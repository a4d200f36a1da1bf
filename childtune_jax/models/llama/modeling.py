"""A Llama-style decoder LM in Flax NNX: Llama 2/3, SmolLM and Qwen2 checkpoints.

Grouped-query attention, rotary position embeddings with the checkpoint's theta (and Llama
3's frequency scaling), RMSNorm, a SwiGLU MLP, and tied or untied input and output
embeddings, computed as transformers' ``LlamaForCausalLM`` and ``Qwen2ForCausalLM``
compute them (golden logits: ``tests/test_models_llama.py``).

The layers are one stacked module (each parameter has a leading axis of ``num_layers``)
run by ``jax.lax.scan``, so that compiling a train step takes the same time for 2 layers as
for 30. Parameter paths read as Hugging Face's, without its ``model.`` prefix:
``layers/self_attn/q_proj/kernel`` of shape ``(num_layers, hidden, heads * head_dim)``,
``embed_tokens/embedding``, ``norm/scale``, ``lm_head/kernel`` (untied only).

A key-value cache (:meth:`CausalLM.init_cache`) makes generation one token a step.
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

FAMILIES = ("llama", "qwen2")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """The fields of a Hugging Face ``config.json`` that the decoder needs.

  Attributes follow transformers' ``LlamaConfig`` names; ``head_dim`` defaults to
  ``hidden_size // num_attention_heads``; Qwen2 always has biases on q, k and v
  (``attention_bias``); ``rope_scaling`` is ``None`` or Llama 3's
  (``{"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
  "original_max_position_embeddings"}``).
  """

  model_type: str
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int
  head_dim: int
  rope_theta: float = 10_000.0
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = False
  attention_bias: bool = False
  max_position_embeddings: int = 2048
  rope_scaling: tuple[tuple[str, Any], ...] | None = None
  bos_token_id: int | None = None
  eos_token_id: int | tuple[int, ...] | None = None
  pad_token_id: int | None = None

  @classmethod
  def from_dict(cls, config: dict) -> DecoderConfig:
    kind = config.get("model_type")
    if kind not in FAMILIES:
      raise ConfigError(f"model_type {kind!r} is not a decoder family here ({', '.join(FAMILIES)})")
    missing = [n for n in ("vocab_size", "hidden_size", "intermediate_size",
                           "num_hidden_layers", "num_attention_heads") if n not in config]
    if missing:
      raise ConfigError(f"the config lacks {missing}")
    if config.get("hidden_act", "silu") != "silu":
      raise ConfigError(f"hidden_act {config['hidden_act']!r}: the decoder's MLP is SwiGLU (silu)")
    if config.get("mlp_bias"):
      raise ConfigError("mlp_bias: biases in the MLP are not supported")
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    if heads % kv:
      raise ConfigError(f"{heads} attention heads do not group over {kv} key-value heads")
    # transformers 5 writes theta and scaling together in ``rope_parameters``
    parameters = dict(config.get("rope_parameters") or {})
    theta = config.get("rope_theta", parameters.pop("rope_theta", 10_000.0))
    scaling = config.get("rope_scaling") or parameters or None
    if scaling is not None:
      scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
      rope_type = scaling.get("rope_type", scaling.get("type"))
      if rope_type in ("default", None):
        scaling = None
      elif rope_type != "llama3":
        raise ConfigError(f"rope scaling of type {rope_type!r} is not supported (llama3 is)")
    eos = config.get("eos_token_id")
    return cls(
        model_type=kind, vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        num_hidden_layers=config["num_hidden_layers"], num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        rope_theta=float(theta), rms_norm_eps=config.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        attention_bias=bool(config.get("attention_bias", False)) or kind == "qwen2",
        max_position_embeddings=config.get("max_position_embeddings", 2048),
        rope_scaling=None if scaling is None else tuple(sorted(
            (k, v) for k, v in scaling.items() if k not in ("rope_type", "type"))),
        bos_token_id=config.get("bos_token_id"),
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        pad_token_id=config.get("pad_token_id"))

  @classmethod
  def from_file(cls, path: str) -> DecoderConfig:
    with open(path, encoding="utf-8") as f:
      config = json.load(f)
    if not isinstance(config, dict):
      raise ConfigError(f"{path} is not a JSON object")
    return cls.from_dict(config)

  def to_dict(self) -> dict:
    """The config as transformers writes it (``LlamaForCausalLM`` / ``Qwen2ForCausalLM``)."""
    out = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
    if self.rope_scaling is not None:
      out["rope_scaling"] = {"rope_type": "llama3", **dict(self.rope_scaling)}
    if isinstance(self.eos_token_id, tuple):
      out["eos_token_id"] = list(self.eos_token_id)
    out["hidden_act"] = "silu"
    out["architectures"] = [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[
        self.model_type]]
    return out

  @property
  def eos_ids(self) -> tuple[int, ...]:
    if self.eos_token_id is None:
      return ()
    return self.eos_token_id if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)


def rope_frequencies(cfg: DecoderConfig) -> jax.Array:
  """The inverse frequencies of the rotary embedding (``head_dim // 2``), float32."""
  exponents = jnp.arange(0, cfg.head_dim, 2, dtype=jnp.float32) / cfg.head_dim
  inv = 1.0 / (cfg.rope_theta ** exponents)
  if cfg.rope_scaling is None:
    return inv
  s = dict(cfg.rope_scaling)  # Llama 3.1: long wavelengths slowed down, short ones kept
  factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
  old = s["original_max_position_embeddings"]
  wavelength = 2 * math.pi / inv
  scaled = jnp.where(wavelength > old / low, inv / factor, inv)
  smooth = (old / wavelength - low) / (high - low)
  middle = (1 - smooth) * scaled / factor + smooth * scaled
  between = (wavelength >= old / high) & (wavelength <= old / low)
  return jnp.where(between, middle, scaled)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """Rotates ``x`` (``(batch, seq, heads, head_dim)``) by its positions, as transformers'
  ``rotate_half`` convention does (the first half of each head paired with the second)."""
  angles = positions[..., None].astype(jnp.float32) * inv_freq  # (batch, seq, head_dim / 2)
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return (x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)


class RMSNorm(nnx.Module):
  """``scale * x / sqrt(mean(x^2) + eps)``, the mean in float32 (as transformers)."""

  def __init__(self, size: int, eps: float, *, dtype: Any, param_dtype: Any):
    self.scale = nnx.Param(jnp.ones((size,), param_dtype))
    self.eps, self.dtype = eps, dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return self.scale[...].astype(self.dtype) * normed.astype(self.dtype)


class Attention(nnx.Module):
  """Grouped-query self-attention with rotary positions (and a key-value cache)."""

  def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs, dtype: Any, param_dtype: Any):
    def linear(n_in: int, n_out: int, bias: bool) -> nnx.Linear:
      return nnx.Linear(n_in, n_out, use_bias=bias, dtype=dtype, param_dtype=param_dtype,
                        kernel_init=nnx.initializers.normal(0.02), rngs=rngs)

    h, kv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    self.q_proj = linear(cfg.hidden_size, h * hd, cfg.attention_bias)
    self.k_proj = linear(cfg.hidden_size, kv * hd, cfg.attention_bias)
    self.v_proj = linear(cfg.hidden_size, kv * hd, cfg.attention_bias)
    self.o_proj = linear(h * hd, cfg.hidden_size, False)
    self.heads, self.kv_heads, self.head_dim = h, kv, hd

  def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array, inv_freq: jax.Array,
               cache: tuple[jax.Array, jax.Array] | None, index: jax.Array | None
               ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    b, t, _ = x.shape
    q = self.q_proj(x).reshape(b, t, self.heads, self.head_dim)
    k = self.k_proj(x).reshape(b, t, self.kv_heads, self.head_dim)
    v = self.v_proj(x).reshape(b, t, self.kv_heads, self.head_dim)
    q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
    if cache is not None:  # write this step's keys and values at ``index``
      k = jax.lax.dynamic_update_slice_in_dim(cache[0], k.astype(cache[0].dtype), index, axis=1)
      v = jax.lax.dynamic_update_slice_in_dim(cache[1], v.astype(cache[1].dtype), index, axis=1)
      cache = (k, v)
    groups = self.heads // self.kv_heads
    q = q.reshape(b, t, self.kv_heads, groups, self.head_dim)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k.astype(q.dtype)).astype(jnp.float32)
    scores = scores / math.sqrt(self.head_dim)
    scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v.astype(x.dtype))
    return self.o_proj(out.reshape(b, t, self.heads * self.head_dim)), cache


class MLP(nnx.Module):
  """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

  def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs, dtype: Any, param_dtype: Any):
    def linear(n_in: int, n_out: int) -> nnx.Linear:
      return nnx.Linear(n_in, n_out, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                        kernel_init=nnx.initializers.normal(0.02), rngs=rngs)

    self.gate_proj = linear(cfg.hidden_size, cfg.intermediate_size)
    self.up_proj = linear(cfg.hidden_size, cfg.intermediate_size)
    self.down_proj = linear(cfg.intermediate_size, cfg.hidden_size)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
  """Pre-norm attention and MLP, each with a residual."""

  def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs, dtype: Any, param_dtype: Any):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
    self.self_attn = Attention(cfg, rngs=rngs, **kw)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
    self.mlp = MLP(cfg, rngs=rngs, **kw)

  def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array, inv_freq: jax.Array,
               cache: tuple[jax.Array, jax.Array] | None, index: jax.Array | None
               ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    attended, cache = self.self_attn(self.input_layernorm(x), positions, mask, inv_freq, cache,
                                     index)
    x = x + attended
    return x + self.mlp(self.post_attention_layernorm(x)), cache


class CausalLM(nnx.Module):
  """A decoder-only language model: ``model(input_ids, ...) -> logits`` (float32).

  Args:
    cfg: the architecture.
    rngs: initialises the parameters (a checkpoint's weights replace them).
    dtype: compute dtype (``jnp.bfloat16`` for mixed precision); ``param_dtype`` the
      parameters' (float32 master weights).
  """

  def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32):
    self.config, self.dtype = cfg, dtype
    self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype,
                                  param_dtype=param_dtype,
                                  embedding_init=nnx.initializers.normal(0.02), rngs=rngs)

    @nnx.split_rngs(splits=cfg.num_hidden_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def stack(rngs: nnx.Rngs) -> DecoderLayer:
      return DecoderLayer(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    self.layers = stack(rngs)
    self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
    if not cfg.tie_word_embeddings:
      self.lm_head = nnx.Linear(cfg.hidden_size, cfg.vocab_size, use_bias=False, dtype=dtype,
                                param_dtype=param_dtype,
                                kernel_init=nnx.initializers.normal(0.02), rngs=rngs)

  def init_cache(self, batch: int, length: int, dtype: Any = None) -> tuple[jax.Array, jax.Array]:
    """An empty key-value cache for ``batch`` sequences of up to ``length`` tokens."""
    cfg = self.config
    shape = (cfg.num_hidden_layers, batch, length, cfg.num_key_value_heads, cfg.head_dim)
    return (jnp.zeros(shape, dtype or self.dtype), jnp.zeros(shape, dtype or self.dtype))

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
               positions: jax.Array | None = None, *, cache: tuple[jax.Array, jax.Array] | None
               = None, index: jax.Array | int | None = None, hidden: bool = False
               ) -> jax.Array | tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """Logits ``(batch, seq, vocab)`` of the next token at every position.

    Args:
      input_ids: ``(batch, seq)`` token ids.
      attention_mask: ``(batch, seq)``, 1 for real tokens, 0 for padding (right padding);
        with a cache, ``(batch, cache_length)`` over the whole cache.
      positions: ``(batch, seq)``; default ``0, 1, ...`` (after ``index`` with a cache).
      cache: from :meth:`init_cache`; the call writes its keys and values at ``index``
        and returns ``(logits, cache)``.
      index: where in the cache this call's tokens go.
      hidden: return the final hidden states instead of logits.
    """
    b, t = input_ids.shape
    if cache is None:
      causal = jnp.tril(jnp.ones((t, t), bool))[None]
      keys = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
      mask = causal & keys[:, None, :]
      if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    else:
      length = cache[0].shape[2]
      index = jnp.asarray(index, jnp.int32)
      if positions is None:
        positions = jnp.broadcast_to(index + jnp.arange(t), (b, t))
      query_at = index + jnp.arange(t)
      mask = jnp.arange(length)[None, :] <= query_at[:, None]  # (t, length)
      mask = mask[None] & (jnp.ones((b, length), bool) if attention_mask is None
                           else attention_mask.astype(bool))[:, None, :]
    inv_freq = rope_frequencies(self.config)
    x = self.embed_tokens(input_ids)
    graphdef, stacked = nnx.split(self.layers)

    def body(x: jax.Array, layer: tuple[Any, Any]) -> tuple[jax.Array, Any]:
      state, layer_cache = layer
      x, layer_cache = nnx.merge(graphdef, state)(x, positions, mask, inv_freq, layer_cache,
                                                  index)
      return x, layer_cache

    x, new_cache = jax.lax.scan(body, x, (stacked, cache))
    x = self.norm(x)
    out = x.astype(jnp.float32) if hidden else self.logits(x)
    return out if cache is None else (out, new_cache)

  def logits(self, hidden: jax.Array) -> jax.Array:
    """The next token's logits (float32) of final hidden states (``hidden=True``'s output):
    a loss needs them only where a response token is predicted."""
    hidden = hidden.astype(self.dtype)
    if self.config.tie_word_embeddings:
      return self.embed_tokens.attend(hidden).astype(jnp.float32)
    return self.lm_head(hidden).astype(jnp.float32)
