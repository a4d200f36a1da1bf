"""Bit-packed keep masks: 8 scalars per byte instead of one, for Child-Tuning_D.

A bool mask takes one byte per scalar. Packed, bit ``j`` of word ``w`` along a leaf's
last axis holds element ``w * bits + j`` of that axis (little-endian bit order, as
``np.packbits(..., axis=-1, bitorder="little")``); the bits past the end of the axis are
zero. Leading axes are untouched, so a packed leaf shards like its parameter. ``uint8``
and ``uint32`` words hold the same bits (8 scalars per byte either way); in the
BERT-base-sized update of ``benchmarks/RESULTS.md`` on CPU, ``uint8`` words were the
faster (1.01x AdamW alone, against 1.06x for ``uint32`` and 1.15x for bools).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from childtune_jax import _tree

PACKINGS = ("uint8", "uint32")
"""The word types of a packed keep mask."""


def _bits(dtype: Any) -> int:
  return np.dtype(dtype).itemsize * 8


def packed_shape(shape: tuple[int, ...], dtype: Any = "uint8") -> tuple[int, ...]:
  """The shape of the words that pack a bool array of ``shape`` (0-d counts as ``(1,)``).

  Examples:
    >>> from childtune_jax.packing import packed_shape
    >>> packed_shape((768, 3072), "uint32")
    (768, 96)
  """
  shape = tuple(shape) or (1,)
  return shape[:-1] + (-(-shape[-1] // _bits(dtype)),)


@functools.partial(jax.jit, static_argnames="dtype")
def pack_leaf(x: jax.Array, dtype: str) -> jax.Array:
  """The ``dtype`` words that pack one bool array (see the module's bit layout)."""
  bits = _bits(dtype)
  x = jnp.reshape(x, jnp.shape(x) or (1,))
  n = x.shape[-1]
  x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, -n % bits)])
  x = x.reshape(x.shape[:-1] + (-1, bits)).astype(dtype)
  return jnp.sum(x << jnp.arange(bits, dtype=dtype), axis=-1, dtype=dtype)


def unpack_leaf(words: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """The bool array of ``shape`` that ``words`` pack (traceable; fuses into an update)."""
  bits = _bits(words.dtype)
  full = tuple(shape) or (1,)
  flat = (words[..., None] >> jnp.arange(bits, dtype=words.dtype)) & 1
  flat = flat.reshape(words.shape[:-1] + (-1,))[..., : full[-1]]
  return flat.astype(jnp.bool_).reshape(shape)


def check_packing(packing: str) -> None:
  """Raises ``ValueError`` unless ``packing`` names a word type of :data:`PACKINGS`."""
  if packing not in PACKINGS:
    raise ValueError(f"packing must be one of {PACKINGS}, got {packing!r}")


def pack_keep(keep: Any, packing: str = "uint8") -> Any:
  """Packs a bool keep mask (e.g. from :func:`fisher_mask`) into ``uint8`` or ``uint32`` words.

  :func:`child_tuning_d` takes the result as it takes the bool mask, with 8x less
  memory in its state.

  Examples:
    >>> import jax.numpy as jnp
    >>> from childtune_jax import pack_keep
    >>> pack_keep({"w": jnp.array([True, False, True, True])})["w"].tolist()
    [13]
  """
  check_packing(packing)
  keep = _tree.unbox(keep)
  _tree.check_bool("keep", keep)
  return jax.tree_util.tree_map(lambda x: pack_leaf(jnp.asarray(x), packing), keep)


def unpack_keep(packed: Any, like: Any) -> Any:
  """The bool keep mask that :func:`pack_keep` packed, shaped like the leaves of ``like``.

  Raises:
    TypeError: a leaf that is not packed words (a bool mask needs no unpacking).
    ValueError: a structure or shape that does not fit ``like``, or bits set past the end
      of a leaf's last axis (words packed for a longer axis). A mask packed for a shorter
      axis within the same number of words cannot be told apart: its missing bits read
      as ``False``.
  """
  packed, like = _tree.unbox(packed), _tree.unbox(like)
  check_packed("packed", packed, like)
  for path, w, x in zip(_tree.leaf_paths(packed), jax.tree_util.tree_leaves(packed),
                        jax.tree_util.tree_leaves(like)):
    if not is_packed(w):
      raise TypeError(f"unpack_keep takes packed words, got {w.dtype} at {path!r} "
                      "(a bool mask is already unpacked)")
    n = (jnp.shape(x) or (1,))[-1]
    words = np.asarray(w)
    bits = np.unpackbits(words.view(np.uint8), axis=-1, bitorder="little")
    if words.size and bits[..., n:].any():
      raise ValueError(f"packed mask at {path!r} has bits set past the {n} entries of the "
                       "last axis of like: it was packed for another shape")
  return jax.tree_util.tree_map(
      lambda w, x: unpack_leaf(jnp.asarray(w), jnp.shape(x)), packed, like)


def is_packed(leaf: Any) -> bool:
  """Whether a keep-mask leaf holds packed words (``uint8``/``uint32``) rather than bools."""
  dtype = getattr(leaf, "dtype", None)
  return dtype is not None and np.dtype(dtype).name in PACKINGS


def check_mask_dtypes(name: str, keep: Any) -> None:
  """Raises ``TypeError`` naming a leaf that is neither bool nor packed words."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(keep)[0]:
    dtype = getattr(leaf, "dtype", None)
    if not (is_packed(leaf) or (dtype is not None and np.dtype(dtype) == np.bool_)):
      raise TypeError(f"{name} must hold bool arrays or uint8/uint32 packed words, "
                      f"got dtype {dtype} at {_tree.path_str(path)!r}")


def check_packed(name: str, keep: Any, like: Any, reference_name: str = "the parameters",
                 *, check_containers: bool = True) -> None:
  """Checks a keep mask (bool or packed leaves) against the pytree it masks.

  Raises ``TypeError`` for a leaf that is neither bool nor ``uint8``/``uint32`` words,
  ``ValueError`` for a structure or shape that does not fit ``like``. With
  ``check_containers=False`` a plain dict may stand for an ``nnx.State`` of the same paths.
  """
  check_mask_dtypes(name, keep)
  _tree.check_structure(name, keep, like, check_shapes=False, reference_name=reference_name,
                        check_containers=check_containers)
  flat = jax.tree_util.tree_flatten_with_path(keep)[0]
  for (path, k), x in zip(flat, jax.tree_util.tree_leaves(like)):
    want = packed_shape(np.shape(x), k.dtype) if is_packed(k) else np.shape(x)
    if np.shape(k) != want:
      raise ValueError(f"{name} has shape {np.shape(k)} at {_tree.path_str(path)!r}, "
                       f"expected {want} for a leaf of shape {np.shape(x)}")
