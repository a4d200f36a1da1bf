"""The dynamic child networks against NumPy re-implementations of their scores, schedules and
selections."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from childtune_jax import (
    child_tuning_dynamic,
    child_tuning_dynamic_adamw,
    current_keep,
    dps,
    is_encoder_layer,
    scale_by_dynamic_adam,
)
from childtune_jax.dynamic import _order_key, kth_largest_keys

SHAPES = {"layer_a": {"kernel": (6, 7), "bias": (7,)}, "layer_b": {"kernel": (5, 3)},
          "head": {"kernel": (3, 2)}}


def _grads(rng):
  return jax.tree_util.tree_map(lambda s: jnp.asarray(rng.normal(size=s), jnp.float32),
                                SHAPES, is_leaf=lambda x: isinstance(x, tuple))


def _flat(tree):
  return {jax.tree_util.keystr(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _percentile_keep(scores, p):
  """The reference selection: scores >= np.percentile of the concatenated scores."""
  all_scores = np.concatenate([s.ravel() for s in scores.values()])
  threshold = np.percentile(all_scores, (1 - p) * 100)
  return {k: s >= threshold for k, s in scores.items()}


def _reference(grads_seq, p, every, decay, full_stage=0, alternate=False, scope="global",
               selected=None):
  """NumPy: scores, masks and masked updates of every step, written from the docstring."""
  selected = selected or (lambda name: True)
  names = [n for n in _flat(grads_seq[0]) if selected(n)]
  score = {n: np.zeros_like(_flat(grads_seq[0])[n]) for n in names}
  keep = {n: np.ones(score[n].shape, bool) for n in names}
  out = []
  for t, g in enumerate(grads_seq):
    g = _flat(g)
    if alternate:
      c = t % (full_stage + every)
      gathering, select, restart = c < full_stage, c == full_stage, c == 0
    else:
      since = t - full_stage
      gathering, select = since < 0, since >= 0 and since % every == 0
      restart = since >= 1 and (since - 1) % every == 0
    for n in names:
      if decay is None:
        score[n] = (0 if restart else score[n]) + np.float32(g[n]) ** 2
      else:
        score[n] = np.float32(decay) * score[n] + np.float32(1 - decay) * g[n] ** 2
    if select:
      if scope == "global":
        keep = _percentile_keep(score, p)
      else:
        keep = {n: _percentile_keep({n: score[n]}, p)[n] for n in names}
    masked = {n: (g[n] * (keep[n] | gathering) if n in keep else g[n]) for n in g}
    out.append((dict(score), dict(keep), masked, select))
  return out


def _run(tx, grads_seq):
  update = jax.jit(tx.update)
  state = tx.init(grads_seq[0])
  got = []
  for g in grads_seq:
    masked, state = update(g, state)
    got.append((state, masked))
  return got, update


@pytest.mark.parametrize("scope", ["global", "per_leaf"])
@pytest.mark.parametrize("decay,full_stage", [(0.9, 0), (0.5, 2), (None, 3)])
def test_scores_masks_and_updates_equal_numpy(scope, decay, full_stage):
  rng = np.random.default_rng(0)
  grads_seq = [_grads(rng) for _ in range(11)]
  tx = child_tuning_dynamic(0.3, every=3, decay=decay, scope=scope, full_stage=full_stage,
                            where=is_encoder_layer)
  got, update = _run(tx, grads_seq)
  want = _reference(grads_seq, 0.3, 3, decay, full_stage, scope=scope,
                    selected=is_encoder_layer_key)
  previous = None
  for (state, masked), (score, keep, masked_ref, select) in zip(got, want):
    got_score = {k: v for k, v in _flat(state.score).items()}
    assert set(got_score) == set(score)  # the head is not selected: no score for it
    for k in score:
      np.testing.assert_allclose(got_score[k], score[k], rtol=1e-6, atol=0)
    keep_now = _flat(current_keep(state, grads_seq[0]))
    for k in keep:
      np.testing.assert_array_equal(keep_now[k], keep[k])
    np.testing.assert_array_equal(keep_now["['head']['kernel']"], True)
    for k, v in _flat(masked).items():
      np.testing.assert_allclose(v, masked_ref[k], rtol=1e-6, atol=0)
    if previous is not None and not select:  # no re-selection between boundaries
      for k in keep:
        np.testing.assert_array_equal(keep_now[k], previous[k])
    previous = keep_now
  assert int(got[-1][0].count) == len(grads_seq)
  assert update._cache_size() == 1  # selection and ordinary steps: one compiled program


def is_encoder_layer_key(name):
  """``is_encoder_layer`` on the keystr names of ``_flat``."""
  return is_encoder_layer(name)


def test_kept_fraction_is_the_percentile_count_and_per_leaf_keeps_each_leafs_top():
  rng = np.random.default_rng(1)
  grads = _grads(rng)
  for scope in ("global", "per_leaf"):
    tx = child_tuning_dynamic(0.25, every=5, decay=0.0, scope=scope)
    _, state = jax.jit(tx.update)(grads, tx.init(grads))
    keep = _flat(current_keep(state, grads))
    g = _flat(grads)
    if scope == "global":
      want = _percentile_keep({k: v ** 2 for k, v in g.items()}, 0.25)
    else:
      want = {k: _percentile_keep({k: v ** 2}, 0.25)[k] for k, v in g.items()}
    for k in g:
      np.testing.assert_array_equal(keep[k], want[k])
    total = sum(v.size for v in g.values())
    kept = sum(int(v.sum()) for v in keep.values())
    if scope == "global":  # tie-free: exactly the percentile's count
      assert kept == sum(int(v.sum()) for v in want.values())
      assert abs(kept - 0.25 * total) <= 1


def test_dps_alternates_full_and_masked_stages_with_the_sum_restarting():
  rng = np.random.default_rng(2)
  grads_seq = [_grads(rng) for _ in range(13)]
  tx = dps(0.6, stage_steps=3)
  got, update = _run(tx, grads_seq)
  want = _reference(grads_seq, 0.4, 3, None, full_stage=3, alternate=True, scope="per_leaf")
  for t, ((state, masked), (score, keep, masked_ref, _)) in enumerate(zip(got, want)):
    for k, v in _flat(state.score).items():
      np.testing.assert_allclose(v, score[k], rtol=1e-6)
    for k, v in _flat(current_keep(state, grads_seq[0])).items():
      np.testing.assert_array_equal(v, keep[k])
    for k, v in _flat(masked).items():
      np.testing.assert_allclose(v, masked_ref[k], rtol=1e-6)
    full = t % 6 < 3
    flat_g = _flat(grads_seq[t])
    zeros = sum(int((v == 0).sum()) for v in _flat(masked).values())
    assert (zeros == 0) == full, t  # full-update stages change nothing
    if not full:
      for k, v in _flat(masked).items():  # about 40% of each leaf kept
        assert abs(int((v != 0).sum()) - 0.4 * flat_g[k].size) <= 1
  assert update._cache_size() == 1


def test_radix_threshold_equals_sort_with_ties_and_negatives():
  rng = np.random.default_rng(3)
  a = rng.normal(size=1000).astype(np.float32)
  b = np.round(rng.normal(size=(40, 9)), 1).astype(np.float32)  # many ties
  c = np.array([0.0, -0.0, np.inf, -np.inf, 1e-40], np.float32)  # signed zeros, denormal
  values = np.concatenate([a, b.ravel(), c])
  order = np.sort(values)[::-1]
  for k in (1, 2, 7, 100, 500, values.size - 1, values.size):
    keys = kth_largest_keys([[jnp.asarray(a), jnp.asarray(b), jnp.asarray(c)]],
                            jnp.array([k], jnp.uint32))
    np.testing.assert_array_equal(np.asarray(keys)[0], np.asarray(_order_key(order[k - 1])))
  # per group: each group's own k-th largest
  keys = jax.jit(kth_largest_keys)([[jnp.asarray(a)], [jnp.asarray(b)]],
                                   jnp.array([10, 30], jnp.uint32))
  np.testing.assert_array_equal(
      np.asarray(keys), np.asarray(_order_key(jnp.array([np.sort(a)[-10],
                                                         np.sort(b.ravel())[-30]]))))


def test_reserve_p_one_keeps_everything_and_bfloat16_scores():
  rng = np.random.default_rng(4)
  grads = _grads(rng)
  tx = child_tuning_dynamic(1.0, every=2, score_dtype="bfloat16")
  state = tx.init(grads)
  masked, new = jax.jit(tx.update)(grads, state)
  for k, v in _flat(masked).items():
    np.testing.assert_array_equal(v, _flat(grads)[k])
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(new.score))
  # state structure and dtypes unchanged by an update
  assert jax.tree_util.tree_structure(new) == jax.tree_util.tree_structure(state)
  for a, b in zip(jax.tree_util.tree_leaves(new), jax.tree_util.tree_leaves(state)):
    assert a.dtype == b.dtype and a.shape == b.shape


def test_inject_hyperparams_reserve_p_and_every():
  rng = np.random.default_rng(5)
  grads_seq = [_grads(rng) for _ in range(7)]
  injected = optax.inject_hyperparams(child_tuning_dynamic, static_args=("decay", "scope"))(
      reserve_p=0.3, every=2, decay=0.9)
  plain = child_tuning_dynamic(0.3, every=2, decay=0.9)
  got, update = _run(injected, grads_seq)
  ref, _ = _run(plain, grads_seq)
  for (_, m1), (_, m2) in zip(got, ref):
    for k, v in _flat(m1).items():
      np.testing.assert_array_equal(v, _flat(m2)[k])
  # a new reserve_p takes effect at the next selection, without recompiling
  state = got[-1][0]
  state.hyperparams["reserve_p"] = jnp.asarray(0.1, jnp.float32)
  for g in grads_seq[:2]:
    masked, state = update(g, state)
  kept = sum(int((v != 0).sum()) for v in _flat(masked).values())
  total = sum(v.size for v in _flat(masked).values())
  assert abs(kept - 0.1 * total) <= 1
  assert update._cache_size() == 1


def test_multisteps_selects_per_optimizer_step():
  rng = np.random.default_rng(6)
  grads_seq = [_grads(rng) for _ in range(6)]
  inner = child_tuning_dynamic(0.5, every=1, decay=0.0)
  tx = optax.MultiSteps(inner, every_k_schedule=3)
  state = tx.init(grads_seq[0])
  update = jax.jit(tx.update)
  for g in grads_seq:
    _, state = update(g, state)
  assert int(state.inner_opt_state.count) == 2  # one mask per optimizer step
  mean = jax.tree_util.tree_map(lambda *x: sum(x) / 3, *grads_seq[3:])
  keep = _flat(current_keep(state.inner_opt_state, grads_seq[0]))
  want = _percentile_keep({k: v ** 2 for k, v in _flat(mean).items()}, 0.5)
  for k in want:
    np.testing.assert_array_equal(keep[k], want[k])


@pytest.mark.parametrize("kwargs,match", [
    (dict(reserve_p=0.0, every=1), "reserve_p"),
    (dict(reserve_p=1.5, every=1), "reserve_p"),
    (dict(reserve_p=0.3, every=0), "every"),
    (dict(reserve_p=0.3, every=2.5), "every"),
    (dict(reserve_p=0.3, every=2, full_stage=-1), "full_stage"),
    (dict(reserve_p=0.3, every=2, decay=1.0), "decay"),
    (dict(reserve_p=0.3, every=2, scope="layer"), "scope"),
    (dict(reserve_p=0.3, every=2, alternate=True), "alternate"),
    (dict(reserve_p=0.3, every=2, score_dtype="int32"), "score_dtype"),
])
def test_bad_arguments_name_themselves(kwargs, match):
  with pytest.raises(ValueError, match=match):
    child_tuning_dynamic(**kwargs)


def test_where_selecting_nothing_and_dps_bad_p():
  with pytest.raises(ValueError, match="selects no leaf"):
    child_tuning_dynamic(0.3, every=2, where=lambda p: False).init({"w": jnp.ones(3)})
  with pytest.raises(ValueError, match="drop_p"):
    dps(1.0, stage_steps=3)


def _adamw_reference(params, grads_seq, p, every, full_stage, scope, lr, wd, b1=0.9, b2=0.999,
                     eps=1e-8):
  """NumPy: AdamW on full gradients, its update zeroed outside the top ``p`` by Adam's nu."""
  params = _flat(params)
  names = [n for n in params if is_encoder_layer(n)]
  m = {n: np.zeros_like(x) for n, x in params.items()}
  v = {n: np.zeros_like(x) for n, x in params.items()}
  keep = {n: np.ones(params[n].shape, bool) for n in names}
  out = []
  for t, g in enumerate(grads_seq, start=1):
    g = _flat(g)
    since = t - 1 - full_stage
    gathering, select = since < 0, since >= 0 and since % every == 0
    for n in params:
      m[n] = b1 * m[n] + (1 - b1) * g[n]
      v[n] = b2 * v[n] + (1 - b2) * g[n] ** 2
    if select:
      score = {n: v[n] for n in names}
      keep = (_percentile_keep(score, p) if scope == "global"
              else {n: _percentile_keep({n: score[n]}, p)[n] for n in names})
    for n in params:
      # bias corrections in float32, as optax computes them (1 - b2**t loses digits there)
      c1, c2 = 1 - np.float32(b1) ** np.float32(t), 1 - np.float32(b2) ** np.float32(t)
      u = (m[n] / c1) / (np.sqrt(v[n] / c2) + eps)
      if n in keep and not gathering:
        u = np.where(keep[n], u, 0.0)
      params[n] = params[n] - lr * (u + wd * params[n])
    out.append((dict(params), dict(keep), select))
  return out


