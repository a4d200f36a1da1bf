"""A Flax NNX CLIP (ViT image tower, causal text tower) that reads Hugging Face checkpoints.

Parameters are named as transformers' ``FlaxCLIPModel`` names them, so the predicates of
:mod:`childtune_jax.clip` (``vision_tower``, ``text_tower``, ``projections``, ...) select
them; the checkpoint is a local Hugging Face folder (``config.json`` and
``model.safetensors``, e.g. ``openai/clip-vit-base-patch32`` downloaded once), read without
torch or transformers.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from childtune_jax.models.bert.modeling import _norm
from childtune_jax.models.checkpoint import ConfigError

ACTIVATIONS = {"quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
               "gelu": lambda x: jax.nn.gelu(x, approximate=False),
               "gelu_new": lambda x: jax.nn.gelu(x, approximate=True)}


@dataclasses.dataclass(frozen=True)
class TowerConfig:
  """One tower's shape (the fields of a Hugging Face ``text_config`` / ``vision_config``)."""

  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  # text
  vocab_size: int = 49408
  max_position_embeddings: int = 77
  eos_token_id: int = 49407  # 2: the original checkpoints', whose end token has the top id
  # vision
  image_size: int = 224
  patch_size: int = 32
  num_channels: int = 3


_TEXT = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8)
_VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
               num_attention_heads=12)


@dataclasses.dataclass(frozen=True)
class ClipConfig:
  """A CLIP's configuration, as in its Hugging Face ``config.json``."""

  text: TowerConfig
  vision: TowerConfig
  projection_dim: int = 512
  logit_scale_init_value: float = 2.6592

  @classmethod
  def from_dict(cls, config: dict, where: str = "config") -> ClipConfig:
    if config.get("model_type", "clip") != "clip":
      raise ConfigError(f"{where}: model_type {config.get('model_type')!r} is not a CLIP")
    towers = {}
    for name, defaults in (("text", _TEXT), ("vision", _VISION)):
      # (some older checkpoints keep a tower's settings under ``<tower>_config_dict``)
      given = config.get(f"{name}_config") or config.get(f"{name}_config_dict") or {}
      if not isinstance(given, dict):
        raise ConfigError(f"{where}: {name}_config is not a JSON object")
      known = {f.name for f in dataclasses.fields(TowerConfig)}
      towers[name] = TowerConfig(**{**defaults, **{k: v for k, v in given.items() if k in known}})
      act = towers[name].hidden_act
      if act not in ACTIVATIONS:
        raise ConfigError(f"{where}: {name} hidden_act {act!r} is not one of {sorted(ACTIVATIONS)}")
      if float(given.get("attention_dropout") or 0.0) != 0.0:
        raise ConfigError(f"{where}: {name} attention_dropout > 0 is not supported (CLIP's "
                          "released configs use none)")
      tower = towers[name]
      if tower.hidden_size % tower.num_attention_heads:
        raise ConfigError(f"{where}: {name} hidden_size {tower.hidden_size} is not a multiple "
                          f"of num_attention_heads {tower.num_attention_heads}")
    if towers["vision"].image_size % towers["vision"].patch_size:
      raise ConfigError(f"{where}: image_size is not a multiple of patch_size")
    return cls(text=towers["text"], vision=towers["vision"],
               projection_dim=int(config.get("projection_dim", 512)),
               logit_scale_init_value=float(config.get("logit_scale_init_value", 2.6592)))

  @classmethod
  def from_file(cls, path: str) -> ClipConfig:
    try:
      with open(path) as f:
        config = json.load(f)
    except (OSError, ValueError) as e:
      raise ConfigError(f"cannot read {path}: {e}") from None
    if not isinstance(config, dict):
      raise ConfigError(f"{path} is not a JSON object")
    return cls.from_dict(config, path)


def _layer_norm(c: TowerConfig, rngs: nnx.Rngs, dtype: Any) -> nnx.LayerNorm:
  return _norm(rngs, c.hidden_size, c.layer_norm_eps, dtype, jnp.float32)


class Attention(nnx.Module):
  def __init__(self, c: TowerConfig, rngs: nnx.Rngs, dtype: Any):
    d = c.hidden_size
    self.heads = c.num_attention_heads
    self.q_proj, self.k_proj, self.v_proj, self.out_proj = (
        nnx.Linear(d, d, dtype=dtype, rngs=rngs) for _ in range(4))

  def __call__(self, x: jax.Array, bias: jax.Array | None) -> jax.Array:
    b, t, d = x.shape
    h = d // self.heads
    q, k, v = (f(x).reshape(b, t, self.heads, h) for f in (self.q_proj, self.k_proj, self.v_proj))
    w = jnp.einsum("bqhd,bkhd->bhqk", q * (h ** -0.5), k)
    if bias is not None:
      w = w + bias
    probs = jax.nn.softmax(w.astype(jnp.float32), -1).astype(v.dtype)
    return self.out_proj(jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, d))


