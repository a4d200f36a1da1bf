"""Child-Tuning_F and _D against independent NumPy re-computations."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state

from childtune_jax import (
    ChildTuningFState,
    child_tuning_adamw,
    child_tuning_d,
    child_tuning_f,
    default_weight_decay_mask,
)


def _params(seed=0):
  rng = np.random.default_rng(seed)
  return {
      "dense": {"kernel": jnp.asarray(rng.normal(size=(7, 5)), jnp.float32),
                "bias": jnp.asarray(rng.normal(size=(5,)), jnp.float32)},
      "LayerNorm": {"scale": jnp.asarray(rng.normal(size=(5,)), jnp.float32)},
      "scalar": jnp.asarray(rng.normal(), jnp.float32),
  }


def _np_fmix32(h):
  """MurmurHash3's fmix32 in uint64 arithmetic, reduced mod 2**32 after each product."""
  h = np.asarray(h, np.uint64)
  h ^= h >> np.uint64(16)
  h = (h * np.uint64(0x85EBCA6B)) & np.uint64(0xFFFFFFFF)
  h ^= h >> np.uint64(13)
  h = (h * np.uint64(0xC2B2AE35)) & np.uint64(0xFFFFFFFF)
  return h ^ (h >> np.uint64(16))


def _np_masks(key, step, tree, reserve_p, sampler="hash8"):
  """The documented mask of leaf i at step t, recomputed from raw random bits in NumPy."""
  leaves = jax.tree_util.tree_leaves(tree)
  keys = jax.random.split(jax.random.fold_in(jax.random.key(key), step), len(leaves))
  out = []
  for k, leaf in zip(keys, leaves):
    shape = np.shape(leaf)
    if sampler == "bernoulli":
      u = np.asarray(jax.random.uniform(k, shape, jnp.float32))
      out.append((u < np.float32(reserve_p), np.float32(reserve_p)))
    else:
      width = {"uint8": 8, "uint16": 16, "hash8": 8}[sampler]
      full = shape or (1,)
      per = 32 // width
      word_shape = full[:-1] + (-(-full[-1] // per),)
      if sampler == "hash8":
        s0, s1 = (int(v) for v in np.asarray(jax.random.bits(k, (2,), jnp.uint32)))
        index = np.arange(int(np.prod(word_shape)), dtype=np.uint64).reshape(word_shape)
        words = _np_fmix32(_np_fmix32((index + s0) & 0xFFFFFFFF) ^ s1).astype(np.uint32)
      else:
        words = np.asarray(jax.random.bits(k, word_shape, jnp.uint32))
      small = words.view(np.uint8 if width == 8 else np.uint16)  # little-endian slices
      small = small.reshape(full[:-1] + (-1,))[..., : full[-1]].reshape(shape)
      t = round(reserve_p * 2**width)
      out.append((small < t, np.float32(t / 2**width)))
  return out


@pytest.mark.parametrize("sampler", ["bernoulli", "uint16", "uint8", "hash8"])
@pytest.mark.parametrize("rescale", [True, False])
def test_f_matches_numpy(sampler, rescale):
  p, key = 0.3, 11
  tx = child_tuning_f(p, key, rescale=rescale, sampler=sampler)
  update = jax.jit(tx.update)
  state = tx.init(_params())
  for step in range(3):
    g = _params(step + 1)
    out, state = update(g, state)
    want = []
    masks = _np_masks(key, step, g, p, sampler)
    for leaf, (keep, p_eff) in zip(jax.tree_util.tree_leaves(g), masks):
      x = np.asarray(leaf)
      want.append(np.where(keep, x / p_eff if rescale else x, 0))
    for got, w in zip(jax.tree_util.tree_leaves(out), want):
      np.testing.assert_allclose(np.asarray(got), w, rtol=1e-6, atol=0)
  assert int(state.count) == 3


def test_f_where_predicate_and_tree_pass_other_leaves_through():
  g = _params(1)
  by_path = child_tuning_f(0.2, 0, where=lambda path: path.startswith("dense"))
  flags = {"dense": {"kernel": True, "bias": True}, "LayerNorm": {"scale": False}, "scalar": False}
  by_tree = child_tuning_f(0.2, 0, where=flags)
  a, _ = jax.jit(by_path.update)(g, by_path.init(g))
  b, _ = jax.jit(by_tree.update)(g, by_tree.init(g))
  np.testing.assert_array_equal(a["LayerNorm"]["scale"], g["LayerNorm"]["scale"])
  np.testing.assert_array_equal(a["scalar"], g["scalar"])
  assert np.any(np.asarray(a["dense"]["kernel"]) == 0)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(x, y)


def test_f_kept_fraction_within_binomial_bound():
  p, n = 0.3, 200_000
  for sampler in ("bernoulli", "uint16", "uint8", "hash8"):
    tx = child_tuning_f(p, 5, sampler=sampler)
    g = {"w": jnp.ones((400, 500))}
    out, _ = jax.jit(tx.update)(g, tx.init(g))
    kept = int(np.count_nonzero(np.asarray(out["w"])))
    # 6 standard deviations of Binomial(n, p): fails by chance with probability < 1e-8.
    # uint8 rounds p to 77/256 = 0.30078, 1.7 sd away at this n, inside the bound.
    assert abs(kept - p * n) < 6 * np.sqrt(n * p * (1 - p)), (sampler, kept)


@pytest.mark.parametrize("sampler", ["uint8", "hash8"])
def test_f_masks_independent_across_steps_and_leaves(sampler):
  """Joint keep rates of two steps, and of two leaves, match p**2 (independence)."""
  p, n = 0.3, 200_000
  g = {"a": jnp.ones((400, 500)), "b": jnp.ones((400, 500))}
  tx = child_tuning_f(p, 9, sampler=sampler)
  update = jax.jit(tx.update)
  first, state = update(g, tx.init(g))
  second, _ = update(g, state)
  q = (77 / 256) ** 2  # p rounded to 1/256, squared
  bound = 6 * np.sqrt(n * q * (1 - q))
  for x, y in ((first["a"], second["a"]), (first["a"], first["b"])):
    both = int(np.count_nonzero((np.asarray(x) != 0) & (np.asarray(y) != 0)))
    assert abs(both - q * n) < bound, both


def test_f_unbiased():
  """The mean of many masked-and-rescaled gradients converges to the gradient."""
  p, steps = 0.25, 400
  g = {"w": jnp.linspace(-2.0, 3.0, 64)}
  tx = child_tuning_f(p, 3)

  def body(state, _):
    out, state = tx.update(g, state)
    return state, out["w"]

  _, outs = jax.jit(lambda s: jax.lax.scan(body, s, None, length=steps))(tx.init(g))
  mean = np.asarray(outs).mean(0)
  # Per entry, Var(x * m / p) = x^2 (1 - p) / p; bound at 6 standard errors.
  stderr = np.abs(np.asarray(g["w"])) * np.sqrt((1 - p) / p / steps)
  assert np.all(np.abs(mean - np.asarray(g["w"])) <= 6 * stderr + 1e-6)


def test_f_reserve_p_one_is_identity():
  g = _params(2)
  tx = child_tuning_f(1.0, 0)
  out, _ = jax.jit(tx.update)(g, tx.init(g))
  for x, y in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(g)):
    np.testing.assert_array_equal(x, y)


def test_f_same_key_same_masks_and_steps_differ():
  g = {"w": jnp.ones(1000)}
  a, b = child_tuning_f(0.5, 7), child_tuning_f(0.5, jax.random.key(7))
  sa, sb = a.init(g), b.init(g)
  out_a1, sa = jax.jit(a.update)(g, sa)
  out_b1, sb = jax.jit(b.update)(g, sb)
  out_a2, _ = jax.jit(a.update)(g, sa)
  np.testing.assert_array_equal(out_a1["w"], out_b1["w"])
  assert np.any(np.asarray(out_a1["w"]) != np.asarray(out_a2["w"]))
  other, _ = jax.jit(child_tuning_f(0.5, 8).update)(g, child_tuning_f(0.5, 8).init(g))
  assert np.any(np.asarray(other["w"]) != np.asarray(out_a1["w"]))


def test_f_leaves_get_different_masks():
  g = {"a": jnp.ones(1000), "b": jnp.ones(1000)}
  tx = child_tuning_f(0.5, 0)
  out, _ = tx.update(g, tx.init(g))
  assert np.any(np.asarray(out["a"]) != np.asarray(out["b"]))


def test_f_keeps_dtype_bfloat16():
  g = {"w": jnp.ones(64, jnp.bfloat16)}
  tx = child_tuning_f(jnp.float32(0.3), 0)
  out, _ = jax.jit(tx.update)(g, tx.init(g))
  assert out["w"].dtype == jnp.bfloat16


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan")])
def test_f_bad_reserve_p(bad):
  with pytest.raises(ValueError, match="reserve_p"):
    child_tuning_f(bad, 0)


def test_f_bad_key_and_sampler():
  with pytest.raises(TypeError, match="key"):
    child_tuning_f(0.3, None)
  with pytest.raises(TypeError, match="key"):
    child_tuning_f(0.3, "seed")
  with pytest.raises(ValueError, match="sampler"):
    child_tuning_f(0.3, 0, sampler="fast")
  with pytest.raises(ValueError, match="rounds to 0"):
    child_tuning_f(0.001, 0, sampler="uint8")
  with pytest.raises(TypeError, match="reserve_p"):
    child_tuning_f("0.3", 0)


def test_d_masks_with_fixed_keep():
  g = _params(3)
  keep = jax.tree_util.tree_map(lambda x: np.asarray(x) > 0, _params(4))
  tx = child_tuning_d(keep)
  state = tx.init(g)
  out, state = jax.jit(tx.update)(g, state)
  for got, x, k in zip(*(jax.tree_util.tree_leaves(t) for t in (out, g, keep))):
    np.testing.assert_array_equal(np.asarray(got), np.where(k, np.asarray(x), 0))
  nan = jax.tree_util.tree_map(lambda x: jnp.full_like(x, jnp.nan), g)
  out, _ = jax.jit(tx.update)(nan, state)
  for got, k in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(keep)):
    assert np.all(np.asarray(got)[~k] == 0)


