"""The diagonal Fisher information that Child-Tuning_D ranks parameters by."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

try:
  from tqdm.auto import tqdm
except ImportError:  # the bare library (no extras): no progress bar
  tqdm = None

from childtune_jax.parallel import to_host

LossFn = Callable[[optax.Params, Any], jax.Array]


def _clip_per_tensor(grads: Any, max_norm: float | None) -> Any:
  """torch's ``clip_grad_norm_`` applied to each tensor on its own, as the reference."""
  if max_norm is None:
    return grads

  def clip(g: jax.Array) -> jax.Array:
    norm = jnp.sqrt(jnp.sum(jnp.square(g)))
    return g * jnp.minimum(1.0, max_norm / (norm + 1e-6))

  return jax.tree_util.tree_map(clip, grads)


def _f32_grad(loss_fn: LossFn, params: Any, batch: Any, max_norm: float | None) -> Any:
  grads = jax.grad(loss_fn)(params, batch)
  return _clip_per_tensor(jax.tree_util.tree_map(lambda g: g.astype(jnp.float32), grads), max_norm)


def _batch_size(batch: Any) -> int:
  sizes = {np.shape(x)[0] if np.ndim(x) else None for x in jax.tree_util.tree_leaves(batch)}
  if len(sizes) != 1 or None in sizes:
    raise ValueError(
        "every leaf of a batch needs the same leading batch axis, "
        f"got sizes {sorted(map(str, sizes))}"
    )
  (size,) = sizes
  return size


def _pad_to(batch: Any, size: int) -> Any:
  """Pads the batch axis to ``size`` with copies of the first example."""

  def pad(x: Any) -> Any:
    x = np.asarray(x) if not isinstance(x, jax.Array) else x
    extra = size - x.shape[0]
    if not extra:
      return x
    return jnp.concatenate([x, jnp.repeat(x[:1], extra, axis=0)], axis=0)

  return jax.tree_util.tree_map(pad, batch)


# Module-level and jitted with the loss function static, so that every call with the same
# ``loss_fn`` and shapes reuses one compiled program (a study computes many Fisher passes).
@functools.partial(jax.jit, donate_argnums=0, static_argnames=("loss_fn", "max_grad_norm"))
def _per_batch_step(acc: Any, params: Any, batch: Any, *, loss_fn: LossFn,
                    max_grad_norm: float | None) -> Any:
  grads = _f32_grad(loss_fn, params, batch, max_grad_norm)
  return jax.tree_util.tree_map(lambda a, g: a + jnp.square(g), acc, grads)


@functools.partial(jax.jit, donate_argnums=0,
                   static_argnames=("loss_fn", "max_grad_norm", "chunk"))
