"""LoRA and Half Fine-Tuning (``childtune_jax.baselines``): their contracts, checked by hand.

LoRA changes only its adapters (the pretrained matrices never move, and the merged one is
``W + s A B`` exactly); HFT's frozen half does not move, is exactly half of the matrices
(a layer at a time for stacked leaves), and is re-drawn each stage.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from childtune_jax.baselines import apply_lora, half_fine_tuning, lora_adapters


def _params(seed=0):
  rng = np.random.default_rng(seed)
  f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)  # noqa: E731
  return {"layers": {"self_attn": {"q_proj": {"kernel": f(3, 5, 4), "bias": f(3, 4)}},
                     "mlp": {"up_proj": {"kernel": f(3, 5, 6)}},
                     "input_layernorm": {"scale": f(3, 5)}},
          "embed_tokens": {"embedding": f(7, 5)}}


def _loss(params, x):
  h = x @ params["layers"]["self_attn"]["q_proj"]["kernel"][0]
  g = x @ params["layers"]["mlp"]["up_proj"]["kernel"][2]
  return jnp.sum(jnp.tanh(h) ** 2) + jnp.sum(g ** 2) + jnp.sum(params["embed_tokens"]
                                                                 ["embedding"] ** 2)


def test_lora_starts_at_the_pretrained_model_and_trains_only_its_adapters():
  params = _params()
  adapters = lora_adapters(0, params, 2)
  assert set(adapters) == {"layers/self_attn/q_proj/kernel", "layers/mlp/up_proj/kernel"}
  assert adapters["layers/mlp/up_proj/kernel"]["a"].shape == (3, 5, 2)
  assert adapters["layers/mlp/up_proj/kernel"]["b"].shape == (3, 2, 6)
  merged = apply_lora(params, adapters, 4.0)
  jax.tree_util.tree_map(np.testing.assert_array_equal, merged, params)  # B = 0
  x = jnp.ones((2, 5))
  tree = {"base": params, "lora": adapters}
  grads = jax.grad(lambda t: _loss(apply_lora(t["base"], t["lora"], 4.0), x))(tree)
  assert all(not np.any(np.asarray(g)) for g in jax.tree_util.tree_leaves(grads["base"]))
  tx = optax.multi_transform({"base": optax.set_to_zero(), "lora": optax.adamw(1e-2)},
                             {"base": "base", "lora": "lora"})
  state = tx.init(tree)
  for _ in range(3):
    grads = jax.grad(lambda t: _loss(apply_lora(t["base"], t["lora"], 4.0), x))(tree)
    updates, state = tx.update(grads, state, tree)
    tree = optax.apply_updates(tree, updates)
  jax.tree_util.tree_map(np.testing.assert_array_equal, tree["base"], params)
  ab = tree["lora"]["layers/mlp/up_proj/kernel"]
  want = np.asarray(params["layers"]["mlp"]["up_proj"]["kernel"]) + 4.0 * np.einsum(
      "lir,lro->lio", np.asarray(ab["a"], np.float64), np.asarray(ab["b"], np.float64))
  got = apply_lora(tree["base"], tree["lora"], 4.0)["layers"]["mlp"]["up_proj"]["kernel"]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert np.any(np.asarray(got) != np.asarray(params["layers"]["mlp"]["up_proj"]["kernel"]))
  with pytest.raises(ValueError, match="not a matrix"):
    lora_adapters(0, {"w": jnp.ones((2, 3, 4))}, 2, where=None, layer_axis=None)


def test_hft_freezes_exactly_half_of_the_matrices_a_layer_at_a_time_per_stage():
  params = _params()
  tx = half_fine_tuning(3, every=2)
  state = tx.init(params)
  update = jax.jit(tx.update)
  ones = jax.tree_util.tree_map(jnp.ones_like, params)
  halves = []
  for _ in range(6):
    out, state = update(ones, state)
    q = np.asarray(out["layers"]["self_attn"]["q_proj"]["kernel"])
    up = np.asarray(out["layers"]["mlp"]["up_proj"]["kernel"])
    # whole layers of a stacked leaf: every scalar of a layer's matrix moves, or none
    for m in (q, up):
      assert all(np.all(layer == layer.flat[0]) for layer in m)
    flags = [bool(m[i].flat[0]) for m in (q, up) for i in range(3)]
    assert sum(flags) == 3  # 6 matrices (2 leaves x 3 layers): exactly 3 frozen
    halves.append(tuple(flags))
    # the rest passes through: biases, norms, embeddings
    for leaf in (out["layers"]["self_attn"]["q_proj"]["bias"],
                 out["layers"]["input_layernorm"]["scale"], out["embed_tokens"]["embedding"]):
      assert np.all(np.asarray(leaf) == 1)
  assert halves[0] == halves[1] and halves[2] == halves[3] and halves[4] == halves[5]
  assert len({halves[0], halves[2], halves[4]}) > 1  # re-drawn by stage (seed 3)
  assert update._cache_size() == 1


def test_hft_around_adamw_leaves_the_frozen_half_where_it_was():
  """With weight decay every matrix left free moves; the frozen half does not, at all."""
  params = _params()
  hft = lambda: half_fine_tuning(5, every=100)  # noqa: E731
  probe = hft()
  flags, _ = probe.update(jax.tree_util.tree_map(jnp.ones_like, params), probe.init(params))
  tx = optax.chain(hft(), optax.adamw(1e-2, weight_decay=0.1), hft())
  state = tx.init(params)
  x = jnp.ones((2, 5))
  p = params
  for _ in range(3):
    updates, state = tx.update(jax.grad(_loss)(p, x), state, p)
    p = optax.apply_updates(p, updates)
  for name, leaf in (("self_attn", "q_proj"), ("mlp", "up_proj")):
    before = np.asarray(params["layers"][name][leaf]["kernel"])
    after = np.asarray(p["layers"][name][leaf]["kernel"])
    free = np.asarray(flags["layers"][name][leaf]["kernel"])[:, 0, 0] == 1
    moved = np.array([not np.array_equal(a, b) for a, b in zip(after, before)])
    np.testing.assert_array_equal(moved, free)
  with pytest.raises(ValueError, match="every"):
    half_fine_tuning(0, every=0)
