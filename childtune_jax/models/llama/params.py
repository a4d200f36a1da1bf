"""Decoder checkpoints in and out of :class:`CausalLM`: Hugging Face safetensors, no torch.

:data:`KEYS` maps each on-disk name (PyTorch layout, ``model.layers.3.self_attn.q_proj.weight``
of shape ``(out, in)``) to a module path and how its array turns into the module's: a
transpose for linear weights, a slot on the stacked layer axis for per-layer tensors.
GGUF files (:mod:`childtune_jax.models.llama.gguf`) are read into the same names first.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from childtune_jax.models.checkpoint import (
  CheckpointKeyError,
  read_safetensors,
  write_safetensors,
)
from childtune_jax.models.llama.modeling import CausalLM, DecoderConfig

# (on-disk pattern, module path, transpose); ``{i}`` in a pattern is the layer's index.
KEYS: tuple[tuple[str, str, bool], ...] = (
    (r"model\.embed_tokens\.weight", "embed_tokens/embedding", False),
    (r"model\.norm\.weight", "norm/scale", False),
    (r"lm_head\.weight", "lm_head/kernel", True),
    (r"model\.layers\.{i}\.input_layernorm\.weight", "layers/input_layernorm/scale", False),
    (r"model\.layers\.{i}\.post_attention_layernorm\.weight",
     "layers/post_attention_layernorm/scale", False),
    (r"model\.layers\.{i}\.self_attn\.(q|k|v|o)_proj\.weight", "layers/self_attn/{0}_proj/kernel",
     True),
    (r"model\.layers\.{i}\.self_attn\.(q|k|v)_proj\.bias", "layers/self_attn/{0}_proj/bias", False),
    (r"model\.layers\.{i}\.mlp\.(gate|up|down)_proj\.weight", "layers/mlp/{0}_proj/kernel", True),
)
UNUSED = re.compile(r".*rotary_emb\.inv_freq$")  # buffers older checkpoints carry
_COMPILED = [(re.compile(p.replace("{i}", r"(?P<layer>\d+)") + "$"), path, t)
             for p, path, t in KEYS]


def module_path(key: str) -> tuple[str, int | None, bool] | None:
  """``(module path, layer or None, transpose)`` of an on-disk key; ``None`` if unused."""
  if UNUSED.match(key):
    return None
  for pattern, path, transpose in _COMPILED:
    m = pattern.match(key)
    if m:
      at = pattern.groupindex.get("layer")
      extra = [g for i, g in enumerate(m.groups(), start=1) if i != at]
      layer = None if at is None else int(m.group("layer"))
      return path.format(*extra), layer, transpose
  raise CheckpointKeyError(f"unexpected key {key!r} for a decoder")


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    name = f"{prefix}/{k}" if prefix else str(k)
    out.update(_flat(v, name) if isinstance(v, dict) else {name: v})
  return out


def _nest(flat: dict[str, Any]) -> dict:
  out: dict = {}
  for path, v in flat.items():
    node = out
    *parents, last = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[last] = v
  return out


def load_params(model: CausalLM, tensors: dict[str, np.ndarray]) -> None:
  """Copies on-disk ``tensors`` into ``model``; a missing, unexpected or misshapen key is a
  :class:`CheckpointKeyError` naming it. A tied model ignores a stored ``lm_head.weight``."""
  cfg = model.config
  _, state = nnx.split(model, nnx.Param)
  want = _flat(nnx.to_pure_dict(state))
  stacked: dict[str, list] = {p: [None] * cfg.num_hidden_layers for p in want
                              if p.startswith("layers/")}
  got: dict[str, np.ndarray] = {}
  for key, value in tensors.items():
    mapped = module_path(key)
    if mapped is None or (mapped[0] == "lm_head/kernel" and cfg.tie_word_embeddings):
      continue
    path, layer, transpose = mapped
    if path not in want:
      raise CheckpointKeyError(f"unexpected key {key!r} for this decoder's config")
    value = np.asarray(value)
    shape = tuple(want[path].shape[1:] if layer is not None else want[path].shape)
    on_disk = shape[::-1] if transpose else shape
    if value.shape != on_disk:
      raise CheckpointKeyError(f"{key!r} has shape {list(value.shape)}, the model expects "
                               f"{list(on_disk)}")
    value = value.T if transpose else value
    if layer is None:
      got[path] = value
    elif layer >= cfg.num_hidden_layers:
      raise CheckpointKeyError(f"{key!r}: layer {layer} of a {cfg.num_hidden_layers}-layer model")
    else:
      stacked[path][layer] = value
  for path, layers in stacked.items():
    absent = [i for i, v in enumerate(layers) if v is None]
    if absent:
      raise CheckpointKeyError(f"the checkpoint lacks {path} of layer {absent[0]} "
                               f"({len(absent)} layers)")
    got[path] = np.stack(layers)
  missing = [p for p in want if p not in got]
  if missing:
    raise CheckpointKeyError(f"the checkpoint lacks {missing[0]} ({len(missing)} parameters)")
  dtypes = {p: want[p].dtype for p in want}
  nnx.replace_by_pure_dict(state, _nest({p: jnp.asarray(v, dtypes[p]) for p, v in got.items()}))
  nnx.update(model, state)


def to_pytorch_layout(model: CausalLM) -> dict[str, np.ndarray]:
  """The model's parameters under Hugging Face's names and layouts (float32 host arrays)."""
  flat = _flat(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  out = {}
  for key_pattern, path_pattern, transpose in KEYS:
    names = re.findall(r"\((.*?)\)", key_pattern)
    options = names[0].split("|") if names else [None]
    for option in options:
      path = path_pattern.format(option)
      if path not in flat:
        continue
      value = np.asarray(jax.device_get(flat[path]), np.float32)
      key = re.sub(r"\(.*?\)", option or "", key_pattern).replace("\\.", ".")
      if "{i}" in key:
        for i, layer in enumerate(value):
          out[key.replace("{i}", str(i))] = np.ascontiguousarray(layer.T if transpose else layer)
      else:
        out[key] = np.ascontiguousarray(value.T if transpose else value)
  return out


def from_folder(folder: str, *, dtype: Any = jnp.float32, seed: int = 0) -> CausalLM:
  """A :class:`CausalLM` from a local Hugging Face folder (``config.json`` and
  ``model.safetensors``, sharded or not)."""
  cfg = DecoderConfig.from_file(os.path.join(folder, "config.json"))
  model = CausalLM(cfg, rngs=nnx.Rngs(seed), dtype=dtype)
  load_params(model, read_safetensors(folder))
  return model


def save_pretrained(model: CausalLM, folder: str, config: dict | None = None) -> None:
  """Writes ``config.json`` and ``model.safetensors`` in Hugging Face's layout, which
  transformers' ``AutoModelForCausalLM.from_pretrained(folder)`` loads. ``config``: fields
  of the original config to keep beside the architecture's."""
  os.makedirs(folder, exist_ok=True)
  out = {**(config or {}), **model.config.to_dict()}
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(out, f, indent=2, sort_keys=True)
  write_safetensors(to_pytorch_layout(model), os.path.join(folder, "model.safetensors"),
                    metadata={"format": "pt"})
