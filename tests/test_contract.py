"""One table of every Child-Tuning transformation through the same contract checks.

optax's ``contrib/_common_test.py`` pattern: each check runs on every entry of
:data:`TRANSFORMS`, so a new transformation is one entry and inherits them all. What each
check compares against is computed independently: the plain-pytree optax path for
``nnx.Optimizer``, an un-jitted or un-donated run for jit and donation, the bare
transformation for ``inject_hyperparams`` and ``MultiSteps``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from childtune_jax import (
    child_tuning_adamw,
    child_tuning_d,
    child_tuning_dynamic,
    child_tuning_dynamic_adamw,
    child_tuning_f,
    dps,
    pack_keep,
    scale_by_dynamic_adam,
)


class _Net(nnx.Module):
  """Two layers whose paths a ``where`` predicate can tell apart."""

  def __init__(self, rngs: nnx.Rngs):
    self.layer = nnx.Linear(6, 40, rngs=rngs)
    self.head = nnx.Linear(40, 3, rngs=rngs)

  def __call__(self, x):
    return self.head(jax.nn.tanh(self.layer(x)))


def _in_layer(path: str) -> bool:
  return path.startswith("layer/")


def _keep(params) -> dict:
  """A fixed child network of the parameters, as a plain dict (not an ``nnx.State``)."""
  rng = np.random.default_rng(7)
  return jax.tree_util.tree_map(lambda x: jnp.asarray(rng.random(np.shape(x)) < 0.4),
                                nnx.to_pure_dict(params) if isinstance(params, nnx.State)
                                else params)


@dataclasses.dataclass(frozen=True)
class Entry:
  """One transformation: ``make(params)`` builds it (``params`` for D's mask)."""

  make: Callable
  inject: Callable | None = None  # ``inject(params)``: an inject_hyperparams twin of ``make``


def _f_inject(params):
  del params
  return optax.inject_hyperparams(child_tuning_f, static_args=("key", "sampler"))(
      reserve_p=0.5, key=3)


def _dynamic_inject(params):
  del params
  return optax.inject_hyperparams(child_tuning_dynamic, static_args=("scope", "where"))(
      reserve_p=0.5, every=2, full_stage=1, where=_in_layer)


TRANSFORMS = {
    "F": Entry(lambda p: child_tuning_f(0.5, key=3), _f_inject),
    "F where": Entry(lambda p: child_tuning_f(0.5, key=3, where=_in_layer)),
    "F adamw": Entry(lambda p: child_tuning_adamw(1e-2, mode="F", reserve_p=0.5, key=3)),
    "D": Entry(lambda p: child_tuning_d(_keep(p))),
    "D packed": Entry(lambda p: child_tuning_d(_keep(p), packing="uint8")),
    "D pack_keep": Entry(lambda p: child_tuning_d(pack_keep(_keep(p), "uint32"))),
    "D adamw": Entry(lambda p: child_tuning_adamw(1e-2, mode="D", keep=_keep(p),
                                                  packing="uint8", freeze_non_child=True)),
    "dynamic": Entry(lambda p: child_tuning_dynamic(0.5, every=2, full_stage=1,
                                                    where=_in_layer), _dynamic_inject),
    "dps": Entry(lambda p: dps(0.5, stage_steps=2, where=_in_layer)),
    "dynamic adam": Entry(lambda p: scale_by_dynamic_adam(0.5, every=2, full_stage=1)),
    "dynamic adamw": Entry(lambda p: child_tuning_dynamic_adamw(1e-2, 0.5, every=2,
                                                                full_stage=1, where=_in_layer)),
}
ENTRIES = pytest.mark.parametrize("name", list(TRANSFORMS))


def _net() -> _Net:
  return _Net(nnx.Rngs(0))


def _batch(t: int):
  rng = np.random.default_rng(t)
  return jnp.asarray(rng.normal(size=(8, 6)), jnp.float32), jnp.asarray(rng.integers(0, 3, 8))


def _loss(model, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def _pure_params():
  return nnx.to_pure_dict(nnx.state(_net(), nnx.Param))


def _pure_loss(params, x, y):
  graphdef, state = nnx.split(_net())
  nnx.replace_by_pure_dict(state, params)
  return _loss(nnx.merge(graphdef, state), x, y)


def _plain_run(tx: optax.GradientTransformation, steps: int):
  """The reference: ``tx`` on a plain dict of the same parameters, optax's own way."""
  params = _pure_params()
  state = tx.init(params)

  @jax.jit
  def step(params, state, x, y):
    grads = jax.grad(_pure_loss)(params, x, y)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for t in range(steps):
    params, state = step(params, state, *_batch(t))
  return params


@ENTRIES
def test_nnx_optimizer_trains_as_the_plain_pytree(name):
  """``nnx.Optimizer`` (Variables at init, arrays at update) moves the model as optax does."""
  steps = 4
  model = _net()
  tx = TRANSFORMS[name].make(nnx.state(model, nnx.Param))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, x, y):
    grads = nnx.grad(_loss)(model, x, y)
    optimizer.update(model, grads)

  for t in range(steps):
    train_step(model, optimizer, *_batch(t))
  got = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  want = _plain_run(TRANSFORMS[name].make(_pure_params()), steps)
  start = _pure_params()
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                         got, want)
  moved = [not np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(got),
                                                     jax.tree_util.tree_leaves(start))]
  assert any(moved)


