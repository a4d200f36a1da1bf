"""Child-Tuning as optax gradient transformations.

Xu et al, "Raise a Child in Large Language Model: Towards Effective and Generalizable
Fine-tuning", EMNLP 2021 (https://arxiv.org/abs/2109.05687).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from childtune_jax import _tree
from childtune_jax import packing as _packing

Sampler = Literal["hash8", "uint8", "uint16", "bernoulli"]
Mode = Literal["F", "D"]
SAMPLERS: tuple[Sampler, ...] = ("hash8", "uint8", "uint16", "bernoulli")
"""How :func:`child_tuning_f` draws its keep-mask (default ``"hash8"``).

Random bits are the cost of Child-Tuning_F. On a BERT-base-sized update on CPU
(``benchmarks/RESULTS.md``) ``optax.adamw`` alone takes 1x, with F masks drawn by
``"hash8"`` 1.28x, ``"uint8"`` 3.2x, ``"uint16"`` 5.4x and ``"bernoulli"`` 10.3x. The
8-bit samplers round the keep probability to a multiple of 1/256 (0.3 becomes
77/256 = 0.3008); the rescale divides by the rounded value.

- ``"bernoulli"``: ``jax.random.bernoulli``: one 32-bit random word per scalar, ``p``
  exact to float32.
- ``"uint16"``: two decisions per 32-bit word (16-bit slices compared with
  ``round(p * 2**16)``): ``p`` rounded to a multiple of ``2**-16``.
- ``"uint8"``: four decisions per 32-bit word: ``p`` rounded to a multiple of ``2**-8``.
- ``"hash8"``: as ``"uint8"``, with the words from a keyed counter hash (two rounds of
  MurmurHash3's finaliser over the word index, keyed by two threefry words per leaf and
  step) instead of threefry: several times cheaper, statistically sound, not
  cryptographic.

