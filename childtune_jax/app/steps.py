"""The steps every run shares, whatever it trains: one seed's folder, mesh, optimizer,
jitted step, loop, checkpoints and results.

A run (``train``'s classifier, ``multitask``'s heads, ``sft``'s decoder) reads
:func:`start` (the mesh, the seed's record), its own loading, :func:`child_network` (the
mode's fixed network, or a saved one), :func:`init_optimizer` (the mode's optimizer inside
clipping, accumulation around both), :func:`make_train_step`, :func:`restore_or_start`,
:func:`run_steps` and :func:`write_outputs`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from childtune_jax import parallel
from childtune_jax._tree import Where
from childtune_jax.app import data, files, interrupts, maskfile, modes, provenance, stream
from childtune_jax.app.checkpoints import Checkpoints
from childtune_jax.app.config import TrainConfig
from childtune_jax.app.errors import TrainingFailed
from childtune_jax.app.tasks import TASKS, Task
from childtune_jax.masks import is_encoder_layer, kept_fraction

logger = logging.getLogger(__name__)

SELECTION = "selection"  # the name of the selection split among the evaluation splits
STREAM_EVERY = 10  # steps between reads of the device's metrics (each read waits for it)


@jax.jit
def _finite(tree: Any) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]))


def _all_finite(tree: Any) -> bool:
  """Whether every parameter is finite; one compiled check, reused at every epoch and save."""
  return bool(_finite(tree))


STREAMS = ("dropout", "child")  # the random streams a run draws from, each its own


def stream_key(seed: int, stream: str) -> jax.Array:
  """The base key of one random stream of the run with ``seed``.

  Each stream folds a distinct tag into ``key(seed)``, so that step ``s`` of the dropout
  stream and draw ``s`` of Child-Tuning_F's masks never share a key.
  """
  return jax.random.fold_in(jax.random.key(seed), STREAMS.index(stream) + 1)


def linear_warmup_decay(learning_rate: float, total: int, warmup_ratio: float) -> optax.Schedule:
  """Hugging Face's linear schedule with warmup, as the reference's vanilla run uses it."""
  warmup = math.ceil(total * warmup_ratio)
  decay = optax.linear_schedule(learning_rate, 0.0, max(total - warmup, 1))
  if not warmup:
    return decay
  return optax.join_schedules(
      [optax.linear_schedule(0.0, learning_rate, warmup), decay], [warmup]
  )

def check_finite(losses: list, params: Any, step: int, ckpt: Checkpoints) -> None:
  """Stops a run whose loss or parameters are no longer finite (before any checkpoint of them).

  The losses' device scalars become Python floats in place, each read from the device once.
  """
  for i in range(len(losses) - 1, -1, -1):  # the new ones are at the end
    if isinstance(losses[i], float):
      break
    losses[i] = float(losses[i])
  values = np.array(losses, np.float64)
  bad = np.flatnonzero(~np.isfinite(values))
  if bad.size or not _all_finite(params):
    where = f"at step {bad[0] + 1}" if bad.size else f"in the parameters by step {step}"
    last = ckpt.manager.latest_step()
    kept = f"; the last good checkpoint (step {last}) is kept" if last else ""
    raise TrainingFailed(f"training diverged: a non-finite loss {where} (learning rate too "
                         f"high?){kept}")


@dataclasses.dataclass
class Run:
  """What every step of one seed's run shares: its configuration, mesh and records."""

  cfg: TrainConfig
  task: Task
  out_dir: str
  mesh: jax.sharding.Mesh
  axes: dict[str, int]
  primary: bool  # only process 0 writes results, masks and the model
  results: dict[str, Any]  # what results.json will hold, filled in by the steps
  timings: dict[str, float]
  scope: Where = is_encoder_layer  # the leaves a child network is chosen among
  report_to: str = "auto"  # where the metrics stream goes besides metrics.jsonl
  stream: Any = None  # the MetricsStream, from restore_or_start on

  @property
  def eval_rows(self) -> int:
    """The evaluation batch size, rounded up to a multiple of the devices."""
    devices = self.axes["data"] * self.axes["fsdp"]
    return -(-self.cfg.eval_batch_size // devices) * devices


@dataclasses.dataclass
class TrainState:
  """What the loop carries from step to step; a checkpoint saves all but ``history``."""

  step: int
  params: Any
  opt_state: Any
  losses: list  # per step, device scalars until read (reading each would sync every step)
  history: dict[str, Any]  # selection score per epoch, dynamic network changes

  def all_losses(self, total_steps: int) -> np.ndarray:
    """The per-step losses, NaN for the steps still to come (a checkpoint's fixed shape)."""
    return np.array([float(x) for x in self.losses] + [np.nan] * (total_steps - len(self.losses)))


def start(cfg: TrainConfig, out_dir: str, task: Task | None = None,
          report_to: str = "auto") -> Run:
  """The mesh and the seed's folder (see :func:`record_config`).

  ``task``: the run's task (default ``data.TASKS[cfg.task]``; a multi-task run's first);
  ``report_to``: TensorBoard or not, besides ``metrics.jsonl`` (:mod:`.stream`).
  """
  task = task or TASKS[cfg.task]
  axes = parallel.parse_mesh(cfg.mesh, jax.device_count())
  mesh = parallel.make_mesh(axes)
  parallel.check_batch(mesh, cfg.batch_size, "--batch-size")
  primary = parallel.is_primary()
  results: dict[str, Any] = {"config": dataclasses.asdict(cfg)}
  return Run(cfg, task, out_dir, mesh, axes, primary, results, timings={},
             report_to=report_to)


def record_config(r: Run) -> None:
  """A fresh seed folder records what a resume must match (``run.json``), once the model and
  data have loaded: a run that fails to load them leaves no folder behind."""
  os.makedirs(r.out_dir, exist_ok=True)
  if r.primary and not os.listdir(r.out_dir):
    files.write_json(os.path.join(r.out_dir, files.RUN_FILE),
                     {"config": dataclasses.asdict(r.cfg)})


def place(r: Run, params: Any) -> Any:
  """Parameters on the mesh, from the host: each process places its devices' shards of the
  values every process holds. Records the devices (and the host's ``malloc``, which sets the
  CPU's speed) in the results."""
  r.results["device"] = {"kind": jax.devices()[0].device_kind, "count": jax.device_count(),
                         "processes": jax.process_count(), "mesh": r.axes, "dtype": r.cfg.dtype,
                         "malloc": provenance.malloc_library()}
  return jax.device_put(jax.device_get(params), parallel.shardings_by_shape(r.mesh, params))


def child_network(r: Run, source: modes.NetworkSource, params: Any, *, resume: bool) -> Any:
  """The fixed child network of the run's mode (``None`` for a mode without one), saved.

  It comes from a resumed run's own file, a given ``cfg.child_mask``, or the mode's
  :attr:`~childtune_jax.app.modes.Mode.network` from ``source`` (a Fisher pass, a draw).
  """
  mode = modes.MODES[r.cfg.mode]
  if mode.network is None:
    return None
  mask_path = os.path.join(r.out_dir, files.MASK_FILE)
  if resume and os.path.exists(mask_path):
    keep, reserve_p = maskfile.load(mask_path, params), maskfile.record(mask_path).reserve_p
  elif r.cfg.child_mask:
    keep, reserve_p = given_network(r, params)
  else:
    keep, reserve_p = mode.network(r, source)
  record_network(r, keep, mask_path, reserve_p)
  return keep


def given_network(r: Run, params: Any) -> tuple[Any, float | None]:
  """The network of ``cfg.child_mask`` (``{seed}``: this seed's file) and its saved reserve_p.

  Its SHA-256 goes into results.json. A file that records a reserve_p other than the run's
  is refused (the CLI checks this before any run starts).
  """
  given = files.for_seed(r.cfg.child_mask, r.cfg.seed)
  rec = maskfile.record(given)
  maskfile.check_given(given, rec, reserve_p=r.cfg.reserve_p, seed=r.cfg.seed)
  keep = maskfile.load(given, params)
  r.results["child_mask_sha256"] = files.sha256(given)
  return keep, rec.reserve_p


def record_network(r: Run, keep: Any, mask_path: str, reserve_p: float | None) -> None:
  """Saves a fixed child network (gathered by every process) and records and logs its size.

  ``reserve_p``: the fraction that sized it, saved in the file (``None``: unknown, or sized
  otherwise).
  """
  host_keep = jax.tree_util.tree_map(parallel.to_host, keep)
  if r.primary:
    maskfile.save(mask_path, host_keep, reserve_p=reserve_p, seed=r.cfg.seed)
  kept, total = kept_fraction(keep, where=r.scope)
  r.results["child_network"] = {"kept": kept, "total": total, "fraction": kept / total}
  logger.info("child network: %d of %d %s scalars (%.2f%%)%s", kept, total,
              "encoder-layer" if r.scope is is_encoder_layer else "selected", 100 * kept / total,
              f", Fisher pass {r.timings['fisher_s']:.1f}s" if "fisher_s" in r.timings else "")


@dataclasses.dataclass(frozen=True)
class Plan:
  """How many steps a run takes: micro-batch steps, and the optimizer steps they make."""

  steps_per_epoch: int
  total_steps: int
  optimizer_steps: int  # what the schedule (and a dynamic network's stages) count

  @classmethod
  def of(cls, cfg: TrainConfig, train_examples: int) -> Plan:
    per_epoch = math.ceil(train_examples / cfg.batch_size)
    total = per_epoch * cfg.epochs
    return cls(per_epoch, total, math.ceil(total / cfg.grad_accum))


def make_optimizer(r: Run, plan: Plan, keep: Any, params: Any
                   ) -> optax.GradientTransformation:
  """Clipping, then the mode's optimizer (:attr:`Mode.optimizer`); ``optax.MultiSteps``
  around both to accumulate."""
  cfg = r.cfg
  schedule = linear_warmup_decay(cfg.learning_rate, plan.optimizer_steps, cfg.warmup_ratio)
  adamw = dict(b1=0.9, b2=0.999, eps=1e-6, weight_decay=cfg.weight_decay)
  core = modes.MODES[cfg.mode].optimizer(modes.Optimizing(r, plan, schedule, adamw, keep, params))
  tx = optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), core)
  if cfg.grad_accum > 1:  # the mask inside: one mask per optimizer step, as the reference
    tx = optax.MultiSteps(tx, every_k_schedule=cfg.grad_accum).gradient_transformation()
  return tx


