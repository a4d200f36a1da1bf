"""shared_fisher_mask: one child network for several tasks, against NumPy."""

import jax.numpy as jnp
import numpy as np
import pytest

from childtune_jax import is_encoder_layer, shared_fisher_mask

SHAPES = {"layer_0": (6, 5), "layer_1": (7,), "head": (3, 2)}


def _fisher(seed, scale):
  rng = np.random.default_rng(seed)
  return {k: (scale * rng.exponential(size=s)).astype(np.float32) for k, s in SHAPES.items()}


def _np_top(scores, p):
  """The reference's selection: scores at or above np.percentile's (1 - p) quantile."""
  return scores >= np.percentile(scores, (1 - p) * 100)


def _flat(tree, keys):
  return np.concatenate([np.asarray(tree[k], np.float64).ravel() for k in keys])


def _unflat(flat, keys):
  out, start = {}, 0
  for k in keys:
    size = int(np.prod(SHAPES[k]))
    out[k] = flat[start:start + size].reshape(SHAPES[k])
    start += size
  return out


LAYERS = ["layer_0", "layer_1"]


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
def test_normalized_sum_equals_numpy(p):
  # Three tasks whose Fisher differ in scale by 1000x: normalised, each counts the same.
  fishers = [_fisher(1, 1.0), _fisher(2, 1000.0), _fisher(3, 0.01)]
  keep = shared_fisher_mask([{k: jnp.asarray(v) for k, v in f.items()} for f in fishers], p,
                            where=is_encoder_layer)
  combined = sum(_flat(f, LAYERS) / _flat(f, LAYERS).sum() for f in fishers)
  want = _unflat(_np_top(combined, p), LAYERS)
  for k in LAYERS:
    np.testing.assert_array_equal(np.asarray(keep[k]), want[k])
  assert np.asarray(keep["head"]).all()  # outside ``where``: always trained
  # Without the normalisation, the 1000x task alone would decide: a different network.
  raw = _unflat(_np_top(sum(_flat(f, LAYERS) for f in fishers), p), LAYERS)
  assert any((raw[k] != want[k]).any() for k in LAYERS)


@pytest.mark.parametrize("combine, op", [("union", np.logical_or),
                                          ("intersection", np.logical_and)])
def test_union_and_intersection_of_each_tasks_network(combine, op):
  fishers = [_fisher(4, 1.0), _fisher(5, 1.0)]
  keep = shared_fisher_mask(fishers, 0.3, combine=combine, where=is_encoder_layer)
  masks = [_unflat(_np_top(_flat(f, LAYERS), 0.3), LAYERS) for f in fishers]
  for k in LAYERS:
    np.testing.assert_array_equal(np.asarray(keep[k]), op(masks[0][k], masks[1][k]))
  assert np.asarray(keep["head"]).all()


def test_one_task_is_its_own_fisher_mask():
  f = _fisher(6, 3.0)
  keep = shared_fisher_mask([f], 0.2, where=is_encoder_layer)
  want = _unflat(_np_top(_flat(f, LAYERS), 0.2), LAYERS)
  for k in LAYERS:
    np.testing.assert_array_equal(np.asarray(keep[k]), want[k])


def test_bad_input():
  f = _fisher(7, 1.0)
  with pytest.raises(ValueError, match="combine must be one of"):
    shared_fisher_mask([f], 0.3, combine="mean")
  with pytest.raises(ValueError, match="at least one task"):
    shared_fisher_mask([], 0.3)
  with pytest.raises(ValueError, match="fishers\\[1\\]"):
    shared_fisher_mask([f, {"layer_0": f["layer_0"]}], 0.3)
  zero = {k: np.zeros_like(v) for k, v in f.items()}
  with pytest.raises(ValueError, match="fishers\\[1\\] is zero"):
    shared_fisher_mask([f, zero], 0.3)
