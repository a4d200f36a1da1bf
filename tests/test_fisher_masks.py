"""Fisher information and top-p masks against Python loops and np.percentile."""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from childtune_jax import (
  fisher_information,
  fisher_mask,
  is_encoder_layer,
  jaccard,
  kept_fraction,
  random_keep,
)


class _Classifier(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.tanh(nn.Dense(6, name="layer_0")(x))
    return nn.Dense(3, name="classifier")(h)


def _setup(n=11, seed=0):
  rng = np.random.default_rng(seed)
  model = _Classifier()
  x = rng.normal(size=(n, 4)).astype(np.float32)
  y = rng.integers(0, 3, size=n).astype(np.int32)
  params = model.init(jax.random.key(seed), x)["params"]

  def loss_fn(params, batch):
    logits = model.apply({"params": params}, batch["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

  return loss_fn, params, x, y


def _batches(x, y, size):
  return [{"x": x[i:i + size], "y": y[i:i + size]} for i in range(0, len(x), size)]


def _loop_fisher(loss_fn, params, x, y, max_norm=None):
  """The paper's formula with a Python loop of jax.grad over single examples."""
  total = jax.tree_util.tree_map(lambda p: np.zeros(p.shape, np.float64), params)
  for i in range(len(x)):
    g = jax.grad(loss_fn)(params, {"x": x[i:i + 1], "y": y[i:i + 1]})
    g = jax.tree_util.tree_map(lambda a: _np_clip(np.asarray(a, np.float64), max_norm), g)
    total = jax.tree_util.tree_map(lambda t, a: t + a * a, total, g)
  return jax.tree_util.tree_map(lambda t: t / len(x), total)


def _np_clip(g, max_norm):
  if max_norm is None:
    return g
  return g * min(1.0, max_norm / (np.linalg.norm(g) + 1e-6))


@pytest.mark.parametrize("batch_size,microbatch_size", [(4, None), (4, 3), (11, 2), (5, 1)])
def test_per_example_fisher_equals_loop(batch_size, microbatch_size):
  loss_fn, params, x, y = _setup()
  got = fisher_information(loss_fn, params, _batches(x, y, batch_size),
                           microbatch_size=microbatch_size, progress=False)
  want = _loop_fisher(loss_fn, params, x, y)
  for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    assert g.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(g), w, rtol=2e-5, atol=1e-9)


def test_second_fisher_pass_compiles_nothing():
  from childtune_jax import fisher

  loss_fn, params, x, y = _setup()
  fisher_information(loss_fn, params, _batches(x, y, 4), microbatch_size=2, progress=False)
  before = fisher._per_example_step._cache_size()
  again = fisher_information(loss_fn, params, _batches(x, y, 4), microbatch_size=2,
                             progress=False)
  assert fisher._per_example_step._cache_size() == before
  want = _loop_fisher(loss_fn, params, x, y)
  for g, v in zip(jax.tree_util.tree_leaves(again), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(np.asarray(g), v, rtol=2e-5, atol=1e-9)


def test_padding_rows_of_weight_zero_are_not_counted():
  # 11 real examples padded to 15 rows: the Fisher of the 11, not 11/15 of it.
  loss_fn, params, x, y = _setup()
  pad = 4
  xp = np.concatenate([x, np.repeat(x[:1], pad, 0)])
  yp = np.concatenate([y, np.repeat(y[:1], pad, 0)])
  w = (np.arange(len(xp)) < len(x)).astype(np.float32)
  batches = [{"x": xp[i:i + 5], "y": yp[i:i + 5], "w": w[i:i + 5]} for i in range(0, 15, 5)]

  def loss(params, batch):
    return loss_fn(params, {"x": batch["x"], "y": batch["y"]})

  got = fisher_information(loss, params, batches, microbatch_size=2, weights_key="w",
                           progress=False)
  want = _loop_fisher(loss_fn, params, x, y)
  for g, v in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(np.asarray(g), v, rtol=2e-5, atol=1e-9)
  empty = {"x": np.zeros((0, 4), np.float32), "y": np.zeros((0,), np.int32)}
  got = fisher_information(loss_fn, params, [empty, *_batches(x, y, 4)], progress=False)
  for g, v in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(np.asarray(g), v, rtol=2e-5, atol=1e-9)
  with pytest.raises(ValueError, match="all its weights are 0"):
    fisher_information(loss, params, [{**batches[0], "w": np.zeros(5, np.float32)}],
                       weights_key="w", progress=False)


def test_per_example_fisher_with_clip_equals_loop():
  loss_fn, params, x, y = _setup()
  got = fisher_information(loss_fn, params, _batches(x, y, 4), max_grad_norm=0.05, progress=False)
  want = _loop_fisher(loss_fn, params, x, y, max_norm=0.05)
  for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(np.asarray(g), w, rtol=2e-5, atol=1e-9)


@pytest.mark.parametrize("max_norm", [None, 0.05])
def test_per_batch_fisher_equals_formula(max_norm):
  loss_fn, params, x, y = _setup()
  batches = _batches(x, y, 4)
  got = fisher_information(loss_fn, params, batches, per_example=False, max_grad_norm=max_norm,
                           progress=False)
  want = jax.tree_util.tree_map(lambda p: np.zeros(p.shape, np.float64), params)
  for b in batches:
    g = jax.grad(loss_fn)(params, b)
    want = jax.tree_util.tree_map(
        lambda t, a: t + _np_clip(np.asarray(a, np.float64), max_norm) ** 2, want, g)
  for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(np.asarray(g), w / len(batches), rtol=2e-5, atol=1e-9)


def test_fisher_bad_input():
  loss_fn, params, x, y = _setup()
  with pytest.raises(ValueError, match="batches is empty"):
    fisher_information(loss_fn, params, [], progress=False)
  with pytest.raises(ValueError, match="batches is empty"):
    fisher_information(loss_fn, params, iter([]), per_example=False, progress=False)
  with pytest.raises(ValueError, match="microbatch_size"):
    fisher_information(loss_fn, params, _batches(x, y, 4), microbatch_size=0)
  with pytest.raises(ValueError, match="max_grad_norm"):
    fisher_information(loss_fn, params, _batches(x, y, 4), max_grad_norm=-1.0)
  with pytest.raises(ValueError, match="leading batch axis"):
    fisher_information(loss_fn, params, [{"x": x[:4], "y": y[:3]}], progress=False)


def _random_tree(seed, shapes):
  rng = np.random.default_rng(seed)
  return {name: jnp.asarray(rng.exponential(size=s), jnp.float32) for name, s in shapes.items()}


@pytest.mark.parametrize("reserve_p", [0.05, 0.1, 0.2, 0.3, 0.37, 0.5, 0.9, 1.0])
def test_fisher_mask_matches_np_percentile(reserve_p):
  _check_against_percentile(reserve_p)


def test_keep_count_uses_numpys_linear_index_exactly():
  # (n - 1) * q, not n * q - q: they round differently for e.g. n = 6, p = 0.2.
  from childtune_jax.masks import _percentile_keep_count

  for n in range(1, 400):
    scores = np.random.default_rng(n).permutation(n).astype(np.float32)
    for p in (0.1, 0.2, 0.3):
      want = int(np.sum(scores >= np.percentile(scores, (1 - p) * 100)))
      assert _percentile_keep_count(n, p) == want, (n, p)
  keep = fisher_mask({"w": jnp.arange(6, dtype=jnp.float32)}, 0.2)
  assert keep["w"].tolist() == [False, False, False, False, True, True]


@pytest.fixture
def small_chunks(monkeypatch):
  """Counts in chunks of 64 scalars, so that small leaves take the chunked loop."""
  from childtune_jax import masks

  monkeypatch.setattr(masks, "_CHUNK", 64)
  jax.clear_caches()  # the counting functions are traced anew with the small chunk
  yield
  monkeypatch.undo()
  jax.clear_caches()


def test_chunked_counts_match_references(small_chunks):
  for reserve_p in (0.1, 0.37):
    _check_against_percentile(reserve_p)
  _check_jaccard_and_kept_fraction()
  scores = _random_tree(2, {"a": (30, 7), "b": (130,)})
  with pytest.raises(ValueError, match="NaN or inf values at 'b'"):
    fisher_mask({**scores, "b": scores["b"].at[129].set(jnp.inf)}, 0.3)


def _check_against_percentile(reserve_p):
  shapes = {"bert/encoder/layer/0/kernel": (64, 33), "bert/encoder/layer/1/bias": (33,),
            "bert/embeddings/word": (50, 16), "classifier/kernel": (16, 2)}
  fisher = _random_tree(1, shapes)
  keep = jax.jit(lambda f: f)(fisher_mask(fisher, reserve_p, where=is_encoder_layer))
  chosen = [k for k in shapes if "layer" in k]
  scores = np.concatenate([np.asarray(fisher[k]).ravel() for k in chosen])
  assert len(np.unique(scores)) == scores.size  # tie-free input
  polar = np.percentile(scores, (1 - reserve_p) * 100)
  for name in shapes:
    got = np.asarray(keep[name])
    want = np.asarray(fisher[name]) >= polar if name in chosen else np.ones(shapes[name], bool)
    np.testing.assert_array_equal(got, want, err_msg=name)


@pytest.mark.parametrize("k", [1, 17, 5000, 9999, 10000])
def test_kth_largest_bracketed_and_bisection_agree_with_sort(k):
  from childtune_jax.masks import _kth_largest_bisection, _kth_largest_bracketed

  rng = np.random.default_rng(k)
  leaves = [jnp.asarray(rng.normal(size=n), jnp.float32) for n in (6000, 3000, 1000)]
  leaves[1] = leaves[1].at[:500].set(0.25)  # a block of ties
  want = np.sort(np.concatenate([np.asarray(x) for x in leaves]))[::-1][k - 1]
  assert _kth_largest_bisection(leaves, k) == want
  assert _kth_largest_bracketed(leaves, k, sample_size=64) == want
  assert _kth_largest_bracketed(leaves, k, sample_size=1 << 20) == want


@pytest.mark.parametrize("chunk", [1, 7, 64, 1 << 24])
def test_candidates_gathered_in_chunks(chunk):
  from childtune_jax.masks import _between

  x = np.random.default_rng(chunk).normal(size=(13, 11)).astype(np.float32)
  low, high = np.float32(-0.3), np.float32(0.5)
  want = x.ravel()[(x.ravel() >= low) & (x.ravel() < high)]
  np.testing.assert_array_equal(_between(jnp.asarray(x), low, high, chunk), want)


def test_fisher_mask_ties_all_kept_and_negative_values_ordered():
  keep = fisher_mask({"w": jnp.zeros(10)}, 0.3)
  assert np.all(np.asarray(keep["w"]))
  scores = np.array([-3.0, -0.0, 0.0, 2.5, -1e-30, 7.0, 1e-30, -7.0], np.float32)
  keep = fisher_mask({"w": jnp.asarray(scores)}, 0.5)
  np.testing.assert_array_equal(np.asarray(keep["w"]), scores >= np.percentile(scores, 50))


def test_fisher_mask_bad_input():
  with pytest.raises(ValueError, match="NaN or inf values at 'b'"):
    fisher_mask({"a": jnp.ones(3), "b": jnp.array([1.0, jnp.inf])}, 0.3)
  with pytest.raises(ValueError, match="NaN or inf"):
    fisher_mask({"a": jnp.array([jnp.nan])}, 0.3)
  with pytest.raises(ValueError, match="reserve_p"):
    fisher_mask({"a": jnp.ones(3)}, 0.0)
  with pytest.raises(ValueError, match="selects no leaf"):
    fisher_mask({"a": jnp.ones(3)}, 0.3, where=lambda path: False)


def test_jaccard_and_kept_fraction_against_sets():
  _check_jaccard_and_kept_fraction()


def _check_jaccard_and_kept_fraction():
  rng = np.random.default_rng(0)
  a = {"x": rng.random((20, 7)) < 0.3, "y": rng.random(13) < 0.5}  # 140 + 13: 2 chunks + rest
  b = {"x": rng.random((20, 7)) < 0.3, "y": rng.random(13) < 0.5}
  flat = lambda t: {i for i, v in enumerate(np.concatenate([t["x"].ravel(), t["y"]])) if v}  # noqa: E731
  want = len(flat(a) & flat(b)) / len(flat(a) | flat(b))
  to_jnp = lambda t: jax.tree_util.tree_map(jnp.asarray, t)  # noqa: E731
  assert jaccard(to_jnp(a), to_jnp(b)) == pytest.approx(want, rel=1e-12)
  only_x = np.count_nonzero(a["x"] & b["x"]) / np.count_nonzero(a["x"] | b["x"])
  assert jaccard(to_jnp(a), to_jnp(b), where=lambda p: p == "x") == pytest.approx(only_x)
  assert jaccard(to_jnp(a), to_jnp(a)) == 1.0
  assert kept_fraction(to_jnp(a)) == (len(flat(a)), 153)
  with pytest.raises(ValueError, match="missing leaf 'y'"):
    jaccard(to_jnp(a), {"x": jnp.asarray(b["x"])})
  with pytest.raises(TypeError, match="bool"):
    jaccard(to_jnp(a), {"x": jnp.ones((20, 7)), "y": jnp.ones(13)})
  packed = {"x": jnp.zeros((20, 1), jnp.uint8), "y": jnp.zeros(2, jnp.uint8)}
  with pytest.raises(TypeError, match="unpack_keep"):
    kept_fraction(packed)


def test_random_keep_exact_size_and_unselected_leaves():
  like = {"layer": jnp.zeros((300, 300)), "layer_b": jnp.zeros(77), "head": jnp.zeros(10)}
  n = 90_000 + 77
  for seed, size in [(0, {"reserve_p": 0.2}), (1, {"count": 12_345}), (2, {"count": n}),
                     (3, {"count": 0})]:
    keep = random_keep(seed, like, **size, where=is_encoder_layer)
    want = size.get("count", round(0.2 * n))
    assert int(np.sum(keep["layer"])) + int(np.sum(keep["layer_b"])) == want
    assert np.all(np.asarray(keep["head"]))
  with pytest.raises(ValueError, match="exactly one"):
    random_keep(0, like, 0.2, count=5)
  with pytest.raises(ValueError, match="count"):
    random_keep(0, like, count=n + 1, where=is_encoder_layer)


def test_random_keep_draws_every_subset_of_the_size_equally_often():
  # 2 of 5 scalars over two leaves: 10 subsets. Draws whose Bernoulli count is off
  # by one or two in either direction go through the correction.
  like = {"a": jnp.zeros(3), "b": jnp.zeros(2)}
  subsets = {c: 0 for c in itertools.combinations(range(5), 2)}
  draws = 1500
  for seed in range(draws):
    keep = random_keep(seed, like, count=2)
    flat = np.concatenate([np.asarray(keep["a"]), np.asarray(keep["b"])])
    subsets[tuple(np.flatnonzero(flat))] += 1
  observed = np.array(list(subsets.values()))
  expected = draws / len(subsets)
  chi2 = np.sum((observed - expected) ** 2 / expected)
  assert chi2 < 33.7  # chi-square with 9 degrees of freedom: P(> 33.7) = 1e-4
