"""Hugging Face checkpoint files in and out of the NNX models, without torch: what every
model family shares.

Reading (:func:`read_safetensors`, sharded or not; :func:`read_flax_msgpack`), writing
(:func:`write_safetensors`), checking before a run (:func:`check_safetensors`,
:func:`non_finite`), and :func:`assign`, which copies tensors a family's key table has
mapped to module paths into a model, naming any key that does not fit.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx


class CheckpointKeyError(ValueError):
  """A checkpoint that does not fit the model: a missing or unexpected key, a wrong shape."""


class ConfigError(ValueError):
  """A model config that these modules cannot build, named in one line."""


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


def assign(model: nnx.Module,
           mapped: Iterable[tuple[str, tuple[str, ...], np.ndarray, tuple[int, ...]]], *,
           kind: str, allow_missing: tuple[str, ...] = ()) -> list[str]:
  """Copies each ``(key, module path, array in the module's layout, shape on disk)`` into
  ``model``.

  A path the model lacks, an array of another shape, or a parameter no key fills (but
  under ``allow_missing``, which keeps its initialisation) is a :class:`CheckpointKeyError`
  naming it. Returns the paths left as initialised.
  """
  _, state = nnx.split(model, nnx.Param)
  pure = nnx.to_pure_dict(state)
  want = _flat(pure)
  got: dict[tuple[str, ...], np.ndarray] = {}
  for key, path, value, disk in mapped:
    if path not in want:
      raise CheckpointKeyError(f"unexpected key {key!r} for {kind}")
    if value.shape != tuple(want[path].shape):
      raise CheckpointKeyError(f"{key!r} does not fit: it has shape {list(disk)}, the model's "
                               f"{'/'.join(path)} {list(want[path].shape)} (in its layout)")
    got[path] = value.astype(np.asarray(want[path]).dtype)
  left = [p for p in want if p not in got]
  bad = [p for p in left if p[0] not in allow_missing]
  if bad:
    raise CheckpointKeyError(f"the checkpoint lacks {'/'.join(bad[0])} "
                             f"({len(bad)} missing parameters)")
  merged = {p: got.get(p, want[p]) for p in want}
  nnx.replace_by_pure_dict(state, _unflat({p: jnp.asarray(v) for p, v in merged.items()}, pure))
  nnx.update(model, state)
  return ["/".join(p) for p in left]


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
