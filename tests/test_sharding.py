"""Child-Tuning on 8 emulated CPU devices: sharded like the params, same as one device."""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from childtune_jax import child_tuning_adamw, child_tuning_f, fisher_mask

    assert jax.device_count() == 8, jax.devices()
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    rng = np.random.default_rng(0)
    params = {"kernel": jnp.asarray(rng.normal(size=(16, 64)), jnp.float32),
              "bias": jnp.asarray(rng.normal(size=(64,)), jnp.float32)}
    specs = {"kernel": P(None, "model"), "bias": P("model")}
    shardings = jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs)
    sharded = jax.device_put(params, shardings)
    grads = jax.tree_util.tree_map(lambda x: x * 0.5, sharded)
    local = jax.device_put(params, jax.devices()[0])

    # F alone: masks are the same on 1 and on 8 devices, sharded like the params.
    tx = child_tuning_f(0.3, 0)
    out8, _ = jax.jit(tx.update)(grads, tx.init(sharded))
    out1, _ = jax.jit(tx.update)(jax.tree_util.tree_map(lambda x: x * 0.5, local), tx.init(local))
    for name in params:
        assert out8[name].sharding.is_equivalent_to(shardings[name], out8[name].ndim), name
        np.testing.assert_array_equal(np.asarray(out8[name]), np.asarray(out1[name]))
        # Data-parallel replicas of one shard hold the same mask.
        by_index = {}
        for shard in out8[name].addressable_shards:
            by_index.setdefault(str(shard.index), []).append(np.asarray(shard.data))
        assert all(len(v) == 2 for v in by_index.values())
        for a, b in by_index.values():
            np.testing.assert_array_equal(a, b)

    # D: fisher_mask on sharded scores keeps the sharding; adamw train steps agree.
    keep8 = fisher_mask(jax.tree_util.tree_map(jnp.abs, sharded), 0.3)
    keep1 = fisher_mask(jax.tree_util.tree_map(jnp.abs, local), 0.3)
    for name in params:
        assert keep8[name].sharding.is_equivalent_to(shardings[name], keep8[name].ndim), name
        np.testing.assert_array_equal(np.asarray(keep8[name]), np.asarray(keep1[name]))
    packed8 = fisher_mask(jax.tree_util.tree_map(jnp.abs, sharded), 0.3, packing="uint8")
    for mode, keep, packing in (("F", None, None), ("D", keep8, None), ("D", packed8, None),
                                ("D", keep8, "uint8")):
        def run(p, keep):
            tx = child_tuning_adamw(1e-2, mode=mode, key=1, keep=keep, packing=packing)
            state = tx.init(p)
            step = jax.jit(lambda p, s: (lambda u, s: (optax.apply_updates(p, u), s))(
                *tx.update(jax.tree_util.tree_map(jnp.sin, p), s, p)))
            for _ in range(3):
                p, state = step(p, state)
            return p
        p8, p1 = run(sharded, keep), run(local, keep1 if mode == "D" else None)
        for name in params:
            assert p8[name].sharding.is_equivalent_to(shardings[name], p8[name].ndim)
            np.testing.assert_allclose(np.asarray(p8[name]), np.asarray(p1[name]), rtol=1e-6)
    # dynamic: the re-selected networks are the same on 1 and 8 devices, sharded like the params
    from childtune_jax import child_tuning_dynamic, current_keep, scale_by_dynamic_adam
    def dyn(tx, p):
        state = tx.init(p)
        update = jax.jit(tx.update)
        for i in range(5):
            out, state = update(jax.tree_util.tree_map(lambda x: jnp.sin(x * (i + 1)), p), state)
        return out, state
    tx = child_tuning_dynamic(0.3, every=2, decay=0.5)
    (out8, s8), (out1, s1) = dyn(tx, sharded), dyn(tx, local)
    for name in params:
        assert out8[name].sharding.is_equivalent_to(shardings[name], out8[name].ndim), name
        assert s8.score[name].sharding.is_equivalent_to(shardings[name], out8[name].ndim), name
        np.testing.assert_array_equal(np.asarray(out8[name]), np.asarray(out1[name]))
    k8, k1 = current_keep(s8, params), current_keep(s1, params)
    for name in params:
        np.testing.assert_array_equal(np.asarray(k8[name]), np.asarray(k1[name]))
    # dynamic, scored by Adam's second moment: the same, its moments sharded like the params
    tx = scale_by_dynamic_adam(0.3, every=2)
    (out8, s8), (out1, s1) = dyn(tx, sharded), dyn(tx, local)
    for name in params:
        assert out8[name].sharding.is_equivalent_to(shardings[name], out8[name].ndim), name
        assert s8.adam.nu[name].sharding.is_equivalent_to(shardings[name], out8[name].ndim), name
        np.testing.assert_allclose(np.asarray(out8[name]), np.asarray(out1[name]), rtol=1e-6)
        np.testing.assert_array_equal(np.asarray(current_keep(s8, params)[name]),
                                      np.asarray(current_keep(s1, params)[name]))
    print("SHARDING OK")
""")


def test_sharded_equals_single_device():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "SHARDING OK" in result.stdout