def test_state_can_be_donated_and_reinitialised():
  g = {"w": jnp.ones(8)}
  keep = {"w": jnp.arange(8) % 2 == 0}
  tx = child_tuning_d(keep)
  step = jax.jit(tx.update, donate_argnums=1)
  _, state = step(g, tx.init(g))
  out, _ = step(g, tx.init(g))
  np.testing.assert_array_equal(np.asarray(out["w"]), np.arange(8) % 2 == 0)
  assert not keep["w"].is_deleted()
  key = jax.random.key(3)
  tx = child_tuning_f(0.5, key)
  step = jax.jit(tx.update, donate_argnums=1)
  first, _ = step(g, tx.init(g))
  again, _ = step(g, tx.init(g))
  np.testing.assert_array_equal(np.asarray(first["w"]), np.asarray(again["w"]))
  assert not key.is_deleted()


def test_d_bad_keep():
  g = _params()
  keep = jax.tree_util.tree_map(lambda x: jnp.ones(jnp.shape(x), bool), g)
  with pytest.raises(TypeError, match="dense/kernel"):
    child_tuning_d({**keep, "dense": {"kernel": jnp.ones((7, 5)), "bias": keep["dense"]["bias"]}})
  with pytest.raises(ValueError, match="shape \\(5,\\) at 'dense/kernel'"):
    child_tuning_d({**keep, "dense": {"kernel": jnp.ones(5, bool), "bias": keep["dense"]["bias"]}}
                   ).init(g)
  missing = {k: v for k, v in keep.items() if k != "scalar"}
  with pytest.raises(ValueError, match="missing leaf 'scalar'"):
    child_tuning_d(missing).init(g)
  tx = child_tuning_d(keep)
  with pytest.raises(ValueError, match="structure of the updates: unexpected leaf 'scalar'"):
    tx.update({k: v for k, v in g.items() if k != "scalar"}, tx.init(g))