def init_optimizer(r: Run, plan: Plan, keep: Any, params: Any
                   ) -> tuple[optax.GradientTransformation, Any]:
  """The run's optimizer and its state, made in place with the state's shardings.

  D's network enters the jitted ``init`` as an argument: closed over, it would be compiled
  in as a constant, and XLA would constant-fold its bit-packing (seconds a leaf, with a
  warning on the console).
  """
  tx = make_optimizer(r, plan, keep, params)

  def init(params: Any, keep: Any) -> Any:
    if keep is None:
      return tx.init(params)
    return make_optimizer(r, plan, keep, params).init(params)  # the same, with ``keep`` traced

  shardings = parallel.shardings_by_shape(r.mesh, jax.eval_shape(tx.init, params))
  return tx, jax.jit(init, out_shardings=shardings)(params, keep)


def make_train_step(r: Run, loss_fn: Callable, tx: optax.GradientTransformation, params: Any,
                    opt_state: Any) -> Callable:
  """``train_step(params, opt_state, batch, step) -> (params, opt_state, metrics)``, jitted.

  ``metrics`` holds the batch's ``loss``, the gradient's global norm before clipping
  (``grad_norm``) and what the mode measures of its step (F's and a dynamic network's
  ``kept_fraction``). Parameters and optimizer state keep their shardings (donated, updated
  in place); the dropout key of micro-batch ``step`` is ``fold_in(stream_key(seed,
  "dropout"), step)``.
  """
  dropout_key = stream_key(r.cfg.seed, "dropout")
  mode = modes.MODES[r.cfg.mode]
  measure = mode.step_metrics(r) if mode.step_metrics else None

  @partial(jax.jit, donate_argnums=(0, 1),
           out_shardings=(parallel.shardings_by_shape(r.mesh, params),
                          parallel.shardings_by_shape(r.mesh, opt_state),
                          parallel.replicated(r.mesh)))
  def train_step(params: Any, opt_state: Any, batch: dict, step: jax.Array):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch, jax.random.fold_in(dropout_key, step))
    updates, new_state = tx.update(grads, opt_state, params)
    norm = jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32)))
                        for g in jax.tree_util.tree_leaves(grads)))
    metrics = {"loss": loss, "grad_norm": norm}
    if measure is not None:
      metrics.update(measure(opt_state, new_state, grads))
    return optax.apply_updates(params, updates), new_state, metrics

  return train_step