The rescale always divides by the probability actually used, so the masked gradient
stays unbiased whatever the sampler.
"""


def _check_reserve_p(reserve_p: Any, name: str = "reserve_p") -> None:
  """Validates a concrete ``reserve_p``; traced values (inject_hyperparams) pass."""
  if isinstance(reserve_p, jax.core.Tracer):
    return
  array = np.asarray(reserve_p)
  if array.shape or array.dtype.kind not in "fiu" or isinstance(reserve_p, bool):
    raise TypeError(f"{name} must be a number in (0, 1], got {reserve_p!r}")
  value = float(array)
  if not (0.0 < value <= 1.0):  # also rejects NaN
    raise ValueError(f"{name} must be in (0, 1], got {reserve_p!r}")


def _canonical_key(key: Any) -> jax.Array:
  """An int seed, a raw uint32 key or a typed key, as a typed ``jax.random.key``."""
  if key is None:
    raise TypeError("key is required: pass an int seed or a jax.random.key")
  if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
    if not -(2**63) <= int(key) < 2**64:
      raise ValueError(f"key must be a seed that fits in 64 bits, got {key}")
    return jax.random.key(int(key))
  if isinstance(key, jax.Array | np.ndarray):
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
      if key.shape:
        raise ValueError(f"key must be a single key, got shape {key.shape}")
      return key
    if key.dtype == np.uint32 and key.shape[-1:] == (2,) and key.ndim == 1:
      return jax.random.wrap_key_data(key)
  raise TypeError(f"key must be an int seed or a jax.random.key, got {key!r}")


class ChildTuningFState(NamedTuple):
  """State of :func:`child_tuning_f`.

  Attributes:
    count: number of updates drawn so far (int32); the mask of update ``t`` comes from
      ``fold_in(key, t)``.
    key: the base PRNG key (typed), fixed for the run.
  """

  count: jax.Array
  key: jax.Array


def _fmix32(h: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finaliser: a bijective avalanche mix of uint32 words."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _hash_bits(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """uint32 words ``fmix32(fmix32(i + s0) ^ s1)`` of each word's row-major index ``i``.

  ``(s0, s1)`` are two threefry words drawn from ``key``. A keyed counter hash: about
  10 integer operations per word against threefry's ~100 per 64 bits; statistically
  sound for masks, not a cryptographic generator.
  """
  s0, s1 = jax.random.bits(key, (2,), jnp.uint32)
  index = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(len(shape))):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride)
    stride *= shape[axis]
  return _fmix32(_fmix32(index + s0) ^ s1)


def _packed_keep(
    key: jax.Array, reserve_p: Any, shape: tuple[int, ...], width: int, hashed: bool = False
) -> tuple[jax.Array, jax.Array]:
  """A keep-mask from ``32 // width`` slices of each 32-bit random word.

  Words are laid out along the last axis, so the leading axes (and their sharding)
  are untouched. Returns the mask and the probability it realises.
  """
  per_word = 32 // width
  levels = 2**width
  threshold = jnp.clip(jnp.round(jnp.asarray(reserve_p, jnp.float32) * levels), 0, levels)
  threshold = threshold.astype(jnp.uint32)
  full = shape if shape else (1,)
  last = full[-1]
  word_shape = full[:-1] + (-(-last // per_word),)
  words = _hash_bits(key, word_shape) if hashed else jax.random.bits(key, word_shape, jnp.uint32)
  shifts = jnp.arange(per_word, dtype=jnp.uint32) * width
  slices = (words[..., None] >> shifts) & jnp.uint32(levels - 1)
  slices = slices.reshape(full[:-1] + (-1,))[..., :last]
  return (slices < threshold).reshape(shape), threshold.astype(jnp.float32) / levels


def keep_mask_f(
    key: jax.Array, reserve_p: Any, shape: tuple[int, ...], sampler: Sampler = "bernoulli"
) -> tuple[jax.Array, jax.Array]:
  """One Child-Tuning_F keep-mask and the keep probability it realises."""
  if sampler == "bernoulli":
    p = jnp.clip(jnp.asarray(reserve_p, jnp.float32), 0.0, 1.0)
    return jax.random.bernoulli(key, p, shape), p
  if sampler == "uint16":
    return _packed_keep(key, reserve_p, shape, 16)
  if sampler == "uint8":
    return _packed_keep(key, reserve_p, shape, 8)
  if sampler == "hash8":
    return _packed_keep(key, reserve_p, shape, 8, hashed=True)
  raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")


def child_tuning_f(
    reserve_p: float | jax.Array,
    key: int | jax.Array,
    *,
    rescale: bool = True,
    where: _tree.Where = None,
    sampler: Sampler = "hash8",
) -> optax.GradientTransformation:
  r"""Child-Tuning_F: masks updates with a fresh Bernoulli keep-mask every step.

  For every scalar :math:`i` of every selected leaf, update :math:`t` draws
  :math:`M_t(i) \sim \mathrm{Bernoulli}(p)` independently and returns

  .. math::
    u'_t(i) = u_t(i) \, M_t(i) / p \quad (\text{or } u_t(i) \, M_t(i) \text{ without rescale}).

  The rescale keeps the masked gradient unbiased, :math:`E[u'_t] = u_t`. Place it
  before the optimizer, as the reference code does (after global-norm clipping):
  ``optax.chain(optax.clip_by_global_norm(1.0), child_tuning_f(p, key), optax.adamw(lr))``.
  Inside ``optax.MultiSteps`` it draws one mask per optimizer step, applied to the
  accumulated gradient; outside, one mask per micro-batch.

  The mask of update :math:`t` is a pure function of ``(key, t)``: the same key gives
  the same masks, on any number of devices and shardings.

  Args:
    reserve_p: the keep probability :math:`p \in (0, 1]` (the size of the child
      network); ``1`` is the identity. A concrete value outside (0, 1] raises. A traced
      one (``inject_hyperparams``, a schedule) is clipped to [0, 1]: 0 or below keeps
      nothing (zero updates, never a division by zero), above 1 keeps everything, and
      NaN makes every masked update NaN, so that ``optax.apply_if_finite`` skips it. No
      error can be raised inside ``jit``: under ``apply_if_finite`` a NaN ``reserve_p``
      skips the step and counts in its ``notfinite_count``, as a NaN gradient does (a
      schedule that returns NaN stalls training there: watch that count); without it the
      parameters become NaN, which a training loop's finiteness check sees.
    key: an int seed or a ``jax.random.key``; its PRNG implementation is used for the
      masks (e.g. ``jax.random.key(0, impl="rbg")`` for a faster generator).
    rescale: divide the kept entries by :math:`p` (the reference code does).
    where: which leaves are masked: ``None`` (every leaf, as the reference code),
      a predicate on a leaf's path string, or a static bool pytree. Other leaves pass
      through unchanged.
    sampler: how the random bits become a mask; see :data:`SAMPLERS`. With
      ``"hash8"`` (default), ``"uint8"`` or ``"uint16"``, :math:`p` is rounded to a
      multiple of :math:`2^{-8}` or :math:`2^{-16}` and the rescale uses the rounded
      value; ``"bernoulli"`` (``jax.random.bernoulli``) keeps :math:`p` exact to float32
      at about 8x the cost of ``"hash8"``.

  Returns:
    An ``optax.GradientTransformation`` whose state is a :class:`ChildTuningFState`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> from childtune_jax import child_tuning_f
    >>> tx = optax.chain(child_tuning_f(0.3, key=0), optax.adamw(1e-3))
    >>> params = {"w": jnp.ones((4, 3))}
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state, params)
    >>> updates["w"].shape
    (4, 3)

  References:
    Xu et al, `Raise a Child in Large Language Model: Towards Effective and
    Generalizable Fine-tuning <https://arxiv.org/abs/2109.05687>`_, EMNLP 2021
  """
  _check_reserve_p(reserve_p)
  if sampler not in SAMPLERS:
    raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
  if sampler != "bernoulli" and not isinstance(reserve_p, jax.core.Tracer):
    width = 16 if sampler == "uint16" else 8
    if round(float(reserve_p) * 2**width) < 1:
      raise ValueError(
          f"reserve_p={reserve_p!r} rounds to 0 with sampler={sampler!r}; "
          "use a larger reserve_p or sampler='bernoulli'"
      )
  key = _canonical_key(key)

  def init_fn(params: optax.Params) -> ChildTuningFState:
    del params
    # A copy: a train step that donates the optimizer state must not delete `key`.
    fresh = jax.random.wrap_key_data(jnp.array(jax.random.key_data(key)),
                                     impl=jax.random.key_impl(key))
    return ChildTuningFState(count=jnp.zeros([], jnp.int32), key=fresh)

  def update_fn(
      updates: optax.Updates, state: ChildTuningFState, params: optax.Params | None = None
  ) -> tuple[optax.Updates, ChildTuningFState]:
    del params
    leaves, treedef = jax.tree_util.tree_flatten(updates)
    selected = _tree.resolve_where(where, updates)
    traced_p = isinstance(reserve_p, jax.core.Tracer)
    step_key = jax.random.fold_in(state.key, state.count)
    leaf_keys = jax.random.split(step_key, max(len(leaves), 1))
    out = []
    for leaf_key, u, take in zip(leaf_keys, leaves, selected):
      if not take or not u.size:  # a zero-size leaf has nothing to mask
        out.append(u)
        continue
      keep, p = keep_mask_f(leaf_key, reserve_p, u.shape, sampler)
      kept = (u / jnp.where(p > 0, p, 1.0)).astype(u.dtype) if rescale else u
      masked = jnp.where(keep, kept, jnp.zeros_like(u))
      if traced_p:  # a NaN reserve_p poisons the update, for optax.apply_if_finite to see
        masked = jnp.where(jnp.isnan(jnp.asarray(reserve_p, jnp.float32)), jnp.nan, masked)
      out.append(masked)
    new_state = ChildTuningFState(count=optax.safe_int32_increment(state.count), key=state.key)
    return jax.tree_util.tree_unflatten(treedef, out), new_state

  return optax.GradientTransformation(init_fn, update_fn)


class ChildTuningDState(NamedTuple):
  """State of :func:`child_tuning_d`.

  Attributes:
    keep: pytree with the params' structure: ``True`` for the scalars of the child
      network (updated), ``False`` for the rest (gradient zeroed); bool leaves, or
      ``uint8``/``uint32`` words with one bit per scalar (see :func:`pack_keep`).
  """

  keep: optax.Params


def child_tuning_d(
    keep: optax.Params, *, packing: str | None = None
) -> optax.GradientTransformation:
  r"""Child-Tuning_D: masks updates with a fixed keep-mask (the task-driven child network).

  .. math::
    u'_t(i) = u_t(i) \, M(i), \qquad M = \texttt{keep}

  The mask is not rescaled. ``keep`` usually comes from :func:`fisher_mask` on the
  :func:`fisher_information` of the task data. It is stored in the optimizer state
  (so it is sharded, donated and checkpointed with it), never compiled in as a
  constant; ``init`` copies it, so that donating the state leaves ``keep`` intact. Masked
  entries become exact zeros (``jnp.where``), even where the update is
  NaN or inf.

  A bool mask costs one byte per parameter in the state; bit-packed (``packing``, or
  leaves packed by :func:`pack_keep`) it costs one bit, and the update unpacks it inside
  the same fused loop (``benchmarks/RESULTS.md`` measures the cost).

  Args:
    keep: a pytree with the structure of the params whose leaves are bool arrays of
      the params' shapes, or words packed by :func:`pack_keep` (``uint8``/``uint32``).
    packing: ``"uint8"`` or ``"uint32"`` to keep bool leaves bit-packed in the state;
      ``None`` (default) stores them as given.

  Returns:
    An ``optax.GradientTransformation`` whose state is a :class:`ChildTuningDState`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from childtune_jax import child_tuning_d
    >>> params = {"w": jnp.ones(4)}
    >>> tx = child_tuning_d({"w": jnp.array([True, False, True, False])}, packing="uint8")
    >>> updates, _ = tx.update(params, tx.init(params))
    >>> updates["w"].tolist()
    [1.0, 0.0, 1.0, 0.0]

  References:
    Xu et al, `Raise a Child in Large Language Model: Towards Effective and
    Generalizable Fine-tuning <https://arxiv.org/abs/2109.05687>`_, EMNLP 2021
  """
  if packing is not None:
    _packing.check_packing(packing)
  keep = _tree.unbox(keep)
  _packing.check_mask_dtypes("keep", keep)

  def store(leaf: Any) -> jax.Array:
    # A copy: a train step that donates the optimizer state must not delete `keep`.
    if packing is None or _packing.is_packed(leaf):
      return jnp.array(leaf)
    return _packing.pack_leaf(jnp.asarray(leaf), packing)

  def init_fn(params: optax.Params) -> ChildTuningDState:
    params = _tree.unbox(params)  # nnx.Optimizer passes nnx.Variables
    _packing.check_packed("keep", keep, params, check_containers=False)
    # In the params' containers, so that the state mirrors them (a dict keep, nnx.State params).
    return ChildTuningDState(keep=_tree.relayout(jax.tree_util.tree_map(store, keep), params))

  def update_fn(
      updates: optax.Updates, state: ChildTuningDState, params: optax.Params | None = None
  ) -> tuple[optax.Updates, ChildTuningDState]:
    del params
    _packing.check_packed("keep", state.keep, updates, reference_name="the updates",
                          check_containers=False)

    def mask(u: jax.Array, k: jax.Array) -> jax.Array:
      if _packing.is_packed(k):
        k = _packing.unpack_leaf(k, u.shape)
      return jnp.where(k, u, jnp.zeros_like(u))

    leaves, treedef = jax.tree_util.tree_flatten(updates)
    out = [mask(u, k) for u, k in zip(leaves, jax.tree_util.tree_leaves(state.keep))]
    return jax.tree_util.tree_unflatten(treedef, out), state

  return optax.GradientTransformation(init_fn, update_fn)


_NO_DECAY = re.compile(r"layer_?norm|^ln(_|$)", re.IGNORECASE)


def default_weight_decay_mask(params: optax.Params) -> Any:
  """The reference code's decay rule: no weight decay on biases and LayerNorm parameters.

  A leaf is decayed unless its name is ``bias`` or a module on its path is a
  LayerNorm (``LayerNorm``, ``layer_norm``, ``layernorm``, ``ln_*``).
  """

  def decay(path: tuple, leaf: Any) -> bool:
    del leaf
    names = _tree.path_str(path).split("/")
    return names[-1] != "bias" and not any(_NO_DECAY.search(n) for n in names[:-1])

  return jax.tree_util.tree_map_with_path(decay, params)


def child_tuning_adamw(
    learning_rate: optax.ScalarOrSchedule,
    *,
    mode: Mode,
    reserve_p: float = 0.3,
    key: int | jax.Array | None = None,
    keep: optax.Params | None = None,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.01,
    weight_decay_mask: Any | Callable[[optax.Params], Any] | None = None,
    where: _tree.Where = None,
    sampler: Sampler = "hash8",
    freeze_non_child: bool = False,
    packing: str | None = None,
) -> optax.GradientTransformation:
  r"""AdamW fed Child-Tuning-masked gradients: ``chain(child_tuning_*, adamw)``.

  The mask comes first, so Adam's moments see the masked gradients (as in the
  reference code). Non-child parameters still move a little, through the momentum of
  earlier steps and through decoupled weight decay; ``freeze_non_child=True`` applies
  the same mask to the final update too, so that they do not move at all (the
  paper's wording).

  Args:
    learning_rate: a float or an optax schedule.
    mode: ``"F"`` (task-free, needs ``key``) or ``"D"`` (task-driven, needs ``keep``).
    reserve_p: keep probability of F (ignored by D, whose ``keep`` is given).
    key: PRNG key or int seed for F.
    keep: bool pytree (the child network) for D.
    b1, b2, eps: Adam's parameters (the reference uses ``eps=1e-6``).
    weight_decay: decoupled weight decay.
    weight_decay_mask: which leaves decay: a bool pytree or a function of the params;
      default :func:`default_weight_decay_mask` (no decay on biases and LayerNorm).
    where: leaves F masks (see :func:`child_tuning_f`).
    sampler: F's sampler (see :data:`SAMPLERS`).
    freeze_non_child: also mask the final update.
    packing: D only: keep the mask bit-packed (``"uint8"``/``"uint32"``); see
      :func:`child_tuning_d`.

  Returns:
    An ``optax.GradientTransformation``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> from childtune_jax import child_tuning_adamw
    >>> schedule = optax.linear_schedule(1e-3, 0.0, 100)
    >>> tx = child_tuning_adamw(schedule, mode="F", reserve_p=0.3, key=0)
    >>> params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}
    >>> updates, state = tx.update(params, tx.init(params), params)

  References:
    Xu et al, `Raise a Child in Large Language Model: Towards Effective and
    Generalizable Fine-tuning <https://arxiv.org/abs/2109.05687>`_, EMNLP 2021
  """
  mode_name = mode.upper() if isinstance(mode, str) else mode
  if mode_name == "F":
    if key is None:
      raise ValueError("mode='F' needs a key (an int seed or a jax.random.key)")
    if keep is not None:
      raise ValueError("mode='F' draws its own masks: do not pass keep")
    if packing is not None:
      raise ValueError("packing is for mode='D' (F draws its masks anew every step)")

    def make_mask(rescale: bool) -> optax.GradientTransformation:
      return child_tuning_f(reserve_p, key, rescale=rescale, where=where, sampler=sampler)

  elif mode_name == "D":
    if keep is None:
      raise ValueError("mode='D' needs keep (e.g. from fisher_mask)")

    def make_mask(rescale: bool) -> optax.GradientTransformation:
      del rescale
      return child_tuning_d(keep, packing=packing)

  else:
    raise ValueError(f"mode must be 'F' or 'D', got {mode!r}")
  adamw = optax.adamw(
      learning_rate,
      b1=b1,
      b2=b2,
      eps=eps,
      weight_decay=weight_decay,
      mask=default_weight_decay_mask if weight_decay_mask is None else weight_decay_mask,
  )
  if freeze_non_child:
    # Same key and step count as the first mask, so the same mask, not rescaled.
    return optax.chain(make_mask(True), adamw, make_mask(False))
  return optax.chain(make_mask(True), adamw)

