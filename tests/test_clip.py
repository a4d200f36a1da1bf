"""childtune_jax.clip: tower predicates, per-tower networks, the per-pair contrastive Fisher."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from childtune_jax import child_tuning_adamw, clip
from childtune_jax._tree import leaf_paths


def _dual_encoder(seed=0):
  """A two-tower image-text model in plain JAX, its parameters named as FlaxCLIPModel's."""
  rng = np.random.default_rng(seed)

  def w(*shape):
    return jnp.asarray(rng.normal(size=shape) / np.sqrt(shape[0]), jnp.float32)

  params = {
      "vision_model": {"embeddings": {"patch_embedding": {"kernel": w(6, 8)}},
                       "encoder": {"layers": {"0": {"mlp": {"fc1": {"kernel": w(8, 8)}}},
                                              "1": {"mlp": {"fc1": {"kernel": w(8, 8)}}}}},
                       "post_layernorm": {"scale": jnp.ones(8)}},
      "text_model": {"embeddings": {"token_embedding": {"embedding": w(5, 8)}},
                     "encoder": {"layers": {"0": {"mlp": {"fc1": {"kernel": w(8, 8)}}}}},
                     "final_layer_norm": {"scale": jnp.ones(8)}},
      "visual_projection": {"kernel": w(8, 4)},
      "text_projection": {"kernel": w(8, 4)},
      "logit_scale": jnp.asarray(np.log(1 / 0.07), jnp.float32),
  }

  def embed(p, batch):
    v, t = p["vision_model"], p["text_model"]
    x = batch["pixels"] @ v["embeddings"]["patch_embedding"]["kernel"]
    for layer in v["encoder"]["layers"].values():
      x = jnp.tanh(x @ layer["mlp"]["fc1"]["kernel"])
    x = x * v["post_layernorm"]["scale"]
    y = batch["tokens"] @ t["embeddings"]["token_embedding"]["embedding"]
    for layer in t["encoder"]["layers"].values():
      y = jnp.tanh(y @ layer["mlp"]["fc1"]["kernel"])
    y = y * t["final_layer_norm"]["scale"]
    return x @ p["visual_projection"]["kernel"], y @ p["text_projection"]["kernel"], \
        p["logit_scale"]

  return params, embed


def _batch(n, seed=1):
  rng = np.random.default_rng(seed)
  return {"pixels": jnp.asarray(rng.normal(size=(n, 6)), jnp.float32),
          "tokens": jnp.asarray(rng.normal(size=(n, 5)), jnp.float32)}


def _selected(params, where):
  return [p for p in leaf_paths(params) if where(p)]


def test_towers_select_exactly_their_leaves():
  params, _ = _dual_encoder()
  assert _selected(params, clip.vision_tower) == [
      "vision_model/embeddings/patch_embedding/kernel",
      "vision_model/encoder/layers/0/mlp/fc1/kernel",
      "vision_model/encoder/layers/1/mlp/fc1/kernel", "vision_model/post_layernorm/scale"]
  assert _selected(params, clip.text_tower) == [
      "text_model/embeddings/token_embedding/embedding",
      "text_model/encoder/layers/0/mlp/fc1/kernel", "text_model/final_layer_norm/scale"]
  assert _selected(params, clip.projections) == ["text_projection/kernel",
                                                 "visual_projection/kernel"]
  assert _selected(params, clip.encoder_layers("text")) == [
      "text_model/encoder/layers/0/mlp/fc1/kernel"]
  assert len(_selected(params, clip.encoder_layers())) == 3
  with pytest.raises(ValueError, match="tower must be one of"):
    clip.encoder_layers("audio")


def _np_contrastive(img, txt, scale):
  img = img / np.linalg.norm(img, axis=1, keepdims=True)
  txt = txt / np.linalg.norm(txt, axis=1, keepdims=True)
  logits = np.exp(scale) * img @ txt.T

  def ce(z):  # rows: targets on the diagonal
    z = z - z.max(1, keepdims=True)
    return -(np.diag(z) - np.log(np.exp(z).sum(1))).mean()

  return (ce(logits) + ce(logits.T)) / 2


