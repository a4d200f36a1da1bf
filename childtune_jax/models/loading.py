"""Hugging Face checkpoints in and out of the NNX models: safetensors, no torch.

On disk (PyTorch layout): ``encoder.layer.0.attention.self.query.weight`` of shape
``(out, in)``, with or without the family's prefix (``bert.``), LayerNorm ``weight``/``bias``
(legacy ``gamma``/``beta``), embeddings ``*.weight``. In the modules (Hugging Face Flax
names): ``bert/encoder/layer/0/attention/self/query/kernel`` of shape ``(in, out)``,
LayerNorm ``scale``/``bias``, embeddings ``embedding``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from childtune_jax.models.bert import EncoderConfig, SequenceClassifier

# Pretraining heads and buffers a fine-tuning model does not use: skipped, as HF does.
_UNUSED = ("cls.", "lm_head.", "discriminator_predictions.", "generator_", "position_ids")


class CheckpointKeyError(ValueError):
  """A checkpoint that does not fit the model: a missing or unexpected key, a wrong shape."""


def read_safetensors(folder: str) -> dict[str, np.ndarray]:
  """Every tensor of ``model.safetensors`` (or its shards, by the index) as NumPy arrays."""
  from safetensors import safe_open

  def load_file(path: str) -> dict[str, np.ndarray]:  # flax framework: bfloat16 too
    with safe_open(path, framework="flax") as f:
      return {k: np.asarray(f.get_tensor(k)) for k in f.keys()}  # noqa: SIM118

  single = os.path.join(folder, "model.safetensors")
  if os.path.exists(single):
    return load_file(single)
  index = os.path.join(folder, "model.safetensors.index.json")
  if os.path.exists(index):
    with open(index) as f:
      shards = sorted(set(json.load(f)["weight_map"].values()))
    out: dict[str, np.ndarray] = {}
    for shard in shards:
      out.update(load_file(os.path.join(folder, shard)))
    return out
  raise CheckpointKeyError(f"{folder} has no model.safetensors (or index)")


def _module_path(key: str, family: str) -> tuple[tuple[str, ...], bool] | None:
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


def _flat(tree: dict, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, (*prefix, str(k))))
    else:
      out[(*prefix, str(k))] = v
  return out


def _unflat(flat: dict[tuple[str, ...], Any], like: dict) -> dict:
  """``flat`` in the nesting of ``like`` (whose keys may be ints, as nnx.List's are)."""
  def build(node: dict, prefix: tuple[str, ...]) -> dict:
    return {k: build(v, (*prefix, str(k))) if isinstance(v, dict) else flat[(*prefix, str(k))]
            for k, v in node.items()}
  return build(like, ())


def load_params(model: SequenceClassifier, tensors: dict[str, np.ndarray],
                *, allow_missing: tuple[str, ...] = ("classifier",)) -> list[str]:
  """Copies on-disk ``tensors`` into ``model``'s parameters; returns the paths left as initialised.

  Missing keys under ``allow_missing`` (the new classification head) keep their seeded
  initialisation; any other missing key, an unexpected key or a shape mismatch raises
  :class:`CheckpointKeyError` naming it.
  """
  family = model.config.model_type
  _, state = nnx.split(model, nnx.Param)
  pure = nnx.to_pure_dict(state)
  want = _flat(pure)
  got: dict[tuple[str, ...], np.ndarray] = {}
  for key, value in tensors.items():
    mapped = _module_path(key, family)
    if mapped is None:
      continue
    path, transpose = mapped
    if path not in want:
      raise CheckpointKeyError(f"unexpected key {key!r} for a {family} classifier")
    value = np.asarray(value)
    expected = tuple(want[path].shape)
    on_disk = expected[::-1] if transpose and len(expected) == 2 else expected
    if value.shape != on_disk:
      raise CheckpointKeyError(f"{key!r} has shape {list(value.shape)}, the model expects "
                               f"{list(on_disk)} (for {'/'.join(path)})")
    value = value.T if transpose and value.ndim == 2 else value
    got[path] = value.astype(np.asarray(want[path]).dtype)
  left = [p for p in want if p not in got]
  bad = [p for p in left if p[0] not in allow_missing]
  if bad:
    raise CheckpointKeyError(f"the checkpoint lacks {'/'.join(bad[0])} "
                             f"({len(bad)} missing parameters)")
  merged = {p: got.get(p, want[p]) for p in want}
  nnx.replace_by_pure_dict(state, _unflat({p: jax.numpy.asarray(v) for p, v in merged.items()},
                                          pure))
  nnx.update(model, state)
  return ["/".join(p) for p in left]


def to_pytorch_layout(model: SequenceClassifier) -> dict[str, np.ndarray]:
  """The model's parameters under Hugging Face's PyTorch names and layouts."""
  return flax_to_pytorch_layout(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def write_safetensors(tensors: dict[str, np.ndarray], path: str,
                      metadata: dict[str, str] | None = None) -> None:
  """``safetensors.numpy.save_file``, with the file's mode as ``open`` would make it (the
  library makes it 0600) and a write error (a full disk) as one ``OSError``."""
  from safetensors import SafetensorError
  from safetensors.numpy import save_file

  try:
    save_file(tensors, path, metadata=metadata)
  except SafetensorError as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else "SafetensorError"
    raise OSError(f"cannot write {path}: {first}") from None
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(path, 0o666 & ~umask)


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


def read_flax_msgpack(folder: str) -> dict[str, np.ndarray]:
  """A Hugging Face Flax checkpoint (``flax_model.msgpack``, or its shards) in on-disk names.

  Flax checkpoints already use the modules' names; they are returned in the PyTorch
  layout so that one loader serves both.
  """
  from flax.serialization import msgpack_restore

  single = os.path.join(folder, "flax_model.msgpack")
  files = [single]
  if not os.path.exists(single):
    with open(os.path.join(folder, "flax_model.msgpack.index.json")) as f:
      files = [os.path.join(folder, n) for n in sorted(set(json.load(f)["weight_map"].values()))]
  out: dict[str, np.ndarray] = {}
  for path in files:
    with open(path, "rb") as f:
      out.update(flax_to_pytorch_layout(msgpack_restore(f.read())))
  return out


def flax_to_pytorch_layout(tree: dict) -> dict[str, np.ndarray]:
  """A nested dict named as the modules name it, under PyTorch names and layouts.

  Dense kernels ``(in, out)`` become ``(out, in)`` weights, conv kernels ``(h, w, in, out)``
  ``(out, in, h, w)``; embeddings and LayerNorm scales are ``weight``.
  """
  out = {}
  for (*mods, name), value in _flat(tree).items():
    value = np.asarray(value)
    if name == "kernel":
      name, value = "weight", (value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T)
    elif name in ("embedding", "scale"):
      name = "weight"
    out[".".join([*mods, name])] = np.ascontiguousarray(value).reshape(value.shape)  # 0-d too
  return out


def check_safetensors(folder: str) -> None:
  """Opens every safetensors file of ``folder`` (its header alone, not the tensors), so that
  a truncated or damaged file is found before a run starts: a ``CheckpointKeyError``."""
  from safetensors import SafetensorError, safe_open

  names = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
  for name in names:
    try:
      with safe_open(os.path.join(folder, name), framework="numpy"):
        pass
    except (SafetensorError, OSError) as e:
      first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise CheckpointKeyError(f"{os.path.join(folder, name)} is damaged or truncated: "
                               f"{first}") from None


def non_finite(tensors: dict[str, np.ndarray]) -> str | None:
  """The first key of ``tensors`` holding a NaN or an infinity, if any."""
  for key, value in tensors.items():
    if np.asarray(value).dtype.kind == "f" and not np.isfinite(value).all():
      return key
  return None


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
  import jax.numpy as jnp

  cfg = EncoderConfig.from_file(os.path.join(folder, "config.json"), num_labels=num_labels)
  model = SequenceClassifier(cfg, rngs=nnx.Rngs(seed), dtype=dtype or jnp.float32)
  tensors = read_checkpoint(folder)
  if tensors is None:
    raise CheckpointKeyError(f"{folder} has no weights")
  left = load_params(model, tensors)
  return model, left
