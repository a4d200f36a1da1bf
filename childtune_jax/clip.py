"""Child-Tuning for CLIP-style image-text models: towers, per-tower networks, contrastive Fisher.

The transformations are model-agnostic; what a two-tower model adds is *where* the child
network lives and what "one example's gradient" means for a contrastive loss. Parameter
names follow transformers' ``FlaxCLIPModel`` (``vision_model/...``, ``text_model/...``,
``visual_projection``, ``text_projection``, ``logit_scale``); any image-text pytree named
the same way works.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from childtune_jax.masks import fisher_mask

TOWERS = {"vision": "vision_model", "text": "text_model"}
PROJECTIONS = ("visual_projection", "text_projection")


def _top(path: str) -> str:
  return path.split("/", 1)[0]


def vision_tower(path: str) -> bool:
  """Every parameter of the image encoder (``vision_model/...``)."""
  return _top(path) == TOWERS["vision"]


def text_tower(path: str) -> bool:
  """Every parameter of the text encoder (``text_model/...``)."""
  return _top(path) == TOWERS["text"]


def projections(path: str) -> bool:
  """The two projections into the shared embedding space (``visual_projection``, ...)."""
  return _top(path) in PROJECTIONS


def encoder_layers(tower: str | None = None) -> Callable[[str], bool]:
  """The transformer layers (``<tower>_model/encoder/layers/...``) of one tower or both.

  The counterpart of :func:`childtune_jax.is_encoder_layer` for CLIP: embeddings, layer
  norms outside the layers, the projections and the temperature are left out.
  """
  if tower is not None and tower not in TOWERS:
    raise ValueError(f"tower must be one of {sorted(TOWERS)} or None, got {tower!r}")
  tops = [TOWERS[tower]] if tower else list(TOWERS.values())

  def where(path: str) -> bool:
    return _top(path) in tops and "/encoder/layers/" in path

  return where


def tower_fisher_mask(fisher: optax.Params, reserve_p: dict[str, float], *,
                      layers_only: bool = True) -> optax.Params:
  """A child network chosen in each tower separately, with a tower's own ``reserve_p``.

  Args:
    fisher: Fisher information (or any score) of a CLIP-named pytree.
    reserve_p: per tower (``"vision"``, ``"text"``) the fraction of its scalars to keep;
      a tower left out is trained whole.
    layers_only: choose among each tower's transformer layers only (the rest of the tower,
      like the projections and ``logit_scale``, is always trained), as D chooses among
      BERT's encoder layers; ``False``: among all of the tower's parameters.

  Returns:
    A bool pytree for :func:`childtune_jax.child_tuning_d`: within each tower, the top
    ``reserve_p[tower]`` of its scalars by score; everything else ``True``.
  """
  unknown = sorted(set(reserve_p) - set(TOWERS))
  if unknown or not reserve_p:
    raise ValueError(f"reserve_p takes towers among {sorted(TOWERS)}, got {sorted(reserve_p)}")
  masks = []
  for tower, p in reserve_p.items():
    where = encoder_layers(tower) if layers_only else (
        vision_tower if tower == "vision" else text_tower)
    masks.append(fisher_mask(fisher, p, where=where))
  return jax.tree_util.tree_map(lambda *m: functools.reduce(jnp.logical_and, m), *masks)


def _normalize(x: jax.Array) -> jax.Array:
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def contrastive_loss(image_embeds: jax.Array, text_embeds: jax.Array,
                     logit_scale: jax.Array) -> jax.Array:
  """CLIP's loss: the mean of the image-to-text and text-to-image cross-entropies.

  Embeddings are L2-normalised; the logits are ``exp(logit_scale) * images @ texts.T`` and
  pair ``i``'s target is ``i`` in both directions.
  """
  logits = jnp.exp(logit_scale) * _normalize(image_embeds) @ _normalize(text_embeds).T
  labels = jnp.arange(logits.shape[0])
  rows = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  cols = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels)
  return (rows.mean() + cols.mean()) / 2


EmbedFn = Callable[[Any, Any], tuple[jax.Array, jax.Array, jax.Array]]


def pair_loss(embed_fn: EmbedFn, params: Any, batch: Any, index: jax.Array,
              images: jax.Array, texts: jax.Array) -> jax.Array:
  """Pair ``index``'s own part of the contrastive loss, the rest of the batch held fixed.

  ``(row_i + col_i) / 2``: pair ``i``'s image-to-text and text-to-image cross-entropies in
  the batch's logits, where only pair ``i``'s image and text embeddings come from
  ``params`` (``embed_fn`` applied to the one pair in ``batch``); the other pairs'
  embeddings are ``images`` and ``texts``, constants. Summed over the pairs, these are the
  batch loss's value (times the batch size); their gradients leave out what pair ``i``'s
  embeddings do to the *other* pairs' terms.
  """
  image, text, scale = embed_fn(params, batch)
  images = images.at[index].set(image[0])
  texts = texts.at[index].set(text[0])
  logits = jnp.exp(scale) * _normalize(images) @ _normalize(texts).T
  row = optax.softmax_cross_entropy_with_integer_labels(logits[index], index)
  col = optax.softmax_cross_entropy_with_integer_labels(logits[:, index], index)
  return (row + col) / 2


@functools.partial(jax.jit, static_argnames=("embed_fn",))
def _pair_fisher_sum(embed_fn: EmbedFn, params: Any, batch: Any) -> Any:
  images, texts, _ = jax.lax.stop_gradient(embed_fn(params, batch))

  def one(index: jax.Array, example: Any) -> Any:
    example = jax.tree_util.tree_map(lambda x: x[None], example)
    grads = jax.grad(pair_loss, argnums=1)(embed_fn, params, example, index, images, texts)
    return jax.tree_util.tree_map(lambda g: jnp.square(g.astype(jnp.float32)), grads)

  def body(acc: Any, xs: tuple[jax.Array, Any]) -> tuple[Any, None]:
    return jax.tree_util.tree_map(jnp.add, acc, one(*xs)), None

  acc = jax.tree_util.tree_map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)
  n = images.shape[0]
  acc, _ = jax.lax.scan(body, acc, (jnp.arange(n), batch))
  return acc


def contrastive_fisher(embed_fn: EmbedFn, params: optax.Params, batches: Any) -> optax.Params:
  r"""The per-pair diagonal Fisher information of CLIP's contrastive loss.

  A pair's loss depends on the rest of its batch, so "one example's gradient" needs a
  definition; here it is the gradient of :func:`pair_loss`: pair :math:`i`'s own row and
  column terms, with the batch's other embeddings held fixed. The Fisher is the mean over
  all pairs of all batches of its square, in float32, one pair at a time (``lax.scan``).

  Args:
    embed_fn: ``embed_fn(params, batch) -> (image_embeds, text_embeds, logit_scale)`` for a
      batch of pairs (leading axis: the pairs), e.g. a ``FlaxCLIPModel``'s ``image_embeds``,
      ``text_embeds`` and its ``logit_scale`` parameter. Jitted with it as a static
      argument: pass the same function each time to compile once.
    params: the parameters.
    batches: an iterable of batches of pairs, two or more pairs each.

  Returns:
    A float32 pytree of ``params``' structure, for :func:`tower_fisher_mask` or
    :func:`childtune_jax.fisher_mask`.
  """
  acc, count = None, 0
  for batch in batches:
    sizes = {x.shape[0] for x in jax.tree_util.tree_leaves(batch)}
    if len(sizes) != 1 or min(sizes) < 2:
      raise ValueError(f"each batch needs one leading axis of two or more pairs, got {sizes}")
    part = _pair_fisher_sum(embed_fn, params, batch)
    acc = part if acc is None else jax.tree_util.tree_map(jnp.add, acc, part)
    count += sizes.pop()
  if acc is None:
    raise ValueError("batches is empty: the Fisher information needs at least one batch")
  return jax.tree_util.tree_map(lambda a: a / count, acc)


__all__ = ["PROJECTIONS", "TOWERS", "contrastive_fisher", "contrastive_loss", "encoder_layers",
           "pair_loss", "projections", "text_tower", "tower_fisher_mask", "vision_tower"]