class MLP(nnx.Module):
  def __init__(self, c: TowerConfig, rngs: nnx.Rngs, dtype: Any):
    self.act = ACTIVATIONS[c.hidden_act]
    self.fc1 = nnx.Linear(c.hidden_size, c.intermediate_size, dtype=dtype, rngs=rngs)
    self.fc2 = nnx.Linear(c.intermediate_size, c.hidden_size, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(self.act(self.fc1(x)))


class Layer(nnx.Module):
  """A pre-LayerNorm transformer layer."""

  def __init__(self, c: TowerConfig, rngs: nnx.Rngs, dtype: Any):
    self.layer_norm1 = _layer_norm(c, rngs, dtype)
    self.self_attn = Attention(c, rngs, dtype)
    self.layer_norm2 = _layer_norm(c, rngs, dtype)
    self.mlp = MLP(c, rngs, dtype)

  def __call__(self, x: jax.Array, bias: jax.Array | None) -> jax.Array:
    x = x + self.self_attn(self.layer_norm1(x), bias)
    return x + self.mlp(self.layer_norm2(x))


class Encoder(nnx.Module):
  def __init__(self, c: TowerConfig, rngs: nnx.Rngs, dtype: Any):
    self.layers = nnx.List([Layer(c, rngs, dtype) for _ in range(c.num_hidden_layers)])

  def __call__(self, x: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    for layer in self.layers:
      x = layer(x, bias)
    return x


class Embeddings(nnx.Module):
  def __init__(self, **modules: Any):
    for name, value in modules.items():
      setattr(self, name, value)


class TextTransformer(nnx.Module):
  def __init__(self, c: TowerConfig, rngs: nnx.Rngs, dtype: Any):
    self.config = c
    self.embeddings = Embeddings(
        token_embedding=nnx.Embed(c.vocab_size, c.hidden_size, dtype=dtype, rngs=rngs),
        position_embedding=nnx.Embed(c.max_position_embeddings, c.hidden_size, dtype=dtype,
                                     rngs=rngs))
    self.encoder = Encoder(c, rngs, dtype)
    self.final_layer_norm = _layer_norm(c, rngs, dtype)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
    """The pooled features: the end token's (the top id with ``eos_token_id == 2``)."""
    b, t = input_ids.shape
    e = self.embeddings
    x = e.token_embedding(input_ids) + e.position_embedding(jnp.arange(t))[None]
    allowed = jnp.tril(jnp.ones((t, t), bool))[None, None]  # causal
    if attention_mask is not None:
      allowed = allowed & (attention_mask[:, None, None, :] != 0)
    bias = jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)
    x = self.final_layer_norm(self.encoder(x, bias))
    if self.config.eos_token_id == 2:
      end = jnp.argmax(input_ids, -1)
    else:
      end = jnp.argmax(input_ids == self.config.eos_token_id, -1)
    return x[jnp.arange(b), end]


class VisionTransformer(nnx.Module):
  def __init__(self, c: TowerConfig, rngs: nnx.Rngs, dtype: Any):
    p, d = c.patch_size, c.hidden_size
    positions = (c.image_size // p) ** 2 + 1
    self.embeddings = Embeddings(
        class_embedding=nnx.Param(nnx.initializers.normal(d ** -0.5)(rngs.params(), (d,))),
        patch_embedding=nnx.Conv(c.num_channels, d, (p, p), strides=(p, p), padding="VALID",
                                 use_bias=False, dtype=dtype, rngs=rngs),
        position_embedding=nnx.Embed(positions, d, dtype=dtype, rngs=rngs))
    self.pre_layrnorm = _layer_norm(c, rngs, dtype)
    self.encoder = Encoder(c, rngs, dtype)
    self.post_layernorm = _layer_norm(c, rngs, dtype)

  def __call__(self, pixel_values: jax.Array) -> jax.Array:
    """The pooled features (the class token's) of images ``(batch, channels, H, W)``."""
    e = self.embeddings
    patches = e.patch_embedding(jnp.transpose(pixel_values, (0, 2, 3, 1)))  # NCHW -> NHWC
    b, d = patches.shape[0], patches.shape[-1]
    patches = patches.reshape(b, -1, d)
    cls = jnp.broadcast_to(e.class_embedding[...].astype(patches.dtype), (b, 1, d))
    x = jnp.concatenate([cls, patches], 1)
    x = x + e.position_embedding(jnp.arange(x.shape[1]))[None]
    return self.post_layernorm(self.encoder(self.pre_layrnorm(x))[:, 0])


class ClipModel(nnx.Module):
  """CLIP: ``model(input_ids, pixel_values, attention_mask)`` is ``(image_embeds,
  text_embeds, logit_scale)``, the arguments of :func:`childtune_jax.clip.contrastive_loss`.

  The embeddings are the projections, not normalised (the loss normalises them);
  ``logit_scale`` is the log of the temperature's inverse, as stored.
  """

  def __init__(self, config: ClipConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32):
    self.config = config
    self.text_model = TextTransformer(config.text, rngs, dtype)
    self.vision_model = VisionTransformer(config.vision, rngs, dtype)
    self.visual_projection = nnx.Linear(config.vision.hidden_size, config.projection_dim,
                                        use_bias=False, dtype=dtype, rngs=rngs)
    self.text_projection = nnx.Linear(config.text.hidden_size, config.projection_dim,
                                      use_bias=False, dtype=dtype, rngs=rngs)
    self.logit_scale = nnx.Param(jnp.asarray(config.logit_scale_init_value, jnp.float32))

  def image_features(self, pixel_values: jax.Array) -> jax.Array:
    return self.visual_projection(self.vision_model(pixel_values))

  def text_features(self, input_ids: jax.Array, attention_mask: jax.Array | None = None
                    ) -> jax.Array:
    return self.text_projection(self.text_model(input_ids, attention_mask))

  def __call__(self, input_ids: jax.Array, pixel_values: jax.Array,
               attention_mask: jax.Array | None = None
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
    return (self.image_features(pixel_values), self.text_features(input_ids, attention_mask),
            self.logit_scale[...])