def test_contrastive_loss_equals_numpy():
  params, embed = _dual_encoder()
  img, txt, scale = embed(params, _batch(6))
  np.testing.assert_allclose(float(clip.contrastive_loss(img, txt, scale)),
                             _np_contrastive(np.asarray(img, np.float64),
                                             np.asarray(txt, np.float64), float(scale)),
                             rtol=1e-5)


def test_contrastive_fisher_equals_a_loop_of_grads():
  params, embed = _dual_encoder()
  batches = [_batch(5, seed=1), _batch(4, seed=2)]
  got = clip.contrastive_fisher(embed, params, batches)
  # The reference: for each pair, the whole batch through the model, every embedding but
  # pair i's own detached, and pair i's row and column cross-entropies.
  total, count = None, 0
  for batch in batches:
    n = batch["pixels"].shape[0]
    for i in range(n):
      def loss(p, batch=batch, i=i, n=n):
        img, txt, scale = embed(p, batch)
        own = (jnp.arange(n) == i)[:, None]
        img = jnp.where(own, img, jax.lax.stop_gradient(img))
        txt = jnp.where(own, txt, jax.lax.stop_gradient(txt))
        logits = jnp.exp(scale) * clip._normalize(img) @ clip._normalize(txt).T
        row = -jax.nn.log_softmax(logits[i])[i]
        col = -jax.nn.log_softmax(logits[:, i])[i]
        return (row + col) / 2
      g2 = jax.tree_util.tree_map(jnp.square, jax.grad(loss)(params))
      total = g2 if total is None else jax.tree_util.tree_map(jnp.add, total, g2)
      count += 1
  for path, a, b in zip(leaf_paths(got), jax.tree_util.tree_leaves(got),
                        jax.tree_util.tree_leaves(total)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b) / count, rtol=1e-4, atol=1e-9,
                               err_msg=path)
  # The pairs' own losses add up to the batch loss (times the batch size).
  batch = batches[0]
  img, txt, _ = embed(params, batch)
  pairs = [float(clip.pair_loss(embed, params, jax.tree_util.tree_map(lambda x, i=i: x[i:i + 1],
                                                                       batch), jnp.int32(i),
                                img, txt)) for i in range(5)]
  assert sum(pairs) == pytest.approx(5 * float(clip.contrastive_loss(*embed(params, batch))),
                                     rel=1e-5)
  with pytest.raises(ValueError, match="two or more pairs"):
    clip.contrastive_fisher(embed, params, [_batch(1)])


def test_tower_fisher_mask_keeps_each_towers_own_top_p():
  params, _ = _dual_encoder()
  rng = np.random.default_rng(3)
  fisher = jax.tree_util.tree_map(lambda x: jnp.asarray(rng.exponential(size=np.shape(x)),
                                                         jnp.float32), params)
  keep = clip.tower_fisher_mask(fisher, {"vision": 0.25, "text": 0.5})
  flat = dict(zip(leaf_paths(fisher), jax.tree_util.tree_leaves(fisher)))
  kept = dict(zip(leaf_paths(keep), jax.tree_util.tree_leaves(keep)))
  for tower, p in (("vision", 0.25), ("text", 0.5)):
    paths = _selected(params, clip.encoder_layers(tower))
    scores = np.concatenate([np.asarray(flat[k]).ravel() for k in paths])
    threshold = np.percentile(scores, (1 - p) * 100)
    for k in paths:
      np.testing.assert_array_equal(np.asarray(kept[k]), np.asarray(flat[k]) >= threshold)
  others = [k for k in kept if not clip.encoder_layers()(k)]
  assert others and all(np.asarray(kept[k]).all() for k in others)
  with pytest.raises(ValueError, match="reserve_p takes towers"):
    clip.tower_fisher_mask(fisher, {"audio": 0.3})


