"""Child networks as bool pytrees: top-p selection by Fisher score, overlap, random masks."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from childtune_jax import _tree
from childtune_jax import packing as _packing
from childtune_jax.parallel import to_host
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


_CHUNK = 1 << 20


def _chunked_sum(fn: Callable[..., jax.Array], *arrays: jax.Array) -> jax.Array:
  """``fn`` summed over chunks of the flattened ``arrays`` (traceable).

  One reduction over a whole large leaf makes XLA:CPU materialise its converted input
  (4 bytes per scalar: ~1 GB for 125M); a loop over 1M-scalar chunks keeps the
  temporaries at a few MB, and is faster too.
  """
  flats = [a.reshape(-1) for a in arrays]
  full = flats[0].size // _CHUNK
  total = fn(*(f[full * _CHUNK:] for f in flats))
  if not full:
    return total

  def body(i: jax.Array, acc: jax.Array) -> jax.Array:
    return acc + fn(*(jax.lax.dynamic_slice(f, (i * _CHUNK,), (_CHUNK,)) for f in flats))

  return jax.lax.fori_loop(0, full, body, total)


@jax.jit
def _count_leaf(x: jax.Array, thresholds: jax.Array) -> jax.Array:
  return _chunked_sum(
      lambda p: jnp.stack([jnp.sum(p >= t, dtype=jnp.uint32) for t in thresholds]), x)


def _counts(leaves: list[jax.Array], *thresholds: np.float32) -> list[int]:
  """Scores ``>=`` each threshold, one leaf at a time (one leaf's temporaries alive)."""
  total = np.zeros(len(thresholds), np.int64)
  for x in leaves:
    total += to_host(_count_leaf(x, np.asarray(thresholds, np.float32))).astype(np.int64)
  return [int(c) for c in total]


@jax.jit
def _nonfinite_count(x: jax.Array) -> jax.Array:
  return _chunked_sum(lambda p: jnp.sum(~jnp.isfinite(p), dtype=jnp.uint32), x)


def _percentile_keep_count(n: int, reserve_p: float) -> int:
  """How many of ``n`` tie-free scores ``>= np.percentile(s, (1 - reserve_p) * 100)``."""
  q = ((1.0 - reserve_p) * 100.0) / 100.0  # the reference's percentile, as numpy reads it
  pos = min(max((n - 1) * q, 0.0), n - 1.0)  # numpy's 'linear' virtual index
  below = math.floor(pos)
  return n - below if pos == below else n - below - 1


def _kth_largest_bisection(leaves: list[jax.Array], k: int) -> np.float32:
  """The k-th largest score: bisection over float32 values in the order of their bits.

  The largest threshold with ``count(score >= threshold) >= k``; 32 counting passes.
  """
  lo, hi = _order_key(-np.inf), _order_key(np.inf)
  while lo < hi:
    mid = (lo + hi + 1) // 2
    t = _key_float(mid)
    (count,) = _counts(leaves, t)
    lo, hi = (mid, hi) if count >= k else (lo, mid - 1)
  return _key_float(lo)


def _kth_largest_bracketed(
    leaves: list[jax.Array], k: int, sample_size: int = 1 << 20, max_candidates: int = 1 << 24
) -> np.float32 | None:
  """The k-th largest score in about 3 passes, or ``None`` if the bracket misses.

  A strided sample brackets the k-th largest value in ``[low, high)``; one pass counts
  the scores at or above each end, a last one gathers the few candidates inside the
  bracket, and the answer is read off them. Exact: the sample only decides how much work
  the last step has.
  """
  n = sum(x.size for x in leaves)
  stride = max(1, n // sample_size)
  sample = np.sort(np.concatenate([to_host(x.reshape(-1)[::stride]).astype(np.float32)
                                   for x in leaves]))[::-1]  # descending
  m = len(sample)
  rank = k / n * m  # expected position of the k-th largest in the sample
  margin = 6 * math.sqrt(m * (k / n) * (1 - k / n)) + 8
  high_i, low_i = int(rank - margin), int(math.ceil(rank + margin))
  high = sample[high_i] if high_i >= 0 else np.float32(np.inf)
  low = sample[low_i] if low_i < m else np.float32(-np.inf)
  at_least_low, at_least_high = _counts(leaves, low, high)
  if not at_least_high < k <= at_least_low or at_least_low - at_least_high > max_candidates:
    return None
  candidates = np.concatenate([_between(x, low, high) for x in leaves])
  return np.sort(candidates)[::-1][k - at_least_high - 1]


def _between(x: jax.Array, low: np.float32, high: np.float32, chunk: int = 1 << 24) -> np.ndarray:
  """The scores of ``x`` in ``[low, high)``, gathered on the host a chunk at a time.

  A boolean index of the whole leaf (``x[cond]``) would hold an int32 prefix sum of
  its size; chunks keep the transient memory at a few times ``chunk`` scalars.
  """
  flat = x.reshape(-1)
  out = []
  for start in range(0, flat.size, chunk):
    part = to_host(flat[start:start + chunk]).astype(np.float32)
    out.append(part[(part >= low) & (part < high)])
  return np.concatenate(out) if out else np.zeros(0, np.float32)


@functools.partial(jax.jit, static_argnames="packing")
def _mask_leaf(x: jax.Array, threshold: jax.Array, packing: str | None) -> jax.Array:
  keep = x >= threshold
  return keep if packing is None else _packing.pack_leaf(keep, packing)


def fisher_mask(
    fisher: optax.Params, reserve_p: float, *, where: _tree.Where = None,
    packing: str | None = None,
) -> optax.Params:
  r"""Keeps the top ``reserve_p`` fraction of scalars by score, under one global threshold.

  Among the selected leaves (``where``), the threshold :math:`\tau` is the reference
  code's ``np.percentile(all_scores, (1 - reserve_p) * 100)`` and the child network is
  :math:`\{i : F(i) \ge \tau\}`; unselected leaves are all ``True`` (always trained).

  Nothing is concatenated or sorted: a strided sample of about a million scores
  brackets :math:`\tau`, one fused pass counts the scores above each end of the
  bracket, and :math:`\tau` is read off the few scores inside it (about 3 passes in
  all). If the bracket misses (heavy ties, an unlucky sample) it falls back to bisection
  over the float32 values in the order of their bits (32 counting passes). Extra memory
  is a comparison of one leaf at a time, so it works for billions of parameters and for
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
    packing: ``"uint8"`` or ``"uint32"`` to return the mask bit-packed (see
      :func:`pack_keep`), one leaf at a time: 1/8 of the bool mask's memory.

  Returns:
    A bool pytree with the structure of ``fisher`` (or its packed words), for
    :func:`child_tuning_d`.

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
  if packing is not None:
    _packing.check_packing(packing)
  fisher = _tree.unbox(fisher)
  flat, treedef = jax.tree_util.tree_flatten_with_path(fisher)
  selected = _tree.resolve_where(where, fisher)
  leaves = [jnp.asarray(x) for (_, x), take in zip(flat, selected) if take]
  if not leaves:
    raise ValueError("fisher_mask: where selects no leaf")
  for (path, _), x in zip((f for f, take in zip(flat, selected) if take), leaves):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(f"fisher scores must be floating-point (squared gradients), got "
                      f"{x.dtype} at {_tree.path_str(path)!r}: is it a mask or a step count?")
  if not sum(x.size for x in leaves):
    raise ValueError("fisher_mask: the selected leaves hold no scalars")
  paths = [_tree.path_str(p) for (p, _), take in zip(flat, selected) if take]
  for path, x in zip(paths, leaves):
    if int(_nonfinite_count(x)):
      raise ValueError(f"fisher has NaN or inf values at {path!r}")
  n = sum(x.size for x in leaves)
  k = _percentile_keep_count(n, float(reserve_p))
  threshold = _kth_largest_bracketed(leaves, k)
  if threshold is None:
    threshold = _kth_largest_bisection(leaves, k)
  out = []
  for (_, x), take in zip(flat, selected):
    if take:
      out.append(_mask_leaf(jnp.asarray(x), threshold, packing))
    else:  # always trained, whatever its scores (NaN included)
      ones = jnp.ones(jnp.shape(x), jnp.bool_)
      out.append(ones if packing is None else _packing.pack_leaf(ones, packing))
  return jax.tree_util.tree_unflatten(treedef, out)


def _ones(x: jax.Array) -> jax.Array:
  """Set bits (packed words) or ``True`` entries (bools), per element, as uint32."""
  return jax.lax.population_count(x).astype(jnp.uint32) if x.dtype != jnp.bool_ else x


@jax.jit
def _overlap_leaf(a: jax.Array, b: jax.Array) -> jax.Array:
  """``[|a & b|, |a | b|]`` of one leaf."""
  return _chunked_sum(lambda x, y: jnp.stack([jnp.sum(_ones(x & y), dtype=jnp.uint32),
                                              jnp.sum(_ones(x | y), dtype=jnp.uint32)]), a, b)


@jax.jit
def _ones_leaf(x: jax.Array) -> jax.Array:
  return _chunked_sum(lambda p: jnp.sum(_ones(p), dtype=jnp.uint32), x)


def _selected_leaves(keep: Any, where: _tree.Where) -> list[jax.Array]:
  return [jnp.asarray(x) for x, take in zip(
      jax.tree_util.tree_leaves(keep), _tree.resolve_where(where, keep)) if take]


def jaccard(keep_a: optax.Params, keep_b: optax.Params, *, where: _tree.Where = None) -> float:
  r"""The Jaccard coefficient :math:`|A \cap B| / |A \cup B|` of two child networks.

  Counted over all scalars of the selected leaves (``where``; pass
  :func:`is_encoder_layer` to leave out the always-trained leaves of a D mask). Two
  empty child networks have no coefficient (0/0): the result is ``nan``, undefined. Both
  masks may be bool or both packed the same way (:func:`pack_keep`), which counts set bits
  directly.

  Examples:
    >>> import jax.numpy as jnp
    >>> from childtune_jax import jaccard
    >>> jaccard({"w": jnp.array([True, True, False])}, {"w": jnp.array([True, False, True])})
    0.3333333333333333
  """
  keep_a, keep_b = _tree.unbox(keep_a), _tree.unbox(keep_b)
  _packing.check_mask_dtypes("keep_a", keep_a)
  _packing.check_mask_dtypes("keep_b", keep_b)
  _tree.check_structure("keep_b", keep_b, keep_a, check_shapes=False)
  for path, a, b in zip(_tree.leaf_paths(keep_a), jax.tree_util.tree_leaves(keep_a),
                        jax.tree_util.tree_leaves(keep_b)):
    if a.dtype != b.dtype:
      raise ValueError(f"keep_a and keep_b differ at {path!r}: {a.dtype} vs {b.dtype} "
                       "(pack both masks the same way, or neither)")
  _tree.check_structure("keep_b", keep_b, keep_a)
  inter = union = 0
  for a, b in zip(_selected_leaves(keep_a, where), _selected_leaves(keep_b, where)):
    counts = to_host(_overlap_leaf(a, b)).astype(np.int64)
    inter, union = inter + int(counts[0]), union + int(counts[1])
  return math.nan if union == 0 else inter / union


def kept_fraction(keep: optax.Params, *, where: _tree.Where = None) -> tuple[int, int]:
  """``(kept, total)`` scalar counts of a child network (bool leaves) over the selected leaves."""
  keep = _tree.unbox(keep)
  _tree.check_bool("keep (unpack a packed mask with unpack_keep first)", keep)
  leaves = _selected_leaves(keep, where)
  kept = sum(int(_ones_leaf(x)) for x in leaves)
  return kept, sum(x.size for x in leaves)


def random_keep(
    key: int | jax.Array, like: optax.Params, reserve_p: float | None = None, *,
    count: int | None = None, where: _tree.Where = None,
) -> optax.Params:
  """A fixed random child network of an exact size, every subset of that size equally likely.

  The control of the paper's analysis (a D child network against a random one of the
  same size): pass the D network's kept count as ``count`` (from :func:`kept_fraction`),
  or a fraction as ``reserve_p`` (``round(reserve_p * n)`` of the ``n`` selected
  scalars). Unselected leaves are all ``True``.

  A Bernoulli draw at the target fraction comes within a few standard deviations of
  the size; a uniformly chosen set of its surplus kept (or missing) scalars is then
  flipped. A Bernoulli draw of a given size is a uniform subset of that size, so the
  result is a uniform subset of exactly the requested size.

  Args:
    key: a PRNG key or an int seed.
    like: the params pytree (only shapes are read).
    reserve_p: fraction of the selected scalars to keep, in (0, 1].
    count: the number of selected scalars to keep, instead of ``reserve_p``.
    where: leaves that take part, as in :func:`fisher_mask`.

  Returns:
    A bool pytree with the structure of ``like``.

  Raises:
    ValueError: neither or both of ``reserve_p`` and ``count``, either out of range, or
      no selected leaf.
  """
  if (reserve_p is None) == (count is None):
    raise ValueError("random_keep: give exactly one of reserve_p and count")
  like = _tree.unbox(like)
  leaves, treedef = jax.tree_util.tree_flatten(like)
  selected = _tree.resolve_where(where, like)
  sizes = [math.prod(jnp.shape(x)) for x, take in zip(leaves, selected) if take]
  n = sum(sizes)
  if not sizes:
    raise ValueError("random_keep: where selects no leaf")
  if count is None:
    _check_reserve_p(reserve_p)
    count = round(reserve_p * n)
  elif not isinstance(count, (int, np.integer)) or isinstance(count, bool):
    raise TypeError(f"random_keep: count must be an integer, got {count!r}")
  elif not 0 <= count <= n:
    raise ValueError(f"random_keep: count must be in [0, {n}], got {count}")
  draw_key, fix_key = jax.random.split(_canonical_key(key))
  keys = jax.random.split(draw_key, len(sizes))
  masks = [jax.random.bernoulli(k, count / n if n else 0.0, jnp.shape(x))
           for k, x in zip(keys, (x for x, take in zip(leaves, selected) if take))]
  kept = [int(_ones_leaf(m)) for m in masks]
  surplus = sum(kept) - count
  if surplus:  # flip |surplus| scalars drawn from the kept ones (surplus > 0) or the others
    value = surplus > 0
    pools = np.array(kept if value else [s - c for s, c in zip(sizes, kept)], np.int64)
    seed = np.asarray(jax.random.bits(fix_key, (4,), jnp.uint32)).tolist()
    ranks = np.sort(np.random.default_rng(seed).choice(pools.sum(), abs(surplus),
                                                       replace=False))
    starts = np.concatenate([[0], np.cumsum(pools)])
    for i, m in enumerate(masks):
      local = ranks[(ranks >= starts[i]) & (ranks < starts[i + 1])] - starts[i]
      if local.size:
        positions = np.flatnonzero(to_host(m).reshape(-1) == value)[local]
        masks[i] = m.reshape(-1).at[positions].set(not value).reshape(m.shape)
  it = iter(masks)
  out = [next(it) if take else jnp.ones(jnp.shape(x), bool) for x, take in zip(leaves, selected)]
  return jax.tree_util.tree_unflatten(treedef, out)


COMBINE = ("normalized-sum", "union", "intersection")


def shared_fisher_mask(
    fishers: Sequence[optax.Params],
    reserve_p: float,
    *,
    combine: str = "normalized-sum",
    where: _tree.Where = None,
) -> optax.Params:
  r"""One child network for several tasks, from each task's Fisher information.

  ``combine`` says how the tasks share it:

  - ``"normalized-sum"`` (default): the top-``reserve_p`` scalars of
    :math:`\sum_t F_t / \lVert F_t \rVert_1`, each task's Fisher divided by its own total
    over the selected leaves, so that a task with larger gradients (or more data) does not
    drown the others; then :func:`fisher_mask`.
  - ``"union"`` / ``"intersection"``: each task's own top-``reserve_p`` network
    (:func:`fisher_mask`), then their union or intersection: the shared network is then
    larger (union) or smaller (intersection) than ``reserve_p``.

  Args:
    fishers: one Fisher pytree per task, all of the same structure and shapes (the shared
      parameters; leave the task heads out, or out of ``where``).
    reserve_p: the fraction of the selected scalars each network keeps, in (0, 1].
    combine: one of :data:`COMBINE`.
    where: the leaves that take part, as in :func:`fisher_mask`; the others are all ``True``.

  Returns:
    A bool pytree with the structure of each Fisher pytree, for :func:`child_tuning_d`.

  Raises:
    ValueError: no task, pytrees of different structure, an unknown ``combine``, a task
      whose Fisher is zero everywhere (normalised sum), or what :func:`fisher_mask` refuses.

  Examples:
    >>> import jax.numpy as jnp
    >>> from childtune_jax import shared_fisher_mask
    >>> a, b = {"w": jnp.array([4.0, 0.0, 0.0, 0.0])}, {"w": jnp.array([0.0, 0.2, 0.1, 0.0])}
    >>> shared_fisher_mask([a, b], 0.5)["w"].tolist()  # b's 0.2 counts as much as a's 4.0
    [True, True, False, False]
  """
  if combine not in COMBINE:
    raise ValueError(f"combine must be one of {COMBINE}, got {combine!r}")
  if not fishers:
    raise ValueError("shared_fisher_mask needs the Fisher information of at least one task")
  fishers = [_tree.unbox(f) for f in fishers]
  for i, f in enumerate(fishers[1:], start=1):
    _tree.check_structure(f"fishers[{i}]", f, fishers[0], reference_name="fishers[0]")
  if combine != "normalized-sum":
    masks = [fisher_mask(f, reserve_p, where=where) for f in fishers]
    op = jnp.logical_or if combine == "union" else jnp.logical_and
    return jax.tree_util.tree_map(lambda *m: functools.reduce(op, m), *masks)
  selected = _tree.resolve_where(where, fishers[0])
  totals = []
  for i, f in enumerate(fishers):
    total = sum(float(jnp.sum(jnp.asarray(x, jnp.float32)))
                for x, take in zip(jax.tree_util.tree_leaves(f), selected) if take)
    if not total > 0:
      raise ValueError(f"fishers[{i}] is zero (or not finite) over the selected leaves: "
                       "it cannot be normalised")
    totals.append(total)
  combined = jax.tree_util.tree_map(
      lambda *xs: sum(jnp.asarray(x, jnp.float32) / t for x, t in zip(xs, totals)), *fishers)
  return fisher_mask(combined, reserve_p, where=where)
