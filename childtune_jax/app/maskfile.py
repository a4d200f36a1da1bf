"""Child networks saved as ``.npz`` files: one bool array per parameter, keyed by its path.

Beside the masks a file records what made the network: the ``reserve_p`` that sized it
(:data:`RESERVE_P_KEY`) and the seed of the run that chose it (:data:`SEED_KEY`), so that a
run given the file (``--child-mask``) can check both against its own. Files written before
these records carry none and are taken as they are.
"""

from __future__ import annotations

import dataclasses
import os
import zipfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from childtune_jax import _tree
from childtune_jax.app import files
from childtune_jax.app.errors import UsageError

RESERVE_P_KEY = "__reserve_p__"  # the reserve_p that sized the network
SEED_KEY = "__seed__"  # the seed of the run whose data and head chose it


@dataclasses.dataclass(frozen=True)
class Record:
  """What a mask file says of its network (``None``: not recorded)."""

  reserve_p: float | None = None
  seed: int | None = None


def save(path: str, keep: Any, *, reserve_p: float | None = None, seed: int | None = None
         ) -> None:
  """Saves a bool pytree as ``.npz`` keyed by leaf path, atomically, with its records."""
  leaves = jax.tree_util.tree_leaves(keep)
  arrays = {p: np.asarray(x) for p, x in zip(_tree.leaf_paths(keep), leaves)}
  if reserve_p is not None:
    arrays[RESERVE_P_KEY] = np.float64(reserve_p)
  if seed is not None:
    arrays[SEED_KEY] = np.int64(seed)
  with files.replacing(path) as tmp:
    np.savez_compressed(tmp, **arrays)


def split_record(arrays: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], Record]:
  """A mask file's arrays split into its masks and its :class:`Record`.

  Raises:
    ValueError: a reserve_p that is not one float in (0, 1], or a seed that is not one
      non-negative integer.
  """
  masks = dict(arrays)
  reserve_p, seed = masks.pop(RESERVE_P_KEY, None), masks.pop(SEED_KEY, None)
  if reserve_p is not None and (reserve_p.shape or reserve_p.dtype.kind != "f"
                                or not 0 < reserve_p <= 1):
    raise ValueError(f"{RESERVE_P_KEY} is {reserve_p.tolist()}, not a fraction in (0, 1]")
  if seed is not None and (seed.shape or seed.dtype.kind not in "iu" or seed < 0):
    raise ValueError(f"{SEED_KEY} is {seed.tolist()}, not a seed")
  return masks, Record(None if reserve_p is None else float(reserve_p),
                       None if seed is None else int(seed))


def record(path: str) -> Record:
  """The :class:`Record` of the mask file at ``path``."""
  with np.load(path) as f:
    arrays = {k: f[k] for k in (RESERVE_P_KEY, SEED_KEY) if k in f.files}
  return split_record(arrays)[1]


def load(path: str, like: Any) -> Any:
  """Loads a mask saved by :func:`save` into the structure of ``like``."""
  with np.load(path) as f:
    arrays = dict(f)
  leaves = []
  for p in _tree.leaf_paths(like):
    if p not in arrays:
      raise ValueError(f"{path} has no mask for parameter {p!r}")
    leaves.append(jnp.asarray(arrays[p]))
  keep = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(like), leaves)
  _tree.check_bool(path, keep)
  _tree.check_structure(path, keep, like)
  return keep


def read(path: str) -> tuple[dict[str, np.ndarray], Record]:
  """The masks of a mask file and its record; anything else is a one-line :class:`UsageError`."""
  if os.path.isdir(path):
    raise UsageError(f"mask file {path} is a folder; give a child_mask.npz file")
  if not os.path.isfile(path):
    raise UsageError(f"mask file {path} does not exist")
  if not zipfile.is_zipfile(path):  # a .npy, a text file, a truncated download
    raise UsageError(f"{path} is not a mask .npz written by childtune train (not an .npz "
                     "archive)")
  try:
    with np.load(path, allow_pickle=False) as f:
      arrays = dict(f)
  except ValueError as e:
    if "allow_pickle" in str(e):  # never load pickles: they run code
      raise UsageError(f"{path} holds Python objects, not bool masks; it was not written by "
                       "childtune train") from None
    raise UsageError(f"cannot read mask {path}: {e}") from None
  except Exception as e:  # noqa: BLE001 - a corrupt file fails in many ways
    raise UsageError(f"cannot read mask {path}: {type(e).__name__}: {e}") from None
  try:
    masks, rec = split_record(arrays)
  except ValueError as e:
    raise UsageError(f"{path}: {e}") from None
  for name, array in masks.items():
    if array.dtype != np.bool_:
      raise UsageError(f"{path}: the mask of {name!r} is {array.dtype}, not bool")
  return masks, rec


def check(option: str, path: str, shapes: Any) -> Record:
  """A mask file must hold a bool array of the right shape for every parameter of ``shapes``.

  Returns its record.
  """
  masks, rec = read(path)
  for leaf, like in zip(_tree.leaf_paths(shapes), jax.tree_util.tree_leaves(shapes)):
    if leaf not in masks:
      raise UsageError(f"{option} {path} has no mask for parameter {leaf!r}")
    got = masks[leaf]
    if got.dtype != np.bool_ or got.shape != tuple(like.shape):
      raise UsageError(f"{option} {path}: the mask of {leaf!r} is {got.dtype}{list(got.shape)}, "
                       f"expected bool{list(like.shape)}")
  return rec


def check_given(path: str, rec: Record, *, reserve_p: float, seed: int,
                option: str = "--child-mask") -> None:
  """A network given to train must be of the run's reserve_p and seed, where it records them."""
  if rec.reserve_p is not None and rec.reserve_p != reserve_p:
    raise UsageError(f"{option} {path} holds a child network of reserve_p {rec.reserve_p:g}, "
                     f"not --reserve-p {reserve_p:g}")
  if rec.seed is not None and rec.seed != seed:
    raise UsageError(f"{option} {path} holds the child network of seed {rec.seed}, not of seed "
                     f"{seed}: give each seed its own with {files.SEED_FIELD} in the path "
                     f"(--child-mask masks/D-seed-{files.SEED_FIELD}.npz)")
