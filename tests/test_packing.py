"""Bit-packed keep masks against NumPy's packbits, and Child-Tuning_D with packed masks."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from childtune_jax import (
    child_tuning_adamw,
    child_tuning_d,
    fisher_mask,
    jaccard,
    pack_keep,
    unpack_keep,
)
from childtune_jax.packing import packed_shape

SHAPES = [(), (1,), (5,), (8,), (3, 17), (2, 3, 33), (4, 32), (2, 64)]


def _np_pack(x, packing):
  """np.packbits along the last axis (little-endian bits), uint32 words read as 4 bytes."""
  x = np.reshape(x, np.shape(x) or (1,))
  packed = np.packbits(x, axis=-1, bitorder="little")
  if packing == "uint32":
    packed = np.pad(packed, [(0, 0)] * (x.ndim - 1) + [(0, -packed.shape[-1] % 4)])
    packed = np.ascontiguousarray(packed).view("<u4")
  return packed


def _random_keep(shapes, seed=0, p=0.4):
  rng = np.random.default_rng(seed)
  return {f"leaf{i}": rng.random(s) < p for i, s in enumerate(shapes)}


@pytest.mark.parametrize("packing", ["uint8", "uint32"])
def test_pack_matches_np_packbits_and_round_trips(packing):
  keep = _random_keep(SHAPES)
  packed = pack_keep(jax.tree_util.tree_map(jnp.asarray, keep), packing)
  like = {k: np.zeros(np.shape(v), np.float32) for k, v in keep.items()}
  back = unpack_keep(packed, like)
  big = pack_keep({"w": jnp.ones((768, 3072), bool)}, packing)["w"]
  assert big.nbytes * 8 == 768 * 3072  # one bit per scalar where rows fill whole words
  for name, x in keep.items():
    assert packed[name].dtype == np.dtype(packing)
    assert packed[name].shape == packed_shape(np.shape(x), packing)
    np.testing.assert_array_equal(np.asarray(packed[name]), _np_pack(x, packing))
    assert back[name].dtype == jnp.bool_ and back[name].shape == np.shape(x)
    np.testing.assert_array_equal(np.asarray(back[name]), x)


@pytest.mark.parametrize("packing", ["uint8", "uint32"])
def test_d_packed_equals_np_where(packing):
  keep = _random_keep(SHAPES, seed=1)
  rng = np.random.default_rng(2)
  grads = {k: rng.normal(size=np.shape(v)).astype(np.float32) for k, v in keep.items()}
  bool_keep = jax.tree_util.tree_map(jnp.asarray, keep)
  for tx in (child_tuning_d(bool_keep, packing=packing),
             child_tuning_d(pack_keep(bool_keep, packing))):
    state = tx.init(grads)
    stored = jax.tree_util.tree_leaves(state.keep)
    assert all(x.dtype == np.dtype(packing) for x in stored)
    assert [x.nbytes for x in stored] == [_np_pack(x, packing).nbytes for x in keep.values()]
    out, _ = jax.jit(tx.update)(grads, state)
    for name, k in keep.items():
      np.testing.assert_array_equal(np.asarray(out[name]), np.where(k, grads[name], 0))


def test_adamw_with_packed_mask_equals_bool_mask():
  keep = _random_keep([(6, 40), (40,)], seed=3)
  params = {k: jnp.full(np.shape(v), 0.5, jnp.float32) for k, v in keep.items()}
  results = []
  for packing in (None, "uint8", "uint32"):
    tx = child_tuning_adamw(1e-2, mode="D", keep=keep, packing=packing, freeze_non_child=True)
    p, state = params, tx.init(params)
    step = jax.jit(lambda p, s, tx=tx: (lambda u, s: (optax.apply_updates(p, u), s))(
        *tx.update(jax.tree_util.tree_map(jnp.cos, p), s, p)), donate_argnums=(0, 1))
    p = jax.tree_util.tree_map(jnp.copy, p)
    for _ in range(3):
      p, state = step(p, state)
    results.append(p)
  for name, k in keep.items():
    np.testing.assert_array_equal(np.asarray(results[0][name])[~k], 0.5)  # frozen
    for other in results[1:]:
      np.testing.assert_array_equal(np.asarray(other[name]), np.asarray(results[0][name]))


@pytest.mark.parametrize("packing", ["uint8", "uint32"])
def test_fisher_mask_packed_and_jaccard_on_packed(packing):
  rng = np.random.default_rng(4)
  shapes = [(7, 19), (33,), ()]
  fisher_a = {f"l{i}": jnp.asarray(rng.random(s), jnp.float32) for i, s in enumerate(shapes)}
  fisher_b = {f"l{i}": jnp.asarray(rng.random(s), jnp.float32) for i, s in enumerate(shapes)}
  keep_a, keep_b = fisher_mask(fisher_a, 0.3), fisher_mask(fisher_b, 0.3)
  packed_a = fisher_mask(fisher_a, 0.3, packing=packing)
  packed_b = fisher_mask(fisher_b, 0.3, packing=packing)
  for name in fisher_a:
    np.testing.assert_array_equal(np.asarray(packed_a[name]),
                                  _np_pack(np.asarray(keep_a[name]), packing))
  a = {(n, i) for n, x in keep_a.items() for i in np.flatnonzero(np.asarray(x))}
  b = {(n, i) for n, x in keep_b.items() for i in np.flatnonzero(np.asarray(x))}
  assert jaccard(packed_a, packed_b) == pytest.approx(len(a & b) / len(a | b), abs=1e-12)
  with pytest.raises(ValueError, match="pack both masks the same way"):
    jaccard(packed_a, keep_b)


def test_packed_bad_input():
  keep = {"w": jnp.ones((4, 9), bool)}
  params = {"w": jnp.ones((4, 9))}
  with pytest.raises(ValueError, match="packing must be one of"):
    pack_keep(keep, "uint16")
  with pytest.raises(ValueError, match="packing must be one of"):
    child_tuning_d(keep, packing="bits")
  with pytest.raises(ValueError, match="packing must be one of"):
    fisher_mask({"w": jnp.ones(4)}, 0.5, packing="int8")
  with pytest.raises(TypeError, match="uint8/uint32 packed words, got dtype int32 at 'w'"):
    child_tuning_d({"w": jnp.ones((4, 2), jnp.int32)})
  with pytest.raises(ValueError, match=r"shape \(4, 1\) at 'w', expected \(4, 2\)"):
    child_tuning_d({"w": jnp.ones((4, 1), jnp.uint8)}).init(params)
  with pytest.raises(ValueError, match="packing is for mode='D'"):
    child_tuning_adamw(1e-3, mode="F", key=0, packing="uint8")
  with pytest.raises(TypeError, match="bool"):
    pack_keep({"w": jnp.ones(3)})