@pytest.mark.parametrize("scope", ["global", "per_leaf"])
@pytest.mark.parametrize("full_stage", [0, 2])
def test_dynamic_adamw_equals_numpy_adamw_masked_by_its_second_moment(scope, full_stage):
  rng = np.random.default_rng(7)
  grads_seq = [_grads(rng) for _ in range(10)]
  params = _grads(rng)
  tx = child_tuning_dynamic_adamw(0.1, 0.3, every=3, full_stage=full_stage, scope=scope,
                                  weight_decay=0.01, where=is_encoder_layer)
  want = _adamw_reference(params, grads_seq, 0.3, 3, full_stage, scope, lr=0.1, wd=0.01)
  update = jax.jit(lambda g, s, p: tx.update(g, s, p))
  state = tx.init(params)
  before, previous = _flat(params), None
  for g, (params_ref, keep, select) in zip(grads_seq, want):
    updates, state = update(g, state, params)
    params = optax.apply_updates(params, updates)
    now = _flat(params)
    for k, x in now.items():
      np.testing.assert_allclose(x, params_ref[k], rtol=1e-5, atol=1e-6)
    network = _flat(current_keep(state[0], g))
    for k in keep:
      np.testing.assert_array_equal(network[k], keep[k])
      # outside the network a scalar moves by its weight decay alone
      if not np.all(keep[k]):
        np.testing.assert_allclose(now[k][~keep[k]], (before[k] * (1 - 0.1 * 0.01))[~keep[k]],
                                   rtol=1e-6)
      if previous is not None and not select:  # no re-selection between boundaries
        np.testing.assert_array_equal(network[k], previous[k])
    before, previous = now, network
  assert update._cache_size() == 1  # selection and ordinary steps: one compiled program