def _step(params, embed, tx):
  batch = _batch(6)

  def loss(p):
    return clip.contrastive_loss(*embed(p, batch))

  grads = jax.grad(loss)(params)
  updates, _ = tx.update(grads, tx.init(params), params)
  return optax.apply_updates(params, updates)


def test_d_and_f_steps_change_only_the_child_network():
  params, embed = _dual_encoder()
  fisher = clip.contrastive_fisher(embed, params, [_batch(6)])
  keep = clip.tower_fisher_mask(fisher, {"vision": 0.3, "text": 0.3})
  new = _step(params, embed, child_tuning_adamw(1e-2, mode="D", keep=keep,
                                                freeze_non_child=True))
  for path, a, b, k in zip(leaf_paths(params), jax.tree_util.tree_leaves(params),
                           jax.tree_util.tree_leaves(new), jax.tree_util.tree_leaves(keep)):
    changed = np.asarray(a) != np.asarray(b)
    assert not (changed & ~np.asarray(k)).any(), path  # nothing outside the network moves
  # F over both towers' layers: a fresh random network, about p of their scalars; the rest
  # of the model (embeddings, projections, temperature) is always trained.
  new = _step(params, embed, child_tuning_adamw(1e-2, mode="F", reserve_p=0.5, key=0,
                                                where=clip.encoder_layers(),
                                                freeze_non_child=True))
  moved = {p: np.asarray(a) != np.asarray(b) for p, a, b in zip(
      leaf_paths(params), jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(new))}
  layers = np.concatenate([moved[p].ravel() for p in moved if clip.encoder_layers()(p)])
  assert abs(layers.mean() - 0.5) < 4 * np.sqrt(0.25 / layers.size)  # 192 scalars
  assert moved["visual_projection/kernel"].all() and moved["logit_scale"].all()


def test_flax_clip_model_towers_when_transformers_has_it():
  transformers = pytest.importorskip("transformers")
  if not hasattr(transformers, "FlaxCLIPModel"):
    pytest.skip("transformers >= 5 has no FlaxCLIPModel")
  from transformers import CLIPConfig, FlaxCLIPModel

  cfg = CLIPConfig(text_config=dict(vocab_size=99, hidden_size=16, intermediate_size=32,
                                    num_hidden_layers=2, num_attention_heads=2,
                                    max_position_embeddings=16),
                   vision_config=dict(image_size=8, patch_size=4, hidden_size=16,
                                      intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2),
                   projection_dim=8)
  model = FlaxCLIPModel(cfg, seed=0)
  paths = leaf_paths(model.params)
  layers = [p for p in paths if clip.encoder_layers()(p)]
  assert len(layers) == 2 * 2 * 16  # 2 towers x 2 layers x 16 tensors
  assert all(p.startswith(("vision_model/encoder/layers/", "text_model/encoder/layers/"))
             for p in layers)
  assert {p for p in paths if clip.projections(p)} == {"visual_projection/kernel",
                                                       "text_projection/kernel"}

  def embed(p, batch):
    out = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], params=p)
    return out.image_embeds, out.text_embeds, p["logit_scale"]

  rng = np.random.default_rng(0)
  batch = {"input_ids": jnp.asarray(rng.integers(1, 99, (4, 6)), jnp.int32),
           "pixel_values": jnp.asarray(rng.normal(size=(4, 3, 8, 8)), jnp.float32)}
  fisher = clip.contrastive_fisher(embed, model.params, [batch])
  keep = clip.tower_fisher_mask(fisher, {"vision": 0.2, "text": 0.4})
  for tower, p in (("vision", 0.2), ("text", 0.4)):
    leaves = [x for path, x in zip(leaf_paths(keep), jax.tree_util.tree_leaves(keep))
              if clip.encoder_layers(tower)(path)]
    fraction = sum(int(np.sum(x)) for x in leaves) / sum(x.size for x in leaves)
    assert abs(fraction - p) < 0.01