def _np_adamw(params, grads_seq, masks, lr, b1, b2, eps, wd, decay):
  """optax's AdamW (bias-corrected moments, eps outside the root, decoupled decay)."""
  p = [np.asarray(x, np.float64) for x in params]
  m = [np.zeros_like(x) for x in p]
  v = [np.zeros_like(x) for x in p]
  for t, (grads, mask) in enumerate(zip(grads_seq, masks), start=1):
    for i, (g, k) in enumerate(zip(grads, mask)):
      g = np.asarray(g, np.float64) * k
      m[i] = b1 * m[i] + (1 - b1) * g
      v[i] = b2 * v[i] + (1 - b2) * g * g
      mhat, vhat = m[i] / (1 - b1**t), v[i] / (1 - b2**t)
      p[i] = p[i] - lr * (mhat / (np.sqrt(vhat) + eps) + (wd * p[i] if decay[i] else 0))
  return p


@pytest.mark.parametrize("mode", ["F", "D"])
def test_child_tuning_adamw_matches_numpy(mode):
  lr, p_keep, key, steps = 1e-2, 0.4, 3, 4
  params = _params(0)
  keep = jax.tree_util.tree_map(lambda x: np.asarray(x) > -0.3, _params(9))
  tx = child_tuning_adamw(lr, mode=mode, reserve_p=p_keep,
                          key=key if mode == "F" else None, keep=keep if mode == "D" else None)
  state = tx.init(params)
  grads_seq = [_params(10 + t) for t in range(steps)]

  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  got = params
  for grads in grads_seq:
    got, state = step(got, state, grads)
  masks = []
  for t in range(steps):
    if mode == "F":
      masks.append([k / pe for k, pe in _np_masks(key, t, params, p_keep)])
    else:
      masks.append(jax.tree_util.tree_leaves(keep))
  # Flatten order: LayerNorm/scale, dense/bias, dense/kernel, scalar; no decay on bias, LayerNorm.
  decay = [False, False, True, True]
  want = _np_adamw(jax.tree_util.tree_leaves(params),
                   [jax.tree_util.tree_leaves(g) for g in grads_seq], masks,
                   lr, 0.9, 0.999, 1e-6, 0.01, decay)
  assert [p for p in jax.tree_util.tree_leaves(default_weight_decay_mask(params))] == decay
  for g, w in zip(jax.tree_util.tree_leaves(got), want):
    np.testing.assert_allclose(np.asarray(g), w, rtol=1e-5, atol=1e-6)


