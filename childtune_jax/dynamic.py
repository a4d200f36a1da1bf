"""A dynamic child network: re-selected during training from a running gradient score.

Child-Tuning_D fixes its child network once, before training, from the Fisher
information of the pretrained model. :func:`child_tuning_dynamic` keeps the diagonal
empirical Fisher up to date instead (a running score of squared gradients in its state)
and re-selects the top ``reserve_p`` scalars every ``every`` steps, inside ``jit``.
The DPS schedule of Zhang et al. (NeurIPS 2022) is one configuration of it:
:func:`dps`. :func:`scale_by_dynamic_adam` (and :func:`child_tuning_dynamic_adamw`) take
Adam's own second moment as the score and mask Adam's update: no buffer of their own.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from childtune_jax import _tree
from childtune_jax import packing as _packing
from childtune_jax.masks import _chunked_sum, _percentile_keep_count
from childtune_jax.transform import _check_reserve_p

SCOPES = ("global", "per_leaf")
# The threshold search settles the 32-bit key's digits, highest first: 3 passes of 11, 11
# and 10 bits (fewer, wider passes read the scores fewer times; 2**11 bins stay small).
_DIGITS = ((21, 11), (10, 11), (0, 10))  # (shift, width)


class ChildTuningDynamicState(NamedTuple):
  """State of :func:`child_tuning_dynamic`.

  Attributes:
    count: updates seen so far (int32).
    score: the running importance of every scalar of the selected leaves (an EMA, or a
      sum, of squared incoming updates), in ``score_dtype``; ``optax.MaskedNode()`` at
      leaves that are not selected.
    keep: the current child network of the selected leaves, one bit per scalar
      (``uint8`` words along the last axis, see :func:`childtune_jax.pack_keep`);
      ``optax.MaskedNode()`` elsewhere.
  """

  count: jax.Array
  score: optax.Updates
  keep: optax.Updates


def _order_key(x: jax.Array) -> jax.Array:
  """uint32 keys with the order of the float32 values (NaN above +inf)."""
  bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32) + 0.0, jnp.uint32)
  return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))


def _digit_histogram(x: jax.Array, prefix: jax.Array, shift: int, width: int) -> jax.Array:
  """Counts of the ``width``-bit digit at ``shift`` of the keys whose higher bits equal
  ``prefix``'s."""
  key = _order_key(x)
  digit = (key >> shift) & jnp.uint32(2**width - 1)
  top = shift + width
  if top < 32:
    digit = jnp.where(key >> top == prefix >> top, digit, 2**width)
  return jnp.zeros(2**width + 1, jnp.uint32).at[digit].add(1)[:-1]  # the last bin: others


def kth_largest_keys(groups: list[list[jax.Array]], ks: jax.Array) -> jax.Array:
  """The order key of the ``ks[g]``-th largest score of each group of leaves, exactly.

  A radix select, traceable and without sorting or concatenating: 3 passes over the
  scores, each settling 11 (then 11, then 10) more bits of the key from a histogram of the
  keys that share the bits settled so far. Invariant: at least ``k`` scores are ``>=`` the
  prefix found so far; at the end it is the largest key with that property, the k-th
  largest.
  """
  prefixes = [jnp.uint32(0)] * len(groups)
  above = [jnp.uint32(0)] * len(groups)  # keys above the prefix in the bits settled so far
  for shift, width in _DIGITS:
    for g, leaves in enumerate(groups):
      hist = sum(_chunked_sum(
          lambda c, p=prefixes[g], s=shift, w=width: _digit_histogram(c, p, s, w), x)
          for x in leaves)
      at_least = above[g] + jnp.cumsum(hist[::-1])[::-1]  # keys >= prefix | digit << shift
      digit = jnp.sum(at_least >= ks[g], dtype=jnp.uint32) - 1  # non-increasing in digit
      above[g] = at_least[digit] - hist[digit]
      prefixes[g] = prefixes[g] | (digit << shift)
  return jnp.stack(prefixes)


