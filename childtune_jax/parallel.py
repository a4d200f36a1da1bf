"""Meshes and shardings for training on every device: data parallelism and FSDP, multi-host.

JAX's own SPMD engine does the work: arrays carry ``NamedSharding`` s over a mesh with the
axes ``("data", "fsdp")``, and ``jax.jit`` partitions the step. The batch is split over both
axes; parameters (and so the optimizer state and Child-Tuning's masks, which follow them)
are replicated over ``data`` and, with ``fsdp > 1``, each large leaf is sharded along its
largest axis that ``fsdp`` divides.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

logger = logging.getLogger(__name__)

AXES = ("data", "fsdp")
BATCH_AXES = AXES  # the batch's leading axis is split over every device
MIN_SHARDED_SIZE = 2**16  # smaller leaves stay replicated: sharding them costs more than it saves


class MeshError(ValueError):
  """A mesh that does not fit the devices or the batch, reported in one line."""


def parse_mesh(spec: str | None, device_count: int) -> dict[str, int]:
  """``"data=4,fsdp=2"`` as ``{"data": 4, "fsdp": 2}``; ``None``: data over every device.

  A missing axis is 1, except that ``data`` takes what ``fsdp`` leaves when only ``fsdp``
  is given. The product must equal the number of devices.
  """
  if spec is None:
    return {"data": device_count, "fsdp": 1}
  axes: dict[str, int] = {}
  for part in spec.split(","):
    name, _, value = part.strip().partition("=")
    if name not in AXES or not value.isdigit() or int(value) < 1 or name in axes:
      raise MeshError(f"--mesh {spec!r}: expected data=N,fsdp=M with positive integers "
                      f"(axes {', '.join(AXES)})")
    axes[name] = int(value)
  if "data" not in axes:
    axes["data"] = device_count // axes.get("fsdp", 1)
  axes.setdefault("fsdp", 1)
  if axes["data"] * axes["fsdp"] != device_count:
    raise MeshError(f"--mesh {spec!r} has {axes['data'] * axes['fsdp']} devices, but "
                    f"{device_count} are visible (jax.devices())")
  return axes


def make_mesh(axes: dict[str, int]) -> Mesh:
  devices = np.array(jax.devices()).reshape(axes["data"], axes["fsdp"])
  return Mesh(devices, AXES)


def param_spec(shape: tuple[int, ...], fsdp: int) -> P:
  """Replicated, or sharded over ``fsdp`` along the largest axis that it divides."""
  if fsdp == 1 or math.prod(shape) < MIN_SHARDED_SIZE:
    return P()
  for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
    if shape[axis] % fsdp == 0:
      spec = [None] * len(shape)
      spec[axis] = "fsdp"
      return P(*spec)
  return P()


def shardings_by_shape(mesh: Mesh, tree: Any) -> Any:
  """A sharding for every leaf by :func:`param_spec` of its own shape.

  Applied to the parameters and to the optimizer state alike, so that Adam's moments, a
  dynamic score and a bool keep mask (each of its parameter's shape) shard exactly like
  their parameter; keys and counters are replicated.
  """
  return jax.tree_util.tree_map(
      lambda x: NamedSharding(mesh, param_spec(np.shape(x), mesh.shape["fsdp"])), tree)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def check_batch(mesh: Mesh | dict[str, int], rows: int, what: str) -> None:
  """Raises :class:`MeshError` unless ``rows`` (a batch size) divides over the mesh's devices.

  ``mesh``: a :class:`Mesh` or its axis sizes (as :func:`parse_mesh` returns them).
  """
  shape = dict(mesh.shape) if isinstance(mesh, Mesh) else dict(mesh)
  devices = shape["data"] * shape["fsdp"]
  if rows % devices:
    raise MeshError(f"{what} {rows} does not divide over {devices} devices (mesh {shape}): "
                    f"use a multiple of {devices}")


def put_batch(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """A global batch (the same NumPy arrays on every host) as arrays split over the mesh.

  Each process transfers only the rows of its own devices.
  """
  def put(x: np.ndarray) -> jax.Array:
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  return {k: put(np.asarray(v)) for k, v in batch.items()}


def is_primary() -> bool:
  """Whether this process writes results (process 0 of a multi-host run)."""
  return jax.process_index() == 0


def to_host(x: Any) -> np.ndarray:
  """``x`` as a NumPy array, gathered from every process when it is split across them.

  For an array sharded over several processes' devices this is a collective: every
  process must call it, with the same array, in the same order.
  """
  if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier ``name`` (nothing with one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


_DISTRIBUTED_ENV: tuple[tuple[str, Callable[[str], bool]], ...] = (
    ("JAX_COORDINATOR_ADDRESS", bool),
    ("TPU_WORKER_HOSTNAMES", lambda v: "," in v),  # a TPU pod slice: several hosts
    ("SLURM_NTASKS", lambda v: v.isdigit() and int(v) > 1),
    ("OMPI_COMM_WORLD_SIZE", lambda v: v.isdigit() and int(v) > 1),
)


def initialize_if_distributed() -> bool:
  """``jax.distributed.initialize()`` when the environment describes several processes.

  Recognised: ``JAX_COORDINATOR_ADDRESS`` (with ``JAX_NUM_PROCESSES`` and
  ``JAX_PROCESS_ID``), a TPU pod slice, SLURM and Open MPI launches; ``jax.distributed``
  reads the details from the same environment. Returns whether it initialised.
  """
  if not any(check(os.environ.get(name, "")) for name, check in _DISTRIBUTED_ENV):
    return False
  if jax.distributed.is_initialized():  # a second run in the same processes
    return True
  kwargs = {}
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    kwargs = {"coordinator_address": os.environ["JAX_COORDINATOR_ADDRESS"]}
    for env, key in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
      if os.environ.get(env):
        kwargs[key] = int(os.environ[env])
  jax.distributed.initialize(**kwargs)
  logger.info("process %d of %d, %d local of %d devices", jax.process_index(),
              jax.process_count(), jax.local_device_count(), jax.device_count())
  return True
