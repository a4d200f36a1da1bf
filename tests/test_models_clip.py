"""The NNX CLIP against golden outputs of transformers' PyTorch ``CLIPModel``, and its checkpoints.

The fixture (``tests/fixtures/clip``) was written by its ``make_golden.py`` with torch 2.14.1
and transformers 5.25.0; these tests need neither.
"""

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from childtune_jax import child_tuning_adamw, clip
from childtune_jax._tree import leaf_paths, resolve_where
from childtune_jax.models import CheckpointKeyError, ConfigError, read_safetensors
from childtune_jax.models.clip import (
    ClipConfig,
    ClipModel,
    clip_from_pretrained,
    clip_to_pytorch_layout,
    normalise_images,
    save_clip,
)

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "clip")


@pytest.fixture(scope="module")
def golden():
  with np.load(os.path.join(FIXTURE, "golden.npz")) as f:
    return dict(f)


def _logits_per_image(image, text, scale):
  image = image / np.linalg.norm(image, axis=-1, keepdims=True)
  text = text / np.linalg.norm(text, axis=-1, keepdims=True)
  return np.exp(scale) * image @ text.T


def test_embeddings_and_logits_equal_transformers_pytorch(golden):
  model = clip_from_pretrained(FIXTURE)
  image, text, scale = jax.jit(lambda m, *a: m(*a))(
      model, golden["input_ids"], golden["pixel_values"], golden["attention_mask"])
  np.testing.assert_allclose(np.asarray(image), golden["image_features"], atol=1e-5, rtol=0)
  np.testing.assert_allclose(np.asarray(text), golden["text_features"], atol=1e-5, rtol=0)
  np.testing.assert_allclose(float(scale), golden["logit_scale"], rtol=1e-7)
  np.testing.assert_allclose(_logits_per_image(np.asarray(image), np.asarray(text), float(scale)),
                             golden["logits_per_image"], atol=1e-4, rtol=1e-5)
  # the padded captions' end tokens are pooled: padding after them changes nothing
  ids = np.pad(golden["input_ids"], ((0, 0), (0, 4)))
  mask = np.pad(golden["attention_mask"], ((0, 0), (0, 4)))
  np.testing.assert_allclose(np.asarray(model.text_features(ids, mask)), golden["text_features"],
                             atol=1e-5, rtol=0)


def test_the_original_checkpoints_pool_the_top_id(golden):
  """``eos_token_id == 2`` (openai's configs): the end token is the row's largest id."""
  config = ClipConfig.from_file(os.path.join(FIXTURE, "config.json"))
  legacy = ClipModel(dataclasses.replace(
      config, text=dataclasses.replace(config.text, eos_token_id=2)), rngs=nnx.Rngs(0))
  nnx.update(legacy, nnx.state(clip_from_pretrained(FIXTURE), nnx.Param))
  ids, mask = golden["input_ids"], golden["attention_mask"]
  assert (ids.argmax(-1) == (ids == 98).argmax(-1)).all()  # the fixture's end token, 98, is top
  np.testing.assert_allclose(np.asarray(legacy.text_features(ids, mask)),
                             golden["text_features"], atol=1e-5, rtol=0)
  shifted = np.where(ids == 98, 0, ids)  # no end token: the top id is pooled instead
  assert not np.allclose(np.asarray(legacy.text_features(shifted, mask)),
                         golden["text_features"], atol=1e-3)


def test_parameters_are_named_as_flax_clip_so_the_tower_predicates_apply():
  params = nnx.to_pure_dict(nnx.state(clip_from_pretrained(FIXTURE), nnx.Param))
  paths = leaf_paths(params)
  vision = [p for p, take in zip(paths, resolve_where(clip.vision_tower, params)) if take]
  assert vision and all(p.startswith("vision_model/") for p in vision)
  layers = [p for p, take in zip(paths, resolve_where(clip.encoder_layers("text"), params))
            if take]
  assert "text_model/encoder/layers/1/self_attn/q_proj/kernel" in layers
  assert len(layers) == 2 * 16  # 2 layers: 4 projections, 2 norms, 2 dense, weights and biases
  shapes = dict(zip(paths, (np.shape(x) for x in jax.tree_util.tree_leaves(params))))
  assert shapes["vision_model/embeddings/patch_embedding/kernel"] == (8, 8, 3, 32)