def _per_example_step(acc: Any, params: Any, batch: Any, weights: jax.Array, *,
                      loss_fn: LossFn, max_grad_norm: float | None, chunk: int) -> Any:
  size = weights.shape[0]

  def one(example: Any) -> Any:
    example = jax.tree_util.tree_map(lambda x: x[None], example)
    return _f32_grad(loss_fn, params, example, max_grad_norm)

  def body(acc: Any, xs: tuple[Any, jax.Array]) -> tuple[Any, None]:
    examples, w = xs
    grads = jax.vmap(one)(examples)
    return jax.tree_util.tree_map(
        lambda a, g: a + jnp.tensordot(w, jnp.square(g), axes=1), acc, grads
    ), None

  chunks = jax.tree_util.tree_map(
      lambda x: x.reshape((size // chunk, chunk) + x.shape[1:]), (batch, weights)
  )
  acc, _ = jax.lax.scan(body, acc, chunks)
  return acc


def fisher_information(
    loss_fn: LossFn,
    params: optax.Params,
    batches: Iterable[Any],
    *,
    per_example: bool = True,
    microbatch_size: int | None = None,
    max_grad_norm: float | None = None,
    weights_key: str | None = None,
    progress: bool | None = None,
) -> optax.Params:
  r"""Estimates the diagonal Fisher information of every parameter on task data.

  ``per_example=True`` is the paper's estimate, one gradient per example:

  .. math::
    F(i) = \frac{1}{|D|} \sum_{j \in D}
      \Big(\frac{\partial \mathcal{L}(\{x_j, y_j\}; w)}{\partial w(i)}\Big)^2

  computed with ``jax.vmap(jax.grad(loss_fn))``, each example fed to ``loss_fn`` as a
  batch of one. ``microbatch_size`` examples are differentiated at once (a
  ``lax.scan`` over chunks of each batch), so peak memory is about
  ``microbatch_size`` gradients whatever the batch size.

  ``per_example=False`` is the reference code's estimate: the squared gradient of
  each *batch* loss, averaged over the number of batches. With ``max_grad_norm`` each
  gradient tensor is first clipped to that norm on its own (the reference uses 1.0;
  torch's ``clip_grad_norm_`` formula); the clip applies per example when
  ``per_example=True``.

  Squares are accumulated in float32 whatever the params' dtype. Randomness such as
  dropout is up to ``loss_fn``: a deterministic ``loss_fn`` gives the Fisher of the
  model itself.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``, the mean negative log-likelihood of
      a batch (the training loss).
    params: the parameters (a pytree of arrays).
    batches: an iterable of batches, each a pytree of arrays with a leading batch axis.
      A last smaller batch is fine.
    per_example: one gradient per example (paper) or per batch (reference code).
    microbatch_size: examples differentiated at once (per-example only); default the
      whole batch. Batches are padded to a multiple of it with zero-weight copies.
    max_grad_norm: optional per-tensor gradient-norm clip before squaring.
    weights_key: with per-example Fisher and dict batches, the key of a per-example
      weight (1 for a real example, 0 for a padding row, as the CLI's batches carry):
      the Fisher averages over the real examples only, ``sum(w * g**2) / sum(w)``.
    progress: show a tqdm bar over batches (where tqdm is installed); default when stderr
      is a terminal.

  Returns:
    A float32 pytree with the params' structure.

  Raises:
    ValueError: ``batches`` is empty, a batch has inconsistent leading axes, or
      ``microbatch_size``/``max_grad_norm`` is not positive.

  References:
    Xu et al, `Raise a Child in Large Language Model: Towards Effective and
    Generalizable Fine-tuning <https://arxiv.org/abs/2109.05687>`_, EMNLP 2021
  """
  if microbatch_size is not None and (
      not isinstance(microbatch_size, (int, np.integer)) or microbatch_size < 1
  ):
    raise ValueError(f"microbatch_size must be a positive int, got {microbatch_size!r}")
  if max_grad_norm is not None and not max_grad_norm > 0:
    raise ValueError(f"max_grad_norm must be positive, got {max_grad_norm!r}")

  step = functools.partial(_per_example_step if per_example else _per_batch_step,
                           loss_fn=loss_fn, max_grad_norm=max_grad_norm)
  acc = jax.tree_util.tree_map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)
  if progress is None:
    progress = sys.stderr.isatty()
  total = len(batches) if hasattr(batches, "__len__") else None
  count = 0
  if tqdm is not None:
    batches = tqdm(batches, total=total, desc="Fisher", unit="batch", disable=not progress)
  for batch in batches:
    size = _batch_size(batch)
    if size == 0:
      continue
    if not per_example:
      acc = step(acc, params, batch)
      count += 1
      continue
    chunk = size if microbatch_size is None else microbatch_size
    padded = -(-size // chunk) * chunk
    weights = np.asarray(np.arange(padded) < size, np.float32)
    if weights_key is not None:
      given = to_host(batch[weights_key]).astype(np.float32).reshape(-1)  # all processes' rows
      if given.shape != (size,) or not np.all(np.isfinite(given)) or np.any(given < 0):
        raise ValueError(f"batch[{weights_key!r}] must hold {size} finite weights >= 0")
      weights[:size] *= given
    acc = step(acc, params, _pad_to(batch, padded), jnp.asarray(weights), chunk=chunk)
    count += float(weights.sum())
  if count == 0:
    raise ValueError("batches is empty (or all its weights are 0): the Fisher information "
                     "needs at least one example")
  return jax.tree_util.tree_map(lambda a: a / count, acc)