def _keep_count(n: int, reserve_p: Any) -> jax.Array:
  """The percentile's keep count for ``n`` scores (exact for a concrete ``reserve_p``).

  A traced ``reserve_p`` (``inject_hyperparams``) is clipped to [0, 1] (NaN keeps all)
  and the count computed in float32: off by at most about ``n * 2**-23`` scalars.
  """
  if not isinstance(reserve_p, jax.core.Tracer):
    return jnp.uint32(_percentile_keep_count(n, float(reserve_p)))
  p = jnp.clip(jnp.nan_to_num(jnp.asarray(reserve_p, jnp.float32), nan=1.0), 0.0, 1.0)
  pos = (n - 1) * (1.0 - p)
  below = jnp.floor(pos)
  k = jnp.where(pos == below, n - below, n - below - 1)
  return jnp.clip(k, 1, n).astype(jnp.uint32)


def _stages(t: jax.Array, every: Any, full_stage: Any, alternate: bool
            ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """At step ``t``: (a full-update step?, a selection step?, the first step of a stage?)."""
  period_every = jnp.maximum(jnp.asarray(every, jnp.int32), 1)
  stage = jnp.maximum(jnp.asarray(full_stage, jnp.int32), 0)
  if alternate:
    c = t % (stage + period_every)
    return c < stage, c == stage, c == 0
  since = t - stage
  return (since < 0, (since >= 0) & (since % period_every == 0),
          (since >= 1) & ((since - 1) % period_every == 0))


def _select(scores: list[jax.Array], reserve_p: Any, scope: str) -> list[jax.Array]:
  """The top ``reserve_p`` of ``scores`` (over all, or per leaf), packed one bit a scalar."""
  if scope == "global":
    groups = [scores]
    ks = jnp.stack([_keep_count(sum(s.size for s in scores), reserve_p)])
  else:
    groups = [[s] for s in scores]
    ks = jnp.stack([_keep_count(s.size, reserve_p) for s in scores])
  thresholds = kth_largest_keys(groups, ks)
  owner = [0] * len(scores) if scope == "global" else range(len(scores))
  return [_packing.pack_leaf(_order_key(s) >= thresholds[g], "uint8")
          for s, g in zip(scores, owner)]


def _network_step(leaves: list[Any], keeps: list[Any], idx: list[int], scores: list[jax.Array],
                  select: jax.Array, gathering: jax.Array, reserve_p: Any, scope: str
                  ) -> tuple[list[Any], list[Any]]:
  """One step of a dynamic network over flat leaves: on a selection step the network
  becomes the top ``reserve_p`` of ``scores`` (those of the leaves ``idx``); the updates of
  those leaves are zeroed outside it (kept whole while ``gathering``). Returns the updates
  and the network, leaf by leaf."""
  new_keeps = jax.lax.cond(select, lambda _: _select(scores, reserve_p, scope),
                           lambda _: [keeps[i] for i in idx], None)
  out, keep_leaves = list(leaves), list(keeps)
  for i, k in zip(idx, new_keeps):
    take = _packing.unpack_leaf(k, leaves[i].shape) | gathering
    out[i] = jnp.where(take, leaves[i], jnp.zeros_like(leaves[i]))
    keep_leaves[i] = k
  return out, keep_leaves


def _check_schedule(reserve_p: Any, every: Any, full_stage: Any, scope: str,
                    alternate: bool) -> None:
  _check_reserve_p(reserve_p)
  for name, value, low in (("every", every, 1), ("full_stage", full_stage, 0)):
    if not isinstance(value, jax.core.Tracer):
      if isinstance(value, bool) or int(value) != value or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
  if scope not in SCOPES:
    raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
  if alternate and not isinstance(full_stage, jax.core.Tracer) and full_stage < 1:
    raise ValueError("alternate=True needs full_stage >= 1 (the full-update stage's length)")


def _packed_ones(leaves: list[Any], selected: list[bool]) -> list[Any]:
  """An all-kept packed network at the selected leaves, ``MaskedNode`` elsewhere."""
  return [_packing.pack_leaf(jnp.ones(jnp.shape(x), jnp.bool_), "uint8") if take
          else optax.MaskedNode() for x, take in zip(leaves, selected)]


def child_tuning_dynamic(
    reserve_p: float | jax.Array,
    *,
    every: int | jax.Array,
    decay: float | None = 0.99,
    scope: str = "global",
    full_stage: int | jax.Array = 0,
    alternate: bool = False,
    where: _tree.Where = None,
    score_dtype: str = "float32",
) -> optax.GradientTransformation:
  r"""A child network re-selected every ``every`` steps from a running gradient score.

  Every update :math:`g_t` (the gradient, after clipping if that comes first) feeds a
  per-scalar score, the running diagonal empirical Fisher,

  .. math::
    s_t = \beta s_{t-1} + (1 - \beta) g_t^2 \quad (\texttt{decay}=\beta), \qquad
    s_t = s_{t-1} + g_t^2 \quad (\texttt{decay=None}, \text{restarted after each selection}),

  and every ``every`` steps the child network becomes :math:`\{i : s_t(i) \ge \tau\}`,
  with :math:`\tau` the ``(1 - reserve_p)`` percentile of the scores (``np.percentile``'s,
  exact on tie-free scores; ties at :math:`\tau` are all kept), over all selected leaves
  (``scope="global"``) or within each leaf (``"per_leaf"``, DPS's per-matrix choice).
  Updates outside the network are zeroed (not rescaled), as in Child-Tuning_D.

  Schedule (step :math:`t` counts from 0):

  - ``alternate=False``: the first ``full_stage`` steps update every scalar while the
    score gathers; the network is selected at :math:`t = \texttt{full\_stage} + j \cdot
    \texttt{every}` and masks that step's update and the next ``every - 1``.
  - ``alternate=True`` (DPS): stages repeat with period ``full_stage + every``: a
    full-update stage of ``full_stage`` steps, then a selection and a masked stage of
    ``every`` steps. With ``decay=None`` the score restarts with each full-update stage.

  The selection runs inside ``jit`` on the device, only on selection steps
  (``lax.cond``): an exact radix select for :math:`\tau` (3 histogram passes over the
  scores; no sort, no concatenation, no host round trip). State: the score (4 bytes a
  scalar in float32, 2 in ``bfloat16``) and the network bit-packed (1/8 byte), against
  AdamW's 8 bytes a scalar. The score is its own buffer, not Adam's second moment: Adam
  sits after the mask in the chain, sees masked (zero) gradients outside the network,
  and would rank the network's own scalars ever higher.

  Args:
    reserve_p: the fraction of selected scalars in the network, in (0, 1]. Under
      ``inject_hyperparams`` it may be traced (clipped to [0, 1]; see the source for the
      rounding bound).
    every: steps between re-selections (the length of a masked stage); at least 1.
    decay: the EMA's :math:`\beta` in [0, 1) (a traced one, under ``inject_hyperparams``, is
      not checked), or ``None`` for a plain sum since the last
      selection (since the start of the full-update stage with ``alternate``).
    scope: ``"global"`` (one threshold over all selected leaves, as Child-Tuning_D) or
      ``"per_leaf"`` (the top fraction of each leaf).
    full_stage: full-update steps before the first selection (before each, with
      ``alternate``).
    alternate: repeat the full-update stage before every selection (DPS).
    where: leaves that take part (a path predicate or a static bool pytree, e.g.
      :func:`childtune_jax.is_encoder_layer`); others pass through unchanged and always
      train.
    score_dtype: ``"float32"`` (default) or ``"bfloat16"`` for the score buffer.

  Under ``optax.inject_hyperparams``, pass the non-numeric options as static:
  ``inject_hyperparams(child_tuning_dynamic, static_args=("decay", "scope", "where",
  "score_dtype"))(reserve_p=0.3, every=100)`` makes ``reserve_p``, ``every`` and
  ``full_stage`` hyperparameters that change without recompiling.

  Returns:
    An ``optax.GradientTransformation`` whose state is a :class:`ChildTuningDynamicState`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> from childtune_jax import child_tuning_dynamic
    >>> tx = child_tuning_dynamic(0.5, every=10)  # selects at steps 0, 10, 20, ...
    >>> grads = {"w": jnp.array([0.1, 0.4, 0.2, 0.3])}
    >>> masked, state = tx.update(grads, tx.init(grads))
    >>> (masked["w"] != 0).tolist()
    [False, True, False, True]
    >>> full = optax.chain(optax.clip_by_global_norm(1.0),
    ...                    child_tuning_dynamic(0.3, every=100, full_stage=100),
    ...                    optax.adamw(1e-4))

  References:
    Xu et al, `Raise a Child in Large Language Model: Towards Effective and
    Generalizable Fine-tuning <https://arxiv.org/abs/2109.05687>`_, EMNLP 2021

    Zhang et al, `Fine-Tuning Pre-Trained Language Models Effectively by Optimizing
    Subnetworks Adaptively <https://arxiv.org/abs/2211.01642>`_, NeurIPS 2022
  """
  _check_schedule(reserve_p, every, full_stage, scope, alternate)
  if decay is not None and not isinstance(decay, jax.core.Tracer) and not 0.0 <= decay < 1.0:
    raise ValueError(f"decay must be in [0, 1) or None, got {decay!r}")
  if isinstance(score_dtype, jax.Array) or jnp.dtype(score_dtype) not in (
      jnp.float32, jnp.bfloat16, jnp.float16):
    raise ValueError("score_dtype must be float32, bfloat16 or float16 (static under "
                     f"inject_hyperparams), got {score_dtype!r}")
  score_dtype = jnp.dtype(score_dtype)

  def init_fn(params: optax.Params) -> ChildTuningDynamicState:
    params = _tree.unbox(params)  # nnx.Optimizer passes nnx.Variables
    leaves, treedef = jax.tree_util.tree_flatten(params)
    selected = _tree.resolve_where(where, params)
    if not any(selected):
      raise ValueError("child_tuning_dynamic: where selects no leaf")
    score = [jnp.zeros(jnp.shape(x), score_dtype) if take else optax.MaskedNode()
             for x, take in zip(leaves, selected)]
    keep = _packed_ones(leaves, selected)
    return ChildTuningDynamicState(
        count=jnp.zeros([], jnp.int32), score=jax.tree_util.tree_unflatten(treedef, score),
        keep=jax.tree_util.tree_unflatten(treedef, keep))

  def update_fn(
      updates: optax.Updates, state: ChildTuningDynamicState, params: optax.Params | None = None
  ) -> tuple[optax.Updates, ChildTuningDynamicState]:
    del params
    leaves, treedef = jax.tree_util.tree_flatten(updates)
    selected = _tree.resolve_where(where, updates)
    scores = treedef.flatten_up_to(state.score)
    keeps = treedef.flatten_up_to(state.keep)
    idx = [i for i, take in enumerate(selected) if take]

    gathering, select, restart = _stages(state.count, every, full_stage, alternate)

    new_scores = []
    for i in idx:
      g2 = jnp.square(leaves[i].astype(jnp.float32))
      s = scores[i].astype(jnp.float32)
      if decay is None:
        s = jnp.where(restart, 0.0, s) + g2
      else:
        s = decay * s + (1.0 - decay) * g2
      new_scores.append(s.astype(score_dtype))

    out, keep_leaves = _network_step(leaves, keeps, idx, new_scores, select, gathering,
                                     reserve_p, scope)
    score_leaves = list(scores)
    for i, s in zip(idx, new_scores):
      score_leaves[i] = s
    new_state = ChildTuningDynamicState(
        count=optax.safe_int32_increment(state.count),
        score=jax.tree_util.tree_unflatten(treedef, score_leaves),
        keep=jax.tree_util.tree_unflatten(treedef, keep_leaves))
    return jax.tree_util.tree_unflatten(treedef, out), new_state

  return optax.GradientTransformation(init_fn, update_fn)


class DynamicAdamState(NamedTuple):
  """State of :func:`scale_by_dynamic_adam`.

  Attributes:
    adam: Adam's state over the full (unmasked) updates: its ``count`` is the step, its
      ``nu`` the score.
    keep: the current child network, as in :class:`ChildTuningDynamicState`.
  """

  adam: optax.ScaleByAdamState
  keep: optax.Updates


def scale_by_dynamic_adam(
    reserve_p: float | jax.Array,
    *,
    every: int | jax.Array,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    scope: str = "global",
    full_stage: int | jax.Array = 0,
    alternate: bool = False,
    where: _tree.Where = None,
) -> optax.GradientTransformation:
  r"""Adam's scaling, its updates masked to a child network chosen by its second moment.

  A dynamic child network with no score buffer: Adam's moments see every gradient, and
  Adam's own second moment :math:`v_t = \beta_2 v_{t-1} + (1 - \beta_2) g_t^2`, the running
  diagonal empirical Fisher with decay ``b2``, is the score. Every ``every`` steps the
  network becomes the top ``reserve_p`` of :math:`v_t` (exactly as
  :func:`child_tuning_dynamic` selects, same schedule and ``scope``), and Adam's update
  :math:`\hat m_t / (\sqrt{\hat v_t} + \epsilon)` is zeroed outside it.

  Not the same method as ``chain(child_tuning_dynamic(...), scale_by_adam())``, which
  masks the *gradient*: there Adam's moments see zeros outside the network, so its second
  moment would rank the current network ever higher (why that transformation keeps a
  score of its own), and a scalar that leaves the network still moves by its momentum.
  Here the *update* is masked: the score stays current for every scalar, and a scalar
  outside the network does not move. With ``b2 = 0.999`` the score remembers about 1,000
  steps (``child_tuning_dynamic``'s default EMA, 0.99, about 100).

  Memory: Adam's two moments and the network packed one bit a scalar, nothing more
  (``child_tuning_dynamic`` adds 4 bytes a scalar of float32 score).

  Args:
    reserve_p: the fraction of selected scalars in the network, in (0, 1].
    every: steps between re-selections; at least 1.
    b1, b2, eps, eps_root: Adam's, as in ``optax.scale_by_adam``.
    scope: ``"global"`` or ``"per_leaf"`` (see :func:`child_tuning_dynamic`).
    full_stage: full-update steps before the first selection (before each, with
      ``alternate``).
    alternate: repeat the full-update stage before every selection.
    where: leaves that take part; others get Adam's update unmasked.

  Returns:
    An ``optax.GradientTransformation`` whose state is a :class:`DynamicAdamState`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from childtune_jax import scale_by_dynamic_adam
    >>> tx = scale_by_dynamic_adam(0.5, every=10)
    >>> grads = {"w": jnp.array([0.1, 0.4, 0.2, 0.3])}
    >>> updates, state = tx.update(grads, tx.init(grads))
    >>> (updates["w"] != 0).tolist()
    [False, True, False, True]

  References:
    Xu et al, `Raise a Child in Large Language Model: Towards Effective and
    Generalizable Fine-tuning <https://arxiv.org/abs/2109.05687>`_, EMNLP 2021

    Kingma and Ba, `Adam: A Method for Stochastic Optimization
    <https://arxiv.org/abs/1412.6980>`_, ICLR 2015
  """
  _check_schedule(reserve_p, every, full_stage, scope, alternate)
  adam = optax.scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=eps_root)

  def init_fn(params: optax.Params) -> DynamicAdamState:
    params = _tree.unbox(params)  # nnx.Optimizer passes nnx.Variables
    leaves, treedef = jax.tree_util.tree_flatten(params)
    selected = _tree.resolve_where(where, params)
    if not any(selected):
      raise ValueError("scale_by_dynamic_adam: where selects no leaf")
    return DynamicAdamState(adam=adam.init(params),
                            keep=jax.tree_util.tree_unflatten(treedef,
                                                              _packed_ones(leaves, selected)))

  def update_fn(
      updates: optax.Updates, state: DynamicAdamState, params: optax.Params | None = None
  ) -> tuple[optax.Updates, DynamicAdamState]:
    gathering, select, _ = _stages(state.adam.count, every, full_stage, alternate)
    updates, adam_state = adam.update(updates, state.adam, params)
    leaves, treedef = jax.tree_util.tree_flatten(updates)
    selected = _tree.resolve_where(where, updates)
    nus = treedef.flatten_up_to(adam_state.nu)
    keeps = treedef.flatten_up_to(state.keep)
    idx = [i for i, take in enumerate(selected) if take]
    out, keep_leaves = _network_step(leaves, keeps, idx, [nus[i] for i in idx], select,
                                     gathering, reserve_p, scope)
    return jax.tree_util.tree_unflatten(treedef, out), DynamicAdamState(
        adam=adam_state, keep=jax.tree_util.tree_unflatten(treedef, keep_leaves))

  return optax.GradientTransformation(init_fn, update_fn)