def test_freeze_non_child_leaves_masked_params_fixed():
  params = _params(0)
  tx = child_tuning_adamw(1e-2, mode="F", reserve_p=0.3, key=0, freeze_non_child=True)
  state = tx.init(params)
  for t in range(3):
    updates, state = jax.jit(tx.update)(_params(t + 1), state, params)
    keep = [k for k, _ in _np_masks(0, t, params, 0.3)]
    for u, k in zip(jax.tree_util.tree_leaves(updates), keep):
      assert np.all(np.asarray(u)[~k] == 0)
      assert np.all(np.asarray(u)[k] != 0)


def test_adamw_bad_arguments():
  with pytest.raises(ValueError, match="mode"):
    child_tuning_adamw(1e-3, mode="X")
  with pytest.raises(ValueError, match="key"):
    child_tuning_adamw(1e-3, mode="F")
  with pytest.raises(ValueError, match="keep"):
    child_tuning_adamw(1e-3, mode="D")
  with pytest.raises(ValueError, match="reserve_p"):
    child_tuning_adamw(1e-3, mode="F", key=0, reserve_p=2.0)


def _count_compiles(fn, *args_seq):
  jitted = jax.jit(fn)
  for args in args_seq:
    jitted(*args)
  return jitted._cache_size()


@pytest.mark.parametrize("mode,packing", [("F", None), ("D", None), ("D", "uint8")])
def test_no_recompilation_and_stable_state(mode, packing):
  params = _params()
  keep = jax.tree_util.tree_map(lambda x: jnp.ones(jnp.shape(x), bool), params)
  tx = child_tuning_adamw(optax.linear_schedule(1e-3, 0.0, 10), mode=mode, key=1,
                          keep=keep if mode == "D" else None, packing=packing)
  state = tx.init(params)
  update = jax.jit(tx.update)
  before = jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), state)
  for t in range(3):
    _, state = update(_params(t), state, params)
  after = jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), state)
  assert jax.tree_util.tree_structure(before) == jax.tree_util.tree_structure(after)
  assert before == after
  assert update._cache_size() == 1