@ENTRIES
def test_init_sees_the_paths_update_sees(name):
  """A ``where`` predicate is asked about the same paths at init (Variables) and update."""
  seen = {"init": set(), "update": set()}
  phase = ["init"]

  def spy(path: str) -> bool:
    seen[phase[0]].add(path)
    return _in_layer(path)

  model = _net()
  params = nnx.state(model, nnx.Param)
  if name.startswith("F"):
    tx = child_tuning_f(0.5, key=0, where=spy)
  elif name.startswith("D"):
    pytest.skip("D masks every leaf of its keep: no predicate")
  elif name == "dps":
    tx = dps(0.5, stage_steps=2, where=spy)
  elif name.startswith("dynamic adam"):
    tx = scale_by_dynamic_adam(0.5, every=2, where=spy)
  else:
    tx = child_tuning_dynamic(0.5, every=2, where=spy)
  state = tx.init(params)
  phase[0] = "update"
  tx.update(nnx.as_pure(params), state, nnx.as_pure(params))
  assert seen["update"] == {"head/bias", "head/kernel", "layer/bias", "layer/kernel"}
  if seen["init"]:  # F asks only at update
    assert seen["init"] == seen["update"]


@ENTRIES
def test_jit_compiles_once_and_state_keeps_its_types(name):
  params = _pure_params()
  tx = TRANSFORMS[name].make(params)
  state = tx.init(params)
  before = jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), state)
  update = jax.jit(tx.update)
  eager = state
  for t in range(5):
    grads = jax.grad(_pure_loss)(params, *_batch(t))
    updates, state = update(grads, state, params)
    want, eager = tx.update(grads, eager, params)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                           updates, want)
  after = jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), state)
  assert jax.tree_util.tree_structure(before) == jax.tree_util.tree_structure(after)
  assert before == after
  assert update._cache_size() == 1


@ENTRIES
def test_donated_state_gives_the_same_updates(name):
  """A step that donates the state; ``init`` again afterwards (its inputs were copied)."""
  params = _pure_params()
  tx = TRANSFORMS[name].make(params)
  kept = tx.init(params)
  donating = jax.jit(tx.update, donate_argnums=1)
  state = tx.init(params)
  for t in range(3):
    grads = jax.grad(_pure_loss)(params, *_batch(t))
    got, state = donating(grads, state, params)
    want, kept = jax.jit(tx.update)(grads, kept, params)
    jax.tree_util.tree_map(np.testing.assert_array_equal, got, want)
  again = tx.init(params)  # a donated state did not delete what init copies from
  jax.tree_util.tree_map(lambda x: np.asarray(jax.random.key_data(x) if jnp.issubdtype(
      x.dtype, jax.dtypes.prng_key) else x), again)