def test_save_then_load_is_bitwise_with_the_checkpoints_keys_and_shapes(tmp_path):
  model = clip_from_pretrained(FIXTURE)
  with open(os.path.join(FIXTURE, "config.json")) as f:
    config = json.load(f)
  save_clip(model, str(tmp_path), config)
  original, saved = read_safetensors(FIXTURE), read_safetensors(str(tmp_path))
  assert {k: v.shape for k, v in saved.items()} == {
      k: v.shape for k, v in original.items() if not k.endswith("position_ids")}
  for k, v in saved.items():
    np.testing.assert_array_equal(v, original[k])
  again = clip_from_pretrained(str(tmp_path))
  for a, b in zip(jax.tree_util.tree_leaves(nnx.state(model)),
                  jax.tree_util.tree_leaves(nnx.state(again))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert set(clip_to_pytorch_layout(model)) == set(saved)


def test_loader_and_config_errors_name_the_problem(tmp_path):
  tensors = read_safetensors(FIXTURE)
  from safetensors.numpy import save_file

  def folder(name, tensors, config=None):
    path = tmp_path / name
    path.mkdir()
    shutil.copy(os.path.join(FIXTURE, "config.json"), path / "config.json")
    if config is not None:
      (path / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(path / "model.safetensors"))
    return str(path)

  key = "text_model.final_layer_norm.weight"
  with pytest.raises(CheckpointKeyError, match="lacks text_model/final_layer_norm/scale"):
    clip_from_pretrained(folder("missing", {k: v for k, v in tensors.items() if k != key}))
  with pytest.raises(CheckpointKeyError, match="unexpected key 'extra.weight'"):
    clip_from_pretrained(folder("extra", {**tensors, "extra.weight": np.zeros(3, np.float32)}))
  with pytest.raises(CheckpointKeyError, match=f"'{key}' does not fit"):
    clip_from_pretrained(folder("shape", {**tensors, key: np.zeros(5, np.float32)}))
  with open(os.path.join(FIXTURE, "config.json")) as f:
    config = json.load(f)
  with pytest.raises(ConfigError, match="is not a CLIP"):
    clip_from_pretrained(folder("bert", tensors, {**config, "model_type": "bert"}))
  bad = {**config, "vision_config": {**config["vision_config"], "hidden_act": "swish"}}
  with pytest.raises(ConfigError, match="hidden_act 'swish'"):
    clip_from_pretrained(folder("act", tensors, bad))
  # an older checkpoint's <tower>_config_dict is read as its <tower>_config
  older = {k: v for k, v in config.items() if k != "text_config"}
  older["text_config_dict"] = config["text_config"]
  assert ClipConfig.from_dict(older) == ClipConfig.from_dict(config)


def test_a_d_step_of_the_clip_changes_only_its_child_network(golden):
  """Child-Tuning_D on the NNX CLIP: each tower's top 30% by the per-pair Fisher move."""
  graphdef, state = nnx.split(clip_from_pretrained(FIXTURE))
  params = nnx.to_pure_dict(state)

  def embed(p, batch):
    return nnx.merge(graphdef, p)(batch["input_ids"], batch["pixel_values"],
                                  batch["attention_mask"])

  batch = {k: jnp.asarray(golden[k]) for k in ("input_ids", "pixel_values", "attention_mask")}
  fisher = clip.contrastive_fisher(embed, params, [batch])
  keep = clip.tower_fisher_mask(fisher, {"vision": 0.3, "text": 0.3})
  tx = child_tuning_adamw(1e-2, mode="D", keep=keep, freeze_non_child=True)
  loss = jax.jit(lambda p: clip.contrastive_loss(*embed(p, batch)))

  @jax.jit
  def step(p, state):
    updates, _ = tx.update(jax.grad(loss)(p), state, p)
    return optax.apply_updates(p, updates)

  new = step(params, tx.init(params))
  for before, after, k in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(new),
                              jax.tree_util.tree_leaves(keep)):
    moved = np.asarray(before) != np.asarray(after)
    assert not (moved & ~np.asarray(k)).any()
  assert float(loss(new)) < float(loss(params))


def test_images_are_resized_three_channel_and_normalised():
  grey = np.random.default_rng(0).random((2, 8, 8)).astype(np.float32)
  x = normalise_images(grey, 16)
  assert x.shape == (2, 3, 16, 16) and x.dtype == np.float32
  mean, std = np.array([0.48145466, 0.4578275, 0.40821073]), np.array([0.26862954, 0.26130258,
                                                                      0.27577711])
  back = x.transpose(0, 2, 3, 1) * std + mean  # every channel is the same grey image
  np.testing.assert_allclose(back[..., 0], back[..., 2], atol=1e-6)
  resized = np.asarray(jax.image.resize(jnp.asarray(grey), (2, 16, 16), "bicubic")).clip(0, 1)
  np.testing.assert_allclose(back[..., 0], resized, atol=1e-6)