def child_tuning_dynamic_adamw(
    learning_rate: optax.ScalarOrSchedule,
    reserve_p: float | jax.Array,
    *,
    every: int | jax.Array,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    weight_decay: float = 1e-4,
    mask: Any = None,
    scope: str = "global",
    full_stage: int | jax.Array = 0,
    alternate: bool = False,
    where: _tree.Where = None,
) -> optax.GradientTransformation:
  """AdamW whose update moves only a child network chosen by Adam's second moment.

  ``optax.adamw`` with :func:`scale_by_dynamic_adam` in place of ``scale_by_adam``:
  ``chain(scale_by_dynamic_adam(...), add_decayed_weights(weight_decay, mask),
  scale_by_learning_rate(learning_rate))``. Weight decay, as in every Child-Tuning
  optimizer here, applies to every decayed scalar, in the network or not.

  Args:
    learning_rate: a fixed rate or an optax schedule.
    reserve_p: the fraction of the selected scalars in the network, in (0, 1].
    every: steps between selections (counted after ``full_stage``).
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay (the second moment is the network's score).
    eps: added to the root of the bias-corrected second moment.
    eps_root: added under the root.
    weight_decay: decoupled weight decay, applied as ``optax.adamw`` applies it.
    mask: which leaves decay: a pytree of bools or a function of the params, as
      ``optax.adamw``'s ``mask``; ``None`` decays every leaf.
    scope: ``"global"``, one threshold over all selected leaves; ``"per_leaf"``, the top
      ``reserve_p`` of each leaf.
    full_stage: steps that update every scalar before the first selection.
    alternate: repeat the full stage before every selection (DPS's schedule).
    where: which leaves the network masks (a predicate on the path, or a bool pytree);
      the others are always updated.

  Returns:
    An ``optax.GradientTransformation`` whose state is ``(DynamicAdamState, ...)``; the
    network is :func:`current_keep` of its first element.

  Examples:
    >>> from childtune_jax import child_tuning_dynamic_adamw, is_encoder_layer
    >>> tx = child_tuning_dynamic_adamw(1e-4, 0.3, every=100, full_stage=100,
    ...                                 weight_decay=0.01, where=is_encoder_layer)
  """
  return optax.chain(
      scale_by_dynamic_adam(reserve_p, every=every, b1=b1, b2=b2, eps=eps, eps_root=eps_root,
                            scope=scope, full_stage=full_stage, alternate=alternate,
                            where=where),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate))


