"""Child networks as bool pytrees: top-p selection by Fisher score, overlap, random masks."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from childtune_jax import _tree
from childtune_jax.transform import _canonical_key, _check_reserve_p


def is_encoder_layer(path: str) -> bool:
  """The reference code's choice of leaves for Child-Tuning_D: ``'layer' in name``.

  For Hugging Face BERT-family Flax models this selects the transformer encoder layers
  (``bert/encoder/layer/3/...``) and leaves out embeddings, pooler and classifier,
  which then are always fully trained. Case-sensitive, like the reference: ``LayerNorm``
  does not match.
  """
  return "layer" in path


def _order_key(value: float) -> int:
  """The uint32 key of a float32 with the same order (``-0.0`` and ``+0.0`` equal)."""
  bits = int(np.array(value + 0.0, np.float32).view(np.uint32))
  return (~bits & 0xFFFFFFFF) if bits >> 31 else bits | (1 << 31)


def _key_float(key: int) -> np.float32:
  """The float32 whose order key is ``key`` (inverse of :func:`_order_key`)."""
  bits = (key & 0x7FFFFFFF) if key >> 31 else (~key & 0xFFFFFFFF)
  return np.array(bits, np.uint32).view(np.float32)


@jax.jit
def _count_at_least(leaves: list[jax.Array], threshold: jax.Array) -> jax.Array:
  return jnp.stack([jnp.sum(x >= threshold, dtype=jnp.uint32) for x in leaves])


@jax.jit
def _all_finite(leaves: list[jax.Array]) -> jax.Array:
  return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])


def _percentile_keep_count(n: int, reserve_p: float) -> int:
  """How many of ``n`` tie-free scores ``>= np.percentile(s, (1 - reserve_p) * 100)``."""
  q = ((1.0 - reserve_p) * 100.0) / 100.0  # the reference's percentile, as numpy reads it
  pos = min(max(n * q - q, 0.0), n - 1.0)  # numpy's 'linear' virtual index
  below = math.floor(pos)
  return n - below if pos == below else n - below - 1


def fisher_mask(
    fisher: optax.Params, reserve_p: float, *, where: _tree.Where = None
) -> optax.Params:
  r"""Keeps the top ``reserve_p`` fraction of scalars by score, under one global threshold.

  Among the selected leaves (``where``), the threshold :math:`\tau` is the reference
  code's ``np.percentile(all_scores, (1 - reserve_p) * 100)`` and the child network is
  :math:`\{i : F(i) \ge \tau\}`; unselected leaves are all ``True`` (always trained).

  Nothing is concatenated or sorted: :math:`\tau` is found by bisection over the
  float32 values in the order of their bits, each of the 32 steps one fused counting
  pass ``sum(score >= t)`` per leaf.
  Extra memory is O(1) per leaf, so it works for billions of parameters and for
  sharded arrays (the masks come out sharded like the scores).

  Ties: every scalar equal to the threshold is kept (``>=``, as the reference), so the
  child network holds at least :math:`k` scalars, exactly :math:`k` when scores do not
  tie at the threshold, where :math:`k` is the number that the percentile selects on
  tie-free scores. Scores are compared as float32.

  Args:
    fisher: a pytree of finite scores, e.g. from :func:`fisher_information`.
    reserve_p: fraction of the selected scalars to keep, in (0, 1].
    where: leaves that take part: ``None`` (all), a path predicate such as
      :func:`is_encoder_layer` (the reference's choice), or a static bool pytree.

  Returns:
    A bool pytree with the structure of ``fisher``, for :func:`child_tuning_d`.

  Raises:
    ValueError: ``reserve_p`` outside (0, 1], a NaN or inf score, or no selected leaf.

  Examples:
    >>> import jax.numpy as jnp
    >>> from childtune_jax import fisher_mask
    >>> keep = fisher_mask({"w": jnp.array([0.1, 0.4, 0.2, 0.3])}, 0.5)
    >>> keep["w"].tolist()
    [False, True, False, True]
  """
  _check_reserve_p(reserve_p)
  flat, treedef = jax.tree_util.tree_flatten_with_path(fisher)
  selected = _tree.resolve_where(where, fisher)
  leaves = [jnp.asarray(x) for (_, x), take in zip(flat, selected) if take]
  if not leaves:
    raise ValueError("fisher_mask: where selects no leaf")
  finite = np.asarray(_all_finite(leaves))
  if not finite.all():
    paths = [_tree.path_str(p) for (p, _), take in zip(flat, selected) if take]
    raise ValueError(f"fisher has NaN or inf values at {paths[int(np.argmin(finite))]!r}")
  n = sum(x.size for x in leaves)
  k = _percentile_keep_count(n, float(reserve_p))
  # Bisection over the float32 values between -inf and +inf, in the order of their keys:
  # the largest threshold with count(score >= threshold) >= k.
  lo, hi = _order_key(-np.inf), _order_key(np.inf)
  while lo < hi:
    mid = (lo + hi + 1) // 2
    count = int(np.asarray(_count_at_least(leaves, _key_float(mid)), np.int64).sum())
    lo, hi = (mid, hi) if count >= k else (lo, mid - 1)
  threshold = _key_float(lo)
  out = []
  for (_, x), take in zip(flat, selected):
    if take:
      out.append(jnp.asarray(x) >= threshold)
    else:
      out.append(jnp.ones(jnp.shape(x), jnp.bool_))
  return jax.tree_util.tree_unflatten(treedef, out)


@jax.jit
def _overlap_counts(a: list[jax.Array], b: list[jax.Array]) -> tuple[jax.Array, jax.Array]:
  inter = jnp.stack([jnp.sum(x & y, dtype=jnp.uint32) for x, y in zip(a, b)])
  union = jnp.stack([jnp.sum(x | y, dtype=jnp.uint32) for x, y in zip(a, b)])
  return inter, union


def _selected_leaves(keep: Any, where: _tree.Where) -> list[jax.Array]:
  return [jnp.asarray(x) for x, take in zip(
      jax.tree_util.tree_leaves(keep), _tree.resolve_where(where, keep)) if take]


def jaccard(keep_a: optax.Params, keep_b: optax.Params, *, where: _tree.Where = None) -> float:
  r"""The Jaccard coefficient :math:`|A \cap B| / |A \cup B|` of two child networks.

  Counted over all scalars of the selected leaves (``where``; pass
  :func:`is_encoder_layer` to leave out the always-trained leaves of a D mask). Two
  empty child networks are equal: their coefficient is 1.

  Examples:
    >>> import jax.numpy as jnp
    >>> from childtune_jax import jaccard
    >>> jaccard({"w": jnp.array([True, True, False])}, {"w": jnp.array([True, False, True])})
    0.3333333333333333
  """
  _tree.check_bool("keep_a", keep_a)
  _tree.check_bool("keep_b", keep_b)
  _tree.check_structure("keep_b", keep_b, keep_a)
  inter, union = _overlap_counts(_selected_leaves(keep_a, where), _selected_leaves(keep_b, where))
  inter, union = int(np.asarray(inter, np.int64).sum()), int(np.asarray(union, np.int64).sum())
  return 1.0 if union == 0 else inter / union


def kept_fraction(keep: optax.Params, *, where: _tree.Where = None) -> tuple[int, int]:
  """``(kept, total)`` scalar counts of a child network over the selected leaves."""
  leaves = _selected_leaves(keep, where)
  kept = sum(int(jnp.sum(x, dtype=jnp.uint32)) for x in leaves)
  return kept, sum(x.size for x in leaves)


def random_keep(
    key: int | jax.Array, like: optax.Params, reserve_p: float, *, where: _tree.Where = None
) -> optax.Params:
  """A fixed random child network: each selected scalar kept with probability ``reserve_p``.

  The control of the paper's analysis (a D child network against a random one of the
  same size): pass the kept fraction of the D mask as ``reserve_p``. Unselected leaves
  are all ``True``.
  """
  _check_reserve_p(reserve_p)
  key = _canonical_key(key)
  leaves, treedef = jax.tree_util.tree_flatten(like)
  selected = _tree.resolve_where(where, like)
  keys = jax.random.split(key, max(len(leaves), 1))
  out = [
      jax.random.bernoulli(k, reserve_p, jnp.shape(x)) if take else jnp.ones(jnp.shape(x), bool)
      for k, x, take in zip(keys, leaves, selected)
  ]
  return jax.tree_util.tree_unflatten(treedef, out)