def test_multisteps_one_mask_per_optimizer_step():
  """Inside MultiSteps, F masks the accumulated gradient, one draw per optimizer step."""
  k = 3
  inner = child_tuning_f(0.5, 4)
  tx = optax.MultiSteps(inner, every_k_schedule=k)
  g = {"w": jnp.arange(1.0, 101.0)}
  state = tx.init(g)
  update = jax.jit(tx.update)
  outs = []
  for _ in range(2 * k):
    out, state = update(g, state)
    outs.append(np.asarray(out["w"]))
  keeps = [m for m, _ in (_np_masks(4, t, g, 0.5)[0] for t in range(2))]
  np.testing.assert_allclose(outs[k - 1], np.where(keeps[0], g["w"] / 0.5, 0), rtol=1e-6)
  np.testing.assert_allclose(outs[2 * k - 1], np.where(keeps[1], g["w"] / 0.5, 0), rtol=1e-6)
  assert all(np.all(o == 0) for i, o in enumerate(outs) if i % k != k - 1)


def test_inject_hyperparams_changes_reserve_p():
  g = {"w": jnp.ones(100_000)}
  tx = optax.inject_hyperparams(child_tuning_f, static_args=("key", "sampler"))(
      reserve_p=0.5, key=0, sampler="bernoulli")
  state = tx.init(g)
  update = jax.jit(tx.update)
  out, state = update(g, state)
  assert abs(np.mean(np.asarray(out["w"]) != 0) - 0.5) < 0.01
  state.hyperparams["reserve_p"] = jnp.asarray(0.1, jnp.float32)
  out, state = update(g, state)
  kept = np.asarray(out["w"]) != 0
  assert abs(kept.mean() - 0.1) < 0.01
  np.testing.assert_allclose(np.asarray(out["w"])[kept], 10.0, rtol=1e-6)
  assert update._cache_size() == 1


def test_apply_if_finite_skips_step_and_reuses_mask():
  g = {"w": jnp.ones(1000)}
  tx = optax.apply_if_finite(child_tuning_f(0.5, 0), max_consecutive_errors=3)
  state = tx.init(g)
  update = jax.jit(tx.update)
  bad, state = update({"w": jnp.full(1000, jnp.nan)}, state)
  assert np.all(np.asarray(bad["w"]) == 0)
  out, state = update(g, state)
  keep0 = _np_masks(0, 0, g, 0.5)[0][0]
  np.testing.assert_array_equal(np.asarray(out["w"]) != 0, keep0)


class _MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(2)(nn.relu(nn.Dense(8)(x)))


def test_flax_train_state_and_nnx_optimizer():
  x = jnp.ones((4, 3))
  model = _MLP()
  params = model.init(jax.random.key(0), x)["params"]
  tx = child_tuning_adamw(1e-2, mode="F", reserve_p=0.5, key=0)
  ts = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)

  @jax.jit
  def step(ts):
    grads = jax.grad(lambda p: jnp.sum(ts.apply_fn({"params": p}, x) ** 2))(ts.params)
    return ts.apply_gradients(grads=grads)

  ts2 = step(step(ts))
  assert int(ts2.step) == 2
  assert int(ts2.opt_state[0].count) == 2

  from flax import nnx

  class Lin(nnx.Module):
    def __init__(self, rngs):
      self.lin = nnx.Linear(3, 64, rngs=rngs)

    def __call__(self, x):
      return self.lin(x)

  net = Lin(nnx.Rngs(0))
  tx = child_tuning_adamw(1e-2, mode="F", reserve_p=0.5, key=0, weight_decay=0.0)
  opt = nnx.Optimizer(net, tx, wrt=nnx.Param)
  kernel0 = np.asarray(net.lin.kernel[...]).copy()

  @nnx.jit
  def nnx_step(net, opt):
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(net)
    opt.update(net, grads)

  nnx_step(net, opt)
  moved = np.asarray(net.lin.kernel[...]) != kernel0
  # Without weight decay only the child network moves on the first step.
  assert 0 < moved.sum() < moved.size


def test_state_is_documented_namedtuple():
  tx = child_tuning_f(0.3, 0)
  state = tx.init({"w": jnp.ones(3)})
  assert isinstance(state, ChildTuningFState)
  assert state.count.dtype == jnp.int32
  assert jnp.issubdtype(state.key.dtype, jax.dtypes.prng_key)