def dps(
    drop_p: float, *, stage_steps: int, where: _tree.Where = None,
    score_dtype: str = "float32",
) -> optax.GradientTransformation:
  """The DPS schedule (Zhang et al., NeurIPS 2022) as a :func:`child_tuning_dynamic`.

  Stages of ``stage_steps`` steps alternate (the paper: 5% of the training steps): a
  full-update stage sums the squared gradients, then each leaf (weight matrix) keeps
  its top ``1 - drop_p`` fraction by that sum for a masked stage.

  Args:
    drop_p: DPS's ``p``: the fraction of each matrix left *out* of the network, in
      [0, 1) (the reverse of Child-Tuning's ``reserve_p``).
    stage_steps: the length U of each stage.
    where: leaves that take part (see :func:`child_tuning_dynamic`).
    score_dtype: the score buffer's dtype.

  Returns:
    ``child_tuning_dynamic(1 - drop_p, every=stage_steps, full_stage=stage_steps,
    alternate=True, decay=None, scope="per_leaf", ...)``.
  """
  if not 0.0 <= drop_p < 1.0:
    raise ValueError(f"drop_p must be in [0, 1), got {drop_p!r}")
  return child_tuning_dynamic(1.0 - drop_p, every=stage_steps, full_stage=stage_steps,
                              alternate=True, decay=None, scope="per_leaf", where=where,
                              score_dtype=score_dtype)


def current_keep(state: ChildTuningDynamicState | DynamicAdamState,
                 like: optax.Params) -> optax.Params:
  """The child network in ``state`` as a bool pytree like ``like`` (unselected: all True).

  Before the first selection (the full-update stage) it is all ``True``.
  """
  leaves, treedef = jax.tree_util.tree_flatten(_tree.unbox(like))
  keeps = treedef.flatten_up_to(state.keep)
  out = [jnp.ones(jnp.shape(x), jnp.bool_) if isinstance(k, optax.MaskedNode)
         else _packing.unpack_leaf(k, jnp.shape(x)) for x, k in zip(leaves, keeps)]
  return jax.tree_util.tree_unflatten(treedef, out)
