"""BERT, RoBERTa and ELECTRA checkpoints in and out of :class:`SequenceClassifier`.

On disk (PyTorch layout): ``encoder.layer.0.attention.self.query.weight`` of shape
``(out, in)``, with or without the family's prefix (``bert.``), LayerNorm ``weight``/``bias``
(legacy ``gamma``/``beta``), embeddings ``*.weight``. In the modules (Hugging Face Flax
names): ``bert/encoder/layer/0/attention/self/query/kernel`` of shape ``(in, out)``,
LayerNorm ``scale``/``bias``, embeddings ``embedding``. :func:`module_path` is the key table.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from childtune_jax.models.bert.modeling import EncoderConfig, SequenceClassifier
from childtune_jax.models.checkpoint import (
    CheckpointKeyError,
    assign,
    flax_to_pytorch_layout,
    read_flax_msgpack,
    read_safetensors,
    write_safetensors,
)

# Pretraining heads and buffers a fine-tuning model does not use: skipped, as HF does.
_UNUSED = ("cls.", "lm_head.", "discriminator_predictions.", "generator_", "position_ids")


def module_path(key: str, family: str) -> tuple[tuple[str, ...], bool] | None:
  """The module path of an on-disk key, and whether its matrix is transposed; None: unused."""
  if any(key.startswith(u) or u in key for u in _UNUSED):
    return None
  parts = key.split(".")
  if parts[0] == family:
    parts = parts[1:]
  if parts[0] == "pooler" and family != "bert":  # RoBERTa/ELECTRA heads use no pooler
    return None
  if parts[0] == "classifier":  # the head sits beside the backbone
    path = parts
  else:
    path = [family, *parts]
  name = path[-1]
  if name in ("gamma", "beta"):
    name = "weight" if name == "gamma" else "bias"
  if path[-2] == "LayerNorm":
    return (*path[:-1], "scale" if name == "weight" else "bias"), False
  if path[-2].endswith("embeddings") and name == "weight":
    return (*path[:-1], "embedding"), False
  if name == "weight":
    return (*path[:-1], "kernel"), True
  return (*path[:-1], name), False


def load_params(model: SequenceClassifier, tensors: dict[str, np.ndarray],
                *, allow_missing: tuple[str, ...] = ("classifier",)) -> list[str]:
  """Copies on-disk ``tensors`` into ``model``'s parameters; returns the paths left as initialised.

  Missing keys under ``allow_missing`` (the new classification head) keep their seeded
  initialisation; any other missing key, an unexpected key or a shape mismatch raises
  :class:`CheckpointKeyError` naming it.
  """
  family = model.config.model_type

  def mapped():
    for key, value in tensors.items():
      path = module_path(key, family)
      if path is not None:
        path, transpose = path
        value = np.asarray(value)
        yield key, path, value.T if transpose and value.ndim == 2 else value, value.shape

  return assign(model, mapped(), kind=f"a {family} classifier", allow_missing=allow_missing)


def to_pytorch_layout(model: SequenceClassifier) -> dict[str, np.ndarray]:
  """The model's parameters under Hugging Face's PyTorch names and layouts."""
  return flax_to_pytorch_layout(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def save_pretrained(model: SequenceClassifier, folder: str, config: dict | None = None,
                    labels: Sequence[str] | None = None) -> None:
  """Writes ``config.json`` and ``model.safetensors`` in Hugging Face's layout.

  ``transformers``' ``AutoModelForSequenceClassification.from_pretrained(folder)`` (PyTorch,
  any version) loads the result. ``labels``: the class names in order, recorded as the
  config's ``id2label`` (default ``LABEL_0``, ``LABEL_1``, ...).
  """
  os.makedirs(folder, exist_ok=True)
  cfg = model.config
  arch = {"bert": "BertForSequenceClassification", "roberta": "RobertaForSequenceClassification",
          "electra": "ElectraForSequenceClassification"}[cfg.model_type]
  out = {**(config or {}), **{k: v for k, v in vars(cfg).items() if v is not None},
         "architectures": [arch]}
  names = list(labels) if labels else [f"LABEL_{i}" for i in range(cfg.num_labels)]
  if len(names) != cfg.num_labels:
    raise ValueError(f"{len(names)} label names for a model of {cfg.num_labels} labels")
  out["id2label"] = {str(i): name for i, name in enumerate(names)}
  out["label2id"] = {v: int(k) for k, v in out["id2label"].items()}
  out.pop("num_labels", None)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(out, f, indent=2, sort_keys=True)
  write_safetensors(to_pytorch_layout(model), os.path.join(folder, "model.safetensors"),
                    metadata={"format": "pt"})


def read_checkpoint(folder: str) -> dict[str, np.ndarray] | None:
  """The tensors of a folder's safetensors or Flax weights; ``None`` if it has none."""
  names = set(os.listdir(folder))
  if names & {"model.safetensors", "model.safetensors.index.json"}:
    return read_safetensors(folder)
  if names & {"flax_model.msgpack", "flax_model.msgpack.index.json"}:
    return read_flax_msgpack(folder)
  other = sorted(n for n in names if n.endswith((".bin", ".h5", ".ckpt.index", ".pt")))
  if other:
    raise CheckpointKeyError(f"{folder}: cannot read {other} without their frameworks; "
                             "save the weights as model.safetensors")
  return None


def from_pretrained(folder: str, num_labels: int, *, seed: int = 0, dtype: Any = None
                    ) -> tuple[SequenceClassifier, list[str]]:
  """An NNX classifier from a local Hugging Face folder; the head is new unless saved.

  Returns the model and the parameters it initialised (from ``seed``) rather than loaded.
  """
  cfg = EncoderConfig.from_file(os.path.join(folder, "config.json"), num_labels=num_labels)
  model = SequenceClassifier(cfg, rngs=nnx.Rngs(seed), dtype=dtype or jnp.float32)
  tensors = read_checkpoint(folder)
  if tensors is None:
    raise CheckpointKeyError(f"{folder} has no weights")
  left = load_params(model, tensors)
  return model, left
