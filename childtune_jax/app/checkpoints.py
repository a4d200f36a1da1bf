"""Orbax checkpoints of a run: params, optimizer state (PRNG keys included), step, losses."""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from childtune_jax import _tree
from childtune_jax.app import interrupts


def _is_key(x: Any) -> bool:
  return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _keys_to_data(tree: Any) -> Any:
  return jax.tree_util.tree_map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _keys_from_data(tree: Any, like: Any) -> Any:
  return jax.tree_util.tree_map(
      lambda x, ref: jax.random.wrap_key_data(x, impl=jax.random.key_impl(ref)) if _is_key(ref)
      else x, tree, like)


class CheckpointError(Exception):
  """A checkpoint that cannot resume this run."""


def _check_restored(tree: Any, like: Any, directory: Any) -> None:
  for path, got, want in zip(_tree.leaf_paths(like), jax.tree_util.tree_leaves(tree),
                             jax.tree_util.tree_leaves(like)):
    if np.shape(got) != np.shape(want) or np.dtype(got.dtype) != np.dtype(want.dtype):
      raise CheckpointError(
          f"the checkpoint in {directory} does not fit this run's state at {path!r} "
          f"({got.dtype}{list(np.shape(got))} saved, {want.dtype}{list(np.shape(want))} "
          "expected; another configuration or version of childtune-jax?); "
          "delete it to start over")


class Checkpoints:
  """Orbax checkpoints of params, optimizer state (PRNG keys included) and step.

  Each save is written to a temporary folder and renamed when complete, so a run
  killed at any moment leaves the last complete checkpoint usable.
  """

  def __init__(self, directory: str):
    import orbax.checkpoint as ocp

    self._ocp = ocp
    self.manager = ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(max_to_keep=1, enable_async_checkpointing=False),
        item_handlers=ocp.StandardCheckpointHandler(),  # so that a new process reads metadata
    )

  def save(self, step: int, params: Any, opt_state: Any, losses: np.ndarray | None = None) -> None:
    """Saves a step; ``losses`` (optional) is the run's per-step training loss so far."""
    tree = {"params": params, "opt_state": _keys_to_data(opt_state)}
    if losses is not None:
      tree["losses"] = np.asarray(losses, np.float32)
    with interrupts.deferred():  # Ctrl-C waits for the save: no orbax thread cut off mid-write
      self.manager.save(step, args=self._ocp.args.StandardSave(tree), force=True)
      self.manager.wait_until_finished()

  def restore_latest(
      self, params: Any, opt_state: Any, losses: np.ndarray | None = None
  ) -> tuple[int, Any, Any, np.ndarray | None] | None:
    """``(step, params, opt_state, losses)`` of the latest checkpoint, or ``None``.

    ``params``, ``opt_state`` and ``losses`` give the structure to restore into;
    ``losses`` comes back ``None`` from a checkpoint saved without it.
    """
    step = self.manager.latest_step()
    if step is None:
      return None
    like = {"params": params, "opt_state": _keys_to_data(opt_state)}
    try:
      if losses is not None and "losses" in self.manager.item_metadata(step).keys():
        like["losses"] = np.asarray(losses, np.float32)
      abstract = jax.tree_util.tree_map(self._ocp.utils.to_shape_dtype_struct, like)
      tree = self.manager.restore(step, args=self._ocp.args.StandardRestore(abstract))
    except (ValueError, TypeError, KeyError) as e:
      raise CheckpointError(
          f"the checkpoint in {self.manager.directory} does not fit this run's state "
          f"(another configuration or version of childtune-jax, or a damaged file); delete "
          f"it to start over ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
      ) from None
    except Exception as e:  # noqa: BLE001 - a damaged checkpoint fails in many ways
      raise CheckpointError(
          f"the checkpoint in {self.manager.directory} cannot be read ({type(e).__name__}); "
          "delete it to start over") from None
    _check_restored(tree, like, self.manager.directory)
    return (step, tree["params"], _keys_from_data(tree["opt_state"], opt_state),
            np.asarray(tree["losses"]) if "losses" in tree else None)

  def close(self) -> None:
    self.manager.close()
