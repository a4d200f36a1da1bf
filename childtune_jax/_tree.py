"""Pytree helpers shared by the transformations, the Fisher pass and the masks."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

Where = Callable[[str], bool] | Any | None
"""Which leaves take part: ``None`` (all), a predicate on a leaf's path string
(``"bert/encoder/layer/0/output/dense/kernel"``), or a static bool pytree with the
params' structure."""


def unbox(tree: Any) -> Any:
  """``tree`` with every Flax NNX ``Variable`` replaced by its value (``nnx.as_pure``).

  ``nnx.Optimizer`` calls ``tx.init(nnx.state(model, nnx.Param))``, whose leaves are
  ``Variable``s (their key paths end in ``value``), and ``tx.update`` with plain arrays.
  Every transformation unboxes what it is given, so that its state, its structure checks
  and its ``where`` predicates see the same tree and the same paths in both calls. Without
  Flax imported there is no ``Variable`` to unbox, and ``tree`` is returned as it is.
  """
  nnx = sys.modules.get("flax.nnx")
  if nnx is None:
    return tree

  def is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)

  if not any(is_variable(x) for x in jax.tree_util.tree_leaves(tree, is_leaf=is_variable)):
    return tree
  return jax.tree_util.tree_map(lambda x: x.get_value() if is_variable(x) else x, tree,
                                is_leaf=is_variable)


def relayout(tree: Any, reference: Any) -> Any:
  """``tree``'s leaves in ``reference``'s containers (a dict mask for an ``nnx.State``).

  The caller has checked that the two have the same leaf paths.
  """
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(reference),
                                      jax.tree_util.tree_leaves(tree))


def path_str(path: tuple) -> str:
  """``"a/b/0"`` for the key path ``(DictKey('a'), DictKey('b'), SequenceKey(0))``."""
  return jax.tree_util.keystr(path, simple=True, separator="/")


def leaf_paths(tree: Any) -> list[str]:
  """The path strings of ``tree``'s leaves, in flattening order."""
  return [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def resolve_where(where: Where, tree: Any, *, name: str = "where") -> list[bool]:
  """Resolves ``where`` to one Python bool per leaf of ``tree`` (flattening order).

  Paths are those of the unboxed tree (:func:`unbox`): a predicate sees
  ``"layers/0/attn/q/kernel"`` whether ``tree`` holds ``nnx.Variable``s or arrays.
  """
  tree = unbox(tree)
  paths = leaf_paths(tree)
  if where is None:
    return [True] * len(paths)
  if callable(where):
    return [bool(where(p)) for p in paths]
  where = unbox(where)
  check_structure(name, where, tree, check_shapes=False, check_containers=False)
  flags = jax.tree_util.tree_leaves(where)
  for path, flag in zip(paths, flags):
    if not isinstance(flag, (bool, np.bool_)):
      raise TypeError(
          f"{name} must hold Python bools (static), got {type(flag).__name__} at {path!r}"
      )
  return [bool(f) for f in flags]


def check_structure(
    name: str, tree: Any, reference: Any, *, check_shapes: bool = True,
    check_containers: bool = True, reference_name: str = "the parameters",
) -> None:
  """Raises ``ValueError`` naming the first path where ``tree`` differs from ``reference``.

  With ``check_containers=False`` only the leaf paths (and shapes) must agree: a plain
  dict may stand for an ``nnx.State`` of the same keys.
  """
  got = jax.tree_util.tree_flatten_with_path(tree)[0]
  want = jax.tree_util.tree_flatten_with_path(reference)[0]
  got_paths = [path_str(p) for p, _ in got]
  want_paths = [path_str(p) for p, _ in want]
  if got_paths != want_paths:
    missing = [p for p in want_paths if p not in set(got_paths)]
    extra = [p for p in got_paths if p not in set(want_paths)]
    if missing:
      detail = f"missing leaf {missing[0]!r}"
    elif extra:
      detail = f"unexpected leaf {extra[0]!r}"
    else:
      detail = "leaves in a different order"
    raise ValueError(
        f"{name} does not have the structure of {reference_name}: {detail} "
        f"({len(got_paths)} leaves, expected {len(want_paths)})"
    )
  if check_containers and (
      jax.tree_util.tree_structure(tree) != jax.tree_util.tree_structure(reference)):
    raise ValueError(
        f"{name} does not have the container types of {reference_name}: "
        f"{jax.tree_util.tree_structure(tree)} vs {jax.tree_util.tree_structure(reference)}"
    )
  if check_shapes:
    for path, (_, a), (_, b) in zip(got_paths, got, want):
      if np.shape(a) != np.shape(b):
        raise ValueError(
            f"{name} has shape {np.shape(a)} at {path!r}, expected {np.shape(b)}"
        )


def check_bool(name: str, tree: Any) -> None:
  """Raises ``TypeError`` naming the first leaf of ``tree`` whose dtype is not bool."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    dtype = getattr(leaf, "dtype", None)
    if dtype is None or np.dtype(dtype) != np.bool_:
      raise TypeError(
          f"{name} must be a pytree of bool arrays, got dtype {dtype} at {path_str(path)!r}"
      )