def _dyadic_grads(params, t):
  """Gradients rounded to multiples of 2**-8: their mean over 2 is exact however it is
  summed, so that a network chosen by rank is the same in both computations."""
  return jax.tree_util.tree_map(lambda g: jnp.round(g * 256) / 256,
                                jax.grad(_pure_loss)(params, *_batch(t)))


@ENTRIES
def test_multisteps_accumulates_then_applies_the_transformation(name):
  """``MultiSteps(tx, k)``: k - 1 zero updates, then ``tx`` of the mean gradient."""
  k = 2
  params = _pure_params()
  tx = TRANSFORMS[name].make(params)
  multi = optax.MultiSteps(tx, every_k_schedule=k)
  state, inner = multi.init(params), tx.init(params)
  update = jax.jit(multi.update)
  for outer in range(3):
    grads = [_dyadic_grads(params, 10 * outer + i) for i in range(k)]
    for i, g in enumerate(grads):
      out, state = update(g, state, params)
      if i < k - 1:
        assert all(not np.any(np.asarray(x)) for x in jax.tree_util.tree_leaves(out))
    mean = jax.tree_util.tree_map(lambda *g: sum(g) / k, *grads)
    want, inner = tx.update(mean, inner, params)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                           out, want)


@pytest.mark.parametrize("name", [n for n, e in TRANSFORMS.items() if e.inject])
def test_inject_hyperparams_equals_the_plain_transformation(name):
  params = _pure_params()
  plain, injected = TRANSFORMS[name].make(params), TRANSFORMS[name].inject(params)
  a, b = plain.init(params), injected.init(params)
  update = jax.jit(injected.update)
  for t in range(4):
    grads = jax.grad(_pure_loss)(params, *_batch(t))
    want, a = plain.update(grads, a, params)
    got, b = update(grads, b, params)
    jax.tree_util.tree_map(np.testing.assert_array_equal, got, want)
  b.hyperparams["reserve_p"] = jnp.asarray(0.25, jnp.float32)
  update(grads, b, params)
  assert update._cache_size() == 1  # a new reserve_p, no new program


_EIGHT = """
import runpy, sys
import jax, jax.numpy as jnp, numpy as np, optax
from childtune_jax import parallel

assert jax.device_count() == 8, jax.devices()
table = runpy.run_path(sys.argv[1])
mesh = parallel.make_mesh(parallel.parse_mesh("data=2,fsdp=4", 8))
for name, entry in table["TRANSFORMS"].items():
  params = table["_pure_params"]()
  def spec(x):  # the first axis that 4 divides, over fsdp: every leaf here is split
    axes = [None] * x.ndim
    axes[next(i for i, n in enumerate(x.shape) if n % 4 == 0)] = "fsdp"
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*axes))

  shardings = jax.tree_util.tree_map(
      lambda x: spec(x) if any(n % 4 == 0 for n in x.shape) else parallel.replicated(mesh),
      params)
  runs = []
  for placed in (jax.device_put(params, jax.devices()[0]), jax.device_put(params, shardings)):
    tx = entry.make(placed)
    state = jax.jit(tx.init)(placed)
    step = jax.jit(tx.update)
    for t in range(4):
      grads = jax.grad(table["_pure_loss"])(placed, *table["_batch"](t))
      updates, state = step(grads, state, placed)
    runs.append((updates, state))
  (one, _), (eight, _) = runs
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(
      np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7), eight, one)
  kernel = eight["layer"]["kernel"]
  assert kernel.sharding.is_equivalent_to(shardings["layer"]["kernel"], 2), (name, kernel.sharding)
  print(name, "ok")
"""


def test_eight_devices_give_one_devices_updates():
  """Every transformation on 8 emulated CPU devices (a data x fsdp mesh) as on one."""
  import subprocess
  import sys

  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-c", _EIGHT, __file__], env=env, capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.split() == [w for name in TRANSFORMS for w in (*name.split(), "ok")]