def restore_or_start(r: Run, plan: Plan, ckpt: Checkpoints, params: Any, opt_state: Any,
                     resume: bool) -> TrainState:
  """Step 0, or the latest checkpoint's state (with the history kept beside it)."""
  state = TrainState(0, params, opt_state, [], {"selection": {}, "networks": []})
  history_path = os.path.join(r.out_dir, files.HISTORY_FILE)
  if not resume:
    r.stream = stream.MetricsStream(r.out_dir, start=0, report_to=r.report_to,
                                    primary=r.primary)
    return state
  if os.path.exists(history_path):
    with open(history_path) as f:
      state.history = json.load(f)
  restored = ckpt.restore_latest(params, opt_state, state.all_losses(plan.total_steps))
  if restored is not None:
    state.step, state.params, state.opt_state, saved_losses = restored
    if saved_losses is not None:
      state.losses = [float(x) for x in saved_losses[:state.step]]
    logger.info("resuming %s at step %d of %d", r.out_dir, state.step, plan.total_steps)
  # What the killed run recorded after its last checkpoint is recomputed, bitwise alike.
  state.history["networks"] = [n for n in state.history["networks"]
                               if n["step"] < state.step // r.cfg.grad_accum]
  r.stream = stream.MetricsStream(r.out_dir, start=state.step, report_to=r.report_to,
                                  primary=r.primary)
  return state


def write_history(r: Run, state: TrainState) -> None:
  """Keeps the history beside the checkpoints (process 0), for a resumed run."""
  if r.primary:
    files.write_json(os.path.join(r.out_dir, files.HISTORY_FILE), state.history)


def run_steps(r: Run, plan: Plan, state: TrainState, train_step: Callable,
              next_batch: Callable[[int], dict], ckpt: Checkpoints, *,
              selection: Callable[[Any], Any] | None = None,
              after_step: Callable[[int], None] | None = None) -> TrainState:
  """Trains from ``state.step`` to the end, checking, scoring and checkpointing on the way.

  ``next_batch(step)`` is the host batch of micro-batch ``step``; ``after_step(step)`` runs
  after each (``step`` counts the steps taken). After every epoch but the last,
  ``selection(params)`` (if given, and unless it returns ``None``) goes to the history, kept
  beside the checkpoints, so that a resumed run has it all.
  """
  cfg = r.cfg
  sharding = parallel.batch_sharding(r.mesh)
  schedule = linear_warmup_decay(cfg.learning_rate, plan.optimizer_steps, cfg.warmup_ratio)
  pending: list[tuple[int, dict]] = []  # device metrics not yet streamed

  def flush() -> None:  # one read of the device values, every few steps
    for step, metrics in jax.device_get(pending):
      r.stream.write(step, {"train/learning_rate": float(schedule((step - 1) // cfg.grad_accum)),
                            **{f"train/{k}": float(v) for k, v in metrics.items()}})
    pending.clear()

  t = time.perf_counter()
  with tqdm(total=plan.total_steps, initial=state.step, desc=f"train seed {cfg.seed}",
            unit="step", disable=None) as bar:
    while state.step < plan.total_steps:
      state.params, state.opt_state, metrics = train_step(
          state.params, state.opt_state, parallel.put_batch(next_batch(state.step), sharding),
          jnp.int32(state.step))
      state.step += 1
      state.losses.append(metrics["loss"])
      pending.append((state.step, metrics))
      bar.update(1)
      step = state.step
      if after_step is not None:
        after_step(step)
      end_of_epoch = step % plan.steps_per_epoch == 0
      saving = bool(cfg.save_every and step % cfg.save_every == 0 and step < plan.total_steps)
      if end_of_epoch or saving or step == plan.total_steps:
        check_finite(state.losses, state.params, step, ckpt)
      if len(pending) >= STREAM_EVERY or end_of_epoch or saving or step == plan.total_steps:
        flush()
      if selection is not None and end_of_epoch and step < plan.total_steps:
        score = selection(state.params)
        if score is not None:
          state.history["selection"][str(step // plan.steps_per_epoch)] = score
          write_history(r, state)
          r.stream.evaluation(step, {SELECTION: score})
      if saving:
        ckpt.save(step, state.params, state.opt_state, state.all_losses(plan.total_steps))
  jax.block_until_ready(state.params)
  r.timings["train_s"] = time.perf_counter() - t
  return state


def epoch_batches(plan: Plan, cfg: TrainConfig, n: int, make: Callable[[np.ndarray], dict]
                  ) -> Callable[[int], dict]:
  """``next_batch(step)``: ``make(index)`` of the step's rows of ``n`` training examples, in
  each epoch's shuffled order (a function of the seed and the epoch)."""
  orders: dict[int, np.ndarray] = {}

  def next_batch(step: int) -> dict:
    epoch, offset = divmod(step, plan.steps_per_epoch)
    if epoch not in orders:
      orders.clear()
      orders[epoch] = data.epoch_order(n, cfg.seed, epoch)
    return make(orders[epoch][offset * cfg.batch_size:(offset + 1) * cfg.batch_size])

  return next_batch


def run_epochs(r: Run, plan: Plan, state: TrainState, train_step: Callable, n: int,
               make: Callable[[np.ndarray], dict], ckpt: Checkpoints, *,
               selection: Callable[[Any], Any] | None = None) -> TrainState:
  """:func:`run_steps` over ``n`` training examples in each epoch's order, with what the
  mode records as it trains (its :attr:`~childtune_jax.app.modes.Mode.tracker`)."""
  mode = modes.MODES[r.cfg.mode]
  after_step = mode.tracker(r, state) if mode.tracker else None
  return run_steps(r, plan, state, train_step, epoch_batches(plan, r.cfg, n, make), ckpt,
                   selection=selection, after_step=after_step)


def record_results(r: Run, plan: Plan, state: TrainState, metrics: dict[str, dict],
                   main: str) -> None:
  """A finished run's training losses, metrics by split and scores, into its results.

  ``score``: the ``main`` metric on the task's own evaluation (dev/test) splits (another
  task's, ``TASK/SPLIT``, are transfer results, apart); ``selection_score``: on the
  selection split, the only one a hyperparameter search may look at.
  """
  cfg, results = r.cfg, r.results
  losses = [float(x) for x in state.losses]
  per_epoch = plan.steps_per_epoch
  results["train_loss_last_epoch"] = float(np.mean(losses[-per_epoch:])) if losses else None
  results["train_loss_per_epoch"] = [
      float(np.mean(losses[e * per_epoch:(e + 1) * per_epoch])) for e in range(cfg.epochs)
  ] if len(losses) == plan.total_steps else None
  results["train_losses"] = losses
  results["metrics"] = metrics
  r.stream.evaluation(state.step, metrics)
  tests = [m[main] for name, m in metrics.items() if name != SELECTION and "/" not in name]
  results["score"] = float(np.mean(tests)) if tests and None not in tests else None
  if SELECTION in metrics:
    results["selection_score"] = metrics[SELECTION][main]
    state.history["selection"][str(cfg.epochs)] = metrics[SELECTION]
    results["selection_by_epoch"] = [state.history["selection"].get(str(e), {}).get(main)
                                     for e in range(1, cfg.epochs + 1)]
  mode = modes.MODES[cfg.mode]
  if mode.finish_record:
    mode.finish_record(r, state)


def write_outputs(r: Run, plan: Plan, state: TrainState, ckpt: Checkpoints,
                  save: Callable[[str, Any], None]) -> dict:
  """Closes a finished run: results.json, the model (``save(folder, params)``, written whole
  or not at all), the checkpoints and history removed. Only process 0 writes."""
  results = r.results
  results["timings"] = r.timings
  results["steps"] = plan.total_steps
  results["versions"] = provenance.versions()
  ckpt.close()
  if r.stream is not None:
    r.stream.close()
  if r.cfg.save_model:  # gathered by every process (the parameters may span several)
    params = jax.tree_util.tree_map(parallel.to_host, state.params)
  with interrupts.deferred():  # a finished seed's files are written whole
    if r.primary:
      _write_finished(r, save, params if r.cfg.save_model else None)
  parallel.barrier(f"finished {r.out_dir}")  # no process reads a half-written folder
  return results


def _write_finished(r: Run, save: Callable[[str, Any], None], params: Any) -> None:
  """The model (whole or not at all; ``None``: not saved), results.json; then the
  checkpoints and history go."""
  if params is not None:
    model_dir = os.path.join(r.out_dir, files.MODEL_DIR)
    tmp = model_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
      save(tmp, params)
    except BaseException:
      shutil.rmtree(tmp, ignore_errors=True)
      raise
    shutil.rmtree(model_dir, ignore_errors=True)
    os.replace(tmp, model_dir)
  files.write_json(os.path.join(r.out_dir, files.RESULTS_FILE), r.results)
  shutil.rmtree(os.path.join(r.out_dir, files.CHECKPOINT_DIR), ignore_errors=True)
  history_path = os.path.join(r.out_dir, files.HISTORY_FILE)
  if os.path.exists(history_path):
    os.remove(history_path)
