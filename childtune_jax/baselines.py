"""The baselines Child-Tuning is measured against on decoders: LoRA and Half Fine-Tuning.

- **LoRA** (Hu et al., ICLR 2022) is a parameterisation, not a transformation: each adapted
  matrix :math:`W` becomes :math:`W + \\frac{\\alpha}{r} A B`, with :math:`W` frozen and only
  the low-rank :math:`A` (``in x r``) and :math:`B` (``r x out``, zero at the start) trained.
  :func:`lora_adapters` makes them, :func:`apply_lora` merges them into the parameters
  (inside the loss: the frozen matrices get no gradient, so none is computed).
- **Half Fine-Tuning** (Hui et al., ACL 2025) freezes a random half of the parameter matrices
  and re-draws that half every stage: :func:`half_fine_tuning` zeroes the updates of the
  frozen half (place it before AdamW, and again after it for the frozen matrices not to
  move at all, as ``child_tuning_adamw(freeze_non_child=True)`` does).

Both act on "matrices": :func:`childtune_jax.decoder.matrices` by default (the attention and
MLP weight matrices). A leaf that stacks the matrices of every layer (the decoder of
:mod:`childtune_jax.models.llama`: ``layers/self_attn/q_proj/kernel`` of shape ``(layers,
in, out)``) is one matrix a layer when ``layer_axis`` says so.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from childtune_jax import _tree, decoder
from childtune_jax.transform import _canonical_key


def _selected(params: Any, where: _tree.Where, layer_axis: _tree.Where
              ) -> list[tuple[str, Any, bool]]:
  """``(path, leaf, stacked)`` of every selected leaf, in flattening order."""
  params = _tree.unbox(params)
  flags = _tree.resolve_where(where, params)
  stacked = _tree.resolve_where(layer_axis, params) if layer_axis is not None else None
  out = []
  for i, (path, leaf) in enumerate(zip(_tree.leaf_paths(params),
                                       jax.tree_util.tree_leaves(params))):
    if flags[i]:
      is_stacked = bool(stacked[i]) if stacked is not None else False
      if jnp.ndim(leaf) != 2 + is_stacked:
        raise ValueError(f"{path} has shape {jnp.shape(leaf)}: not a matrix"
                         f"{' stacked along its first axis' if is_stacked else ''}")
      out.append((path, leaf, is_stacked))
  if not out:
    raise ValueError("where selects no matrix")
  return out


def lora_adapters(key: int | jax.Array, params: optax.Params, rank: int, *,
                  where: _tree.Where = decoder.matrices,
                  layer_axis: _tree.Where = decoder.decoder_layers) -> dict[str, dict]:
  """LoRA's adapters of the selected matrices: ``{path: {"a": A, "b": B}}``.

  ``A`` (``(..., in, rank)``) is drawn as PEFT draws it (uniform in
  :math:`\\pm 1/\\sqrt{in}`), ``B`` (``(..., rank, out)``) is zero, so that the adapted model
  starts as the pretrained one. A stacked leaf (``layer_axis``) gets an adapter per layer.

  Examples:
    >>> import jax.numpy as jnp
    >>> from childtune_jax.baselines import apply_lora, lora_adapters
    >>> params = {"mlp": {"up": {"kernel": jnp.ones((4, 6))}}}
    >>> adapters = lora_adapters(0, params, 2, layer_axis=None)
    >>> adapters["mlp/up/kernel"]["a"].shape, adapters["mlp/up/kernel"]["b"].shape
    ((4, 2), (2, 6))
    >>> bool((apply_lora(params, adapters, 8.0)["mlp"]["up"]["kernel"] == 1).all())
    True
  """
  if not isinstance(rank, int) or rank < 1:
    raise ValueError(f"rank must be a positive int, got {rank!r}")
  key = _canonical_key(key)
  out = {}
  for i, (path, leaf, _) in enumerate(_selected(params, where, layer_axis)):
    lead, (n_in, n_out) = jnp.shape(leaf)[:-2], jnp.shape(leaf)[-2:]
    bound = 1.0 / jnp.sqrt(n_in)
    a = jax.random.uniform(jax.random.fold_in(key, i), (*lead, n_in, rank), jnp.float32,
                           -bound, bound)
    out[path] = {"a": a, "b": jnp.zeros((*lead, rank, n_out), jnp.float32)}
  return out


def apply_lora(params: optax.Params, adapters: dict[str, dict], scale: float) -> optax.Params:
  """``params`` with each adapted matrix ``stop_gradient(W) + scale * A @ B``
  (``scale = alpha / rank``, LoRA's standard scaling); the other leaves frozen too."""
  params = _tree.unbox(params)
  paths = _tree.leaf_paths(params)
  missing = sorted(set(adapters) - set(paths))
  if missing:
    raise ValueError(f"adapter of {missing[0]!r}, which the parameters do not have")
  leaves, treedef = jax.tree_util.tree_flatten(params)
  out = []
  for path, w in zip(paths, leaves):
    w = jax.lax.stop_gradient(w)
    if path in adapters:
      ab = adapters[path]
      w = w + (scale * jnp.matmul(ab["a"], ab["b"])).astype(w.dtype)
    out.append(w)
  return jax.tree_util.tree_unflatten(treedef, out)


class HalfFineTuningState(NamedTuple):
  """State of :func:`half_fine_tuning`.

  Attributes:
    count: updates so far; stage ``count // every`` decides which half is frozen.
    key: the base PRNG key; each stage's half comes from ``fold_in(key, stage)``.
  """

  count: jax.Array
  key: jax.Array


def frozen_half(key: jax.Array, stage: jax.Array, slots: int) -> jax.Array:
  """Which of ``slots`` matrices a stage freezes: exactly ``slots // 2``, a uniformly random
  half (bool, ``(slots,)``)."""
  order = jax.random.permutation(jax.random.fold_in(key, stage), slots)
  return order < slots // 2


def half_fine_tuning(key: int | jax.Array, *, every: int,
                     where: _tree.Where = decoder.matrices,
                     layer_axis: _tree.Where = decoder.decoder_layers
                     ) -> optax.GradientTransformation:
  """Half Fine-Tuning: zeroes the updates of a random half of the matrices, re-drawn each
  stage of ``every`` updates.

  The matrices are the selected leaves (one a layer for a stacked leaf); exactly half of
  them (rounded down) are frozen in a stage, every half equally likely; the other leaves
  pass through. The half of update ``t`` is a function of ``(key, t // every)``, so two
  copies with the same key (before and after AdamW) freeze the same half.

  Args:
    key: an int seed or a ``jax.random.key``.
    every: the stage's length in updates.
    where: the matrices (default :func:`childtune_jax.decoder.matrices`).
    layer_axis: the leaves whose first axis stacks one matrix a layer.

  Returns:
    An ``optax.GradientTransformation`` whose state is a :class:`HalfFineTuningState`.

  References:
    Hui et al, `HFT: Half Fine-Tuning for Large Language Models
    <https://arxiv.org/abs/2404.18466>`_, ACL 2025
  """
  if isinstance(every, bool) or not isinstance(every, int) or every < 1:
    raise ValueError(f"every must be a positive int, got {every!r}")
  key = _canonical_key(key)

  def init_fn(params: optax.Params) -> HalfFineTuningState:
    _selected(params, where, layer_axis)  # refuse a bad where at once
    fresh = jax.random.wrap_key_data(jnp.array(jax.random.key_data(key)),
                                     impl=jax.random.key_impl(key))
    return HalfFineTuningState(count=jnp.zeros([], jnp.int32), key=fresh)

  def update_fn(updates: optax.Updates, state: HalfFineTuningState,
                params: optax.Params | None = None) -> tuple[optax.Updates,
                                                             HalfFineTuningState]:
    del params
    selected = {p: s for p, _, s in _selected(updates, where, layer_axis)}
    paths = _tree.leaf_paths(updates)
    leaves, treedef = jax.tree_util.tree_flatten(updates)
    sizes = [jnp.shape(u)[0] if selected[p] else 1 for p, u in zip(paths, leaves)
             if p in selected]
    frozen = frozen_half(state.key, state.count // every, sum(sizes))
    out, at = [], 0
    for p, u in zip(paths, leaves):
      if p not in selected:
        out.append(u)
        continue
      n = jnp.shape(u)[0] if selected[p] else 1
      flags = frozen[at:at + n]
      at += n
      keep = ~(flags.reshape((n,) + (1,) * (u.ndim - 1)) if selected[p] else flags[0])
      out.append(jnp.where(keep, u, jnp.zeros_like(u)))
    return jax.tree_util.tree_unflatten(treedef, out), HalfFineTuningState(
        count=optax.safe_int32_increment(state.count), key=state.key)

  return optax.GradientTransformation(init_fn, update_fn)


__all__ = ["HalfFineTuningState", "apply_lora", "frozen_half", "half_fine_tuning",
           "lora_adapters"]