def test_dynamic_adamw_under_inject_hyperparams_equals_plain():
  rng = np.random.default_rng(8)
  grads_seq, params = [_grads(rng) for _ in range(5)], _grads(rng)
  injected = optax.inject_hyperparams(child_tuning_dynamic_adamw, static_args=("scope",))(
      learning_rate=0.1, reserve_p=0.3, every=2)
  plain = child_tuning_dynamic_adamw(0.1, 0.3, every=2)
  s1, s2 = injected.init(params), plain.init(params)
  for g in grads_seq:
    u1, s1 = jax.jit(injected.update)(g, s1, params)
    u2, s2 = jax.jit(plain.update)(g, s2, params)
    for k, v in _flat(s1.inner_state[0].keep).items():  # the same networks, bit for bit
      np.testing.assert_array_equal(v, _flat(s2[0].keep)[k])
    for k, v in _flat(u1).items():  # (injected b1, b2 are float32 arrays: Adam's bias
      np.testing.assert_allclose(v, _flat(u2)[k], rtol=2e-5)  # corrections round apart)


def test_dynamic_adam_keeps_no_score_of_its_own():
  params = _grads(np.random.default_rng(0))

  def state_bytes(tx):
    return sum(x.size * x.dtype.itemsize
               for x in jax.tree_util.tree_leaves(jax.eval_shape(tx.init, params)))

  # Adam's moments and the network, one bit a scalar (uint8 words along the last axis)
  packed = sum(int(np.prod(s[:-1])) * -(-s[-1] // 8)
               for s in jax.tree_util.tree_leaves(SHAPES, is_leaf=lambda x: isinstance(x, tuple)))
  assert state_bytes(scale_by_dynamic_adam(0.3, every=2)) == (
      state_bytes(optax.scale_by_adam()) + packed)
  with pytest.raises(ValueError, match="selects no leaf"):
    scale_by_dynamic_adam(0.3, every=2, where=lambda p: False).init(params)
  with pytest.raises(ValueError, match="every"):
    scale_by_dynamic_adam(0.3, every=0)


@pytest.mark.parametrize("score", ["ema", "adam"])
def test_cli_dynamic_resumes_bitwise_with_its_network_history(score, tmp_path, dies_at_batch):
  import os

  from childtune_jax.app import cli

  here = os.path.dirname(__file__)
  args = ["train", "--task", "mrpc", "--mode", "dynamic", "--reserve-p", "0.3", "--every", "2",
          "--full-stage", "1", "--score", score,
          "--model", os.path.join(here, "fixtures", "tiny-bert"),
          "--data-dir", os.path.join(here, "fixtures", "glue"), "--epochs", "2",
          "--batch-size", "8", "--max-seq-length", "32", "--learning-rate", "1e-3",
          "--save-every", "3", "--no-save-model"]

  def results(out):
    import json

    with open(os.path.join(out, "seed-42", "results.json")) as f:
      return json.load(f)

  full = str(tmp_path / "full")
  assert cli.main(args + ["--output-dir", full]) == 0

  part = str(tmp_path / "part")
  # Dies in the last step, after the checkpoint of step 6.
  with dies_at_batch(8, RuntimeError), pytest.raises(RuntimeError):
    cli.main(args + ["--output-dir", part])
  assert cli.main(args + ["--output-dir", part, "--resume"]) == 0
  a, b = results(full), results(part)
  assert a["metrics"] == b["metrics"] and a["train_losses"] == b["train_losses"]
  assert a["child_network"]["score"] == score
  selections = a["child_network"]["selections"]
  assert selections == b["child_network"]["selections"]
  assert [s["step"] for s in selections] == [1, 3, 5, 7]  # full_stage 1, then every 2
  total = a["child_network"]["total"]
  for s in selections:  # the percentile's count of tie-free scores: 30%, to one scalar
    assert abs(s["kept"] - 0.3 * total) <= 1
  assert selections[0]["jaccard_previous"] == pytest.approx(selections[0]["kept"] / total)
  assert all(0 < s["jaccard_previous"] <= 1 for s in selections)
