"""CLIP checkpoints in and out of :class:`ClipModel`: Hugging Face's PyTorch names, no torch.

On disk a tensor is named as the module path (``text_model.encoder.layers.0.mlp.fc1.weight``)
in PyTorch's layout; :func:`module_path` gives its path and layout in the model.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from childtune_jax.models.checkpoint import (
    _flat,
    assign,
    flax_to_pytorch_layout,
    read_safetensors,
    write_safetensors,
)
from childtune_jax.models.clip.modeling import ClipConfig, ClipModel


def module_path(name: str, value: np.ndarray, want: dict) -> tuple[tuple[str, ...], np.ndarray]:
  """The module path of an on-disk (PyTorch-layout) tensor, and the tensor in its layout."""
  *mods, leaf = name.split(".")
  mods = tuple(mods)
  if leaf != "weight" or (*mods, "weight") in want:
    return (*mods, leaf), value
  if (*mods, "kernel") in want:
    if value.ndim == 4:  # a conv: (out, in, h, w) -> (h, w, in, out)
      return (*mods, "kernel"), value.transpose(2, 3, 1, 0)
    return (*mods, "kernel"), value.T
  if (*mods, "embedding") in want:
    return (*mods, "embedding"), value
  return (*mods, "scale"), value


def load_clip_params(model: ClipModel, tensors: dict[str, np.ndarray]) -> None:
  """Copies a Hugging Face CLIP checkpoint's tensors into ``model``; every one must fit.

  A missing or unexpected key, or a shape mismatch, is a :class:`CheckpointKeyError`
  naming it (``position_ids`` buffers of older checkpoints are skipped).
  """
  want = _flat(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  mapped = ((key, *module_path(key, np.asarray(value), want), np.shape(value))
            for key, value in tensors.items() if not key.endswith("position_ids"))
  assign(model, mapped, kind="a CLIP of this config")


def clip_from_pretrained(folder: str, *, dtype: Any = jnp.float32) -> ClipModel:
  """A :class:`ClipModel` from a local Hugging Face CLIP folder (``config.json`` and
  ``model.safetensors``)."""
  config = ClipConfig.from_file(os.path.join(folder, "config.json"))
  model = ClipModel(config, rngs=nnx.Rngs(0), dtype=dtype)
  load_clip_params(model, read_safetensors(folder))
  return model


def clip_to_pytorch_layout(model: ClipModel) -> dict[str, np.ndarray]:
  """The model's parameters under Hugging Face's PyTorch names and layouts."""
  return flax_to_pytorch_layout(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def save_clip(model: ClipModel, folder: str, config: dict) -> None:
  """Writes ``config.json`` (``config``, the original's) and ``model.safetensors`` in
  Hugging Face's layout: transformers' PyTorch ``CLIPModel.from_pretrained`` loads it."""
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
  write_safetensors(clip_to_pytorch_layout(model), os.path.join(folder, "model.safetensors"),
                    metadata={"format": "pt"})
