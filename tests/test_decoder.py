"""``childtune_jax.decoder``: causal-LM losses, the Fisher of an NNX decoder, decoder parts."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import FIXTURES
from flax import nnx

from childtune_jax import child_tuning_d, decoder, fisher_mask
from childtune_jax.models import llama

TINY_LLAMA = os.path.join(FIXTURES, "llama", "tiny-llama")


def _batch(seed=0, rows=3, length=10):
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, 96, size=(rows, length))
  mask = np.zeros((rows, length), np.int32)
  for r in range(rows):  # a prompt, then a response of a few tokens, then padding
    start, end = 3 + r, 6 + 2 * r
    mask[r, start:min(end, length)] = 1
  return jnp.asarray(ids), jnp.asarray(mask)


def test_losses_equal_a_numpy_loop():
  logits = jax.random.normal(jax.random.key(0), (3, 10, 96))
  ids, mask = _batch()
  logp = np.asarray(jax.nn.log_softmax(logits, -1), np.float64)
  want = np.zeros(3)
  for b in range(3):
    for t in range(1, 10):
      if mask[b, t]:
        want[b] -= logp[b, t - 1, ids[b, t]]
  np.testing.assert_allclose(decoder.response_nll(logits, ids, mask), want, rtol=1e-5)
  weights = jnp.array([1.0, 0.0, 1.0])  # the second row is padding
  tokens = float(mask[0].sum() + mask[2].sum()) - float(mask[0, 0] + mask[2, 0])
  np.testing.assert_allclose(decoder.causal_lm_loss(logits, ids, mask, weights),
                             (want[0] + want[2]) / tokens, rtol=1e-5)


PATHS = {  # naming: path -> the predicates that select it
    "ours": {
        "layers/self_attn/q_proj/kernel": {"attention_query", "attention", "decoder_layers",
                                           "matrices"},
        "layers/self_attn/k_proj/bias": {"attention_key", "attention", "decoder_layers"},
        "layers/self_attn/o_proj/kernel": {"attention_output", "attention", "decoder_layers",
                                           "matrices"},
        "layers/mlp/gate_proj/kernel": {"mlp", "decoder_layers", "matrices"},
        "layers/input_layernorm/scale": {"norms", "decoder_layers"},
        "norm/scale": {"norms"},
        "embed_tokens/embedding": {"embeddings"},
        "lm_head/kernel": {"lm_head"},
    },
    "hugging face": {
        "model/layers/3/self_attn/v_proj/kernel": {"attention_value", "attention",
                                                   "decoder_layers", "matrices"},
        "model/layers/3/mlp/down_proj/kernel": {"mlp", "decoder_layers", "matrices"},
        "model/layers/3/post_attention_layernorm/scale": {"norms", "decoder_layers"},
        "model/embed_tokens/embedding": {"embeddings"},
    },
    "tunix llama3": {
        "layers/0/attn/q_proj/w": {"attention_query", "attention", "decoder_layers",
                                   "matrices"},
        "layers/0/mlp/up_proj/kernel": {"mlp", "decoder_layers", "matrices"},
        "layers/0/input_layernorm/w": {"norms", "decoder_layers"},
        "embedder/input_embedding": {"embeddings"},
        "final_norm/w": {"norms"},
        "lm_head/w": {"lm_head"},
    },
    "tunix gemma": {
        "layers/1/attn/kv_einsum/w": {"attention_key", "attention_value", "attention",
                                      "decoder_layers", "matrices"},
        "layers/1/attn/attn_vec_einsum/w": {"attention_output", "attention", "decoder_layers",
                                            "matrices"},
        "layers/1/pre_ffw_norm/scale": {"norms", "decoder_layers"},
    },
    "maxtext": {
        "decoder/layers/self_attention/query/kernel": {"attention_query", "attention",
                                                       "decoder_layers", "matrices"},
        "decoder/layers/mlp/wo/kernel": {"mlp", "decoder_layers", "matrices"},
        "token_embedder/embedding": {"embeddings"},
        "decoder/logits_dense/kernel": {"lm_head"},
    },
}
PREDICATES = ("attention", "attention_key", "attention_output", "attention_query",
              "attention_value", "decoder_layers", "embeddings", "lm_head", "matrices", "mlp",
              "norms")


@pytest.mark.parametrize("naming", list(PATHS))
def test_predicates_name_decoder_parts_in_every_naming(naming):
  for path, want in PATHS[naming].items():
    got = {name for name in PREDICATES if getattr(decoder, name)(path)}
    assert got == want, (naming, path)


def _tiny():
  return llama.from_folder(TINY_LLAMA)


def _example_batches():
  ids, mask = _batch(rows=4)
  return [{"input_ids": ids, "loss_mask": mask}]


def _example_loss(model, batch):
  return jnp.sum(decoder.response_nll(model(batch["input_ids"]), batch["input_ids"],
                                      batch["loss_mask"]))


def test_nnx_fisher_is_the_mean_squared_gradient_of_each_example():
  model = _tiny()
  fisher = decoder.nnx_fisher_information(model, _example_loss, _example_batches(),
                                          microbatch_size=2)
  batch = _example_batches()[0]
  squares = []
  for i in range(4):  # a loop of nnx.grad, one example at a time
    one = jax.tree_util.tree_map(lambda x, i=i: x[i:i + 1], batch)
    grads = nnx.grad(_example_loss)(model, one)
    squares.append(jax.tree_util.tree_map(jnp.square, nnx.as_pure(nnx.state(grads, nnx.Param))))
  want = jax.tree_util.tree_map(lambda *s: sum(s) / 4, *squares)
  assert jax.tree_util.tree_structure(fisher) == jax.tree_util.tree_structure(want)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-10),
                         fisher, want)


def test_d_from_the_nnx_fisher_trains_only_its_network_under_nnx_optimizer():
  model = _tiny()
  fisher = decoder.nnx_fisher_information(model, _example_loss, _example_batches())
  keep = fisher_mask(fisher, 0.2)
  start = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  tx = optax.chain(child_tuning_d(keep), optax.adamw(1e-2, weight_decay=0.0))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, batch):
    grads = nnx.grad(lambda m: _example_loss(m, batch))(model)
    optimizer.update(model, grads)

  for _ in range(3):
    step(model, optimizer, _example_batches()[0])
  end = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  moved = jax.tree_util.tree_map(lambda a, b: np.asarray(a) != np.asarray(b), end, start)
  kept = nnx.to_pure_dict(keep)
  outside = sum(int(np.sum(m & ~np.asarray(k))) for m, k in
                zip(jax.tree_util.tree_leaves(moved), jax.tree_util.tree_leaves(kept)))
  inside = sum(int(np.sum(m)) for m in jax.tree_util.tree_leaves(moved))
  assert outside == 0 and inside > 0
