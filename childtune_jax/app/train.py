"""One seed of a fine-tuning run, as named steps.

:func:`run` reads top to bottom: :func:`start` (the mesh and the seed's folder),
:func:`load` (model, tokenizer, encoded splits), :func:`child_network` (D's Fisher mask or
a saved one), :func:`make_optimizer` (Child-Tuning inside AdamW, accumulation around it),
:func:`make_train_step` (one jitted, sharded step), :func:`restore_or_start`,
:func:`train_loop` and :func:`finish` (evaluate, write the results and the model). The mesh
lives in :func:`start`, the precision in :func:`load` (the model's compute ``dtype``; the
parameters stay float32) and gradient accumulation in :func:`make_optimizer`.
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

from childtune_jax import _tree, parallel
from childtune_jax.app import data, files, interrupts, loading, maskfile
from childtune_jax.app.checkpoints import Checkpoints
from childtune_jax.app.errors import TrainingFailed
from childtune_jax.app.loading import DEFAULT_MODEL
from childtune_jax.app.metrics import glue_metrics
from childtune_jax.dynamic import (
    ChildTuningDynamicState,
    DynamicAdamState,
    child_tuning_dynamic,
    child_tuning_dynamic_adamw,
)
from childtune_jax.fisher import fisher_information
from childtune_jax.masks import fisher_mask, is_encoder_layer, jaccard, kept_fraction, random_keep
from childtune_jax.transform import child_tuning_adamw, default_weight_decay_mask

logger = logging.getLogger(__name__)

MODES = ("vanilla", "F", "D", "random", "dynamic")
SELECTION = "selection"  # the name of the selection split among the evaluation splits


@dataclasses.dataclass
class TrainConfig:
  """One fine-tuning run; the defaults follow the reference code's run script."""

  task: str
  mode: str
  seed: int = 42
  reserve_p: float = 0.3
  model: str = DEFAULT_MODEL
  learning_rate: float = 4e-5
  batch_size: int = 16
  epochs: int = 3
  warmup_ratio: float = 0.1
  weight_decay: float = 0.01
  max_seq_length: int = 128
  pad_multiple: int = 16
  max_grad_norm: float = 1.0
  max_train_samples: int | None = None
  fisher: str = "per-example"
  fisher_microbatch: int = 8
  freeze_non_child: bool = False
  sampler: str = "hash8"
  save_every: int | None = None
  save_model: bool = True
  init_seed: int | None = None  # the new head's initialisation; None: ``seed``
  eval_batch_size: int = 64
  random_like: str | None = None  # mode random: the D mask whose size to match ("{seed}": per seed)
  selection_samples: int | None = None  # a selection split carved from the training file
  eval_dev: bool = True  # False: score the selection split only (tuning runs)
  child_mask: str | None = None  # mode D: this saved mask, not a Fisher pass ("{seed}": per seed)
  every: int | None = None  # dynamic: steps between re-selections; None: 5% of the steps
  full_stage: int | None = None  # dynamic: full-update steps first; None: ``every``
  dynamic_score: str = "ema"  # dynamic: "ema" of squared gradients, or "adam" (its nu)
  score_decay: float = 0.99  # dynamic, "ema": the EMA decay of the squared-gradient score
  mesh: str | None = None  # "data=N,fsdp=M"; None: data parallelism over every device
  dtype: str = "float32"  # compute dtype; parameters and optimizer state stay float32
  grad_accum: int = 1  # micro-batches per optimizer step (optax.MultiSteps)
  backend: str = "nnx"  # "nnx": childtune_jax.models; "hf-flax": transformers' Flax classes
  train_split: str = "train"  # the split of the data folder trained on
  heldout_samples: int | None = None  # a held-out test split carved from the training file
  eval_tasks: str | None = None  # "sick:test,...": other tasks' splits scored as TASK/SPLIT

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

def source_commit() -> str | None:
  """The git commit of this package's checkout (``+dirty`` with uncommitted changes), if any."""
  import subprocess

  here = os.path.dirname(os.path.abspath(__file__))
  def git(*args: str) -> str:
    return subprocess.run(["git", "-C", here, *args], capture_output=True, text=True,
                          timeout=10, check=True).stdout.strip()

  try:  # an installed copy inside some other checkout is not that checkout's code
    git("ls-files", "--error-unmatch", os.path.basename(__file__))
    commit = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", here)
  except (OSError, subprocess.SubprocessError):
    return None
  return commit + ("+dirty" if dirty else "") if commit else None


def versions() -> dict[str, str]:
  """Versions of the libraries a result depends on, and the package's git commit if known."""
  import importlib.metadata as md

  out = {}
  packages = ("childtune-jax", "jax", "jaxlib", "flax", "optax", "transformers", "orbax-checkpoint")
  for pkg in packages:
    try:
      out[pkg] = md.version(pkg)
    except md.PackageNotFoundError:
      pass
  commit = source_commit()
  if commit:
    out["childtune-jax commit"] = commit
  return out


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


def _dynamic_state(opt_state: Any) -> ChildTuningDynamicState | DynamicAdamState:
  """The dynamic child network's state inside an optimizer state."""
  kinds = (ChildTuningDynamicState, DynamicAdamState)
  found = [x for x in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, kinds))
           if isinstance(x, kinds)]
  if len(found) != 1:
    raise ValueError(f"expected one dynamic child network in the optimizer state, got {len(found)}")
  return found[0]


def _network_change(network: dict, opt_state: Any, step: int) -> dict:
  """The size of the dynamic network just selected, and its Jaccard with the one before."""
  keep = _dynamic_state(opt_state).keep
  words = jax.tree_util.tree_leaves(keep)
  kept = sum(int(jnp.sum(jax.lax.population_count(w).astype(jnp.uint32))) for w in words)
  previous, network["previous"] = network["previous"], jax.tree_util.tree_map(jnp.copy, keep)
  return {"step": step, "kept": kept, "jaccard_previous": jaccard(keep, previous)}


@dataclasses.dataclass
class Run:
  """What every step of one seed's run shares: its configuration, mesh and records."""

  cfg: TrainConfig
  task: data.Task
  out_dir: str
  mesh: jax.sharding.Mesh
  axes: dict[str, int]
  primary: bool  # only process 0 writes results, masks and the model
  results: dict[str, Any]  # what results.json will hold, filled in by the steps
  timings: dict[str, float]

  @property
  def eval_rows(self) -> int:
    """The evaluation batch size, rounded up to a multiple of the devices."""
    devices = self.axes["data"] * self.axes["fsdp"]
    return -(-self.cfg.eval_batch_size // devices) * devices


@dataclasses.dataclass
class Splits:
  """The tokenised splits of one run."""

  train: data.Encoded
  evals: dict[str, data.Encoded]  # by name: dev (and test), and the selection split if any
  pad_id: int


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


def start(cfg: TrainConfig, out_dir: str, task: data.Task | None = None) -> Run:
  """The mesh and the seed's folder (see :func:`record_config`).

  ``task``: the run's task (default ``data.TASKS[cfg.task]``; a multi-task run's first).
  """
  task = task or data.TASKS[cfg.task]
  axes = parallel.parse_mesh(cfg.mesh, jax.device_count())
  mesh = parallel.make_mesh(axes)
  parallel.check_batch(mesh, cfg.batch_size, "--batch-size")
  primary = parallel.is_primary()
  results: dict[str, Any] = {"config": dataclasses.asdict(cfg)}
  return Run(cfg, task, out_dir, mesh, axes, primary, results, timings={})


def record_config(r: Run) -> None:
  """A fresh seed folder records what a resume must match (``run.json``), once the model and
  data have loaded: a run that fails to load them leaves no folder behind."""
  os.makedirs(r.out_dir, exist_ok=True)
  if r.primary and not os.listdir(r.out_dir):
    files.write_json(os.path.join(r.out_dir, files.RUN_FILE),
                     {"config": dataclasses.asdict(r.cfg)})


def classifier_for(cfg: TrainConfig, task: data.Task) -> tuple[loading.Classifier, Any]:
  """The run's model for ``task`` (``cfg.dtype`` compute, head from the init seed), tokenizer."""
  init_seed = cfg.seed if cfg.init_seed is None else cfg.init_seed
  return loading.load_classifier(cfg.model, task.num_labels, init_seed,
                                 getattr(jnp, cfg.dtype), cfg.backend, labels=task.labels)


def make_splits(cfg: TrainConfig, tokenizer: Any, train_set: data.Examples,
                evals: dict[str, data.Examples]) -> tuple[Splits, dict[str, str]]:
  """The seed's encoded splits (its training subset, its selection split) and their digests."""
  evals = dict(evals) if cfg.eval_dev else {}
  train_set, selection = data.training_split(train_set, cfg.max_train_samples,
                                             cfg.selection_samples, cfg.seed)
  if selection is not None:
    evals[SELECTION] = selection
  splits = Splits(train=data.encode(tokenizer, train_set, cfg.max_seq_length),
                  evals={k: data.encode(tokenizer, v, cfg.max_seq_length)
                         for k, v in evals.items()},
                  pad_id=tokenizer.pad_token_id or 0)
  digests = {"train": train_set.digest(), **{k: v.digest() for k, v in evals.items()}}
  return splits, digests


ALLOCATORS = ("tcmalloc", "jemalloc", "mimalloc")


def malloc_library() -> str:
  """The ``malloc`` this process runs on: a preloaded allocator's file name (e.g.
  ``libtcmalloc_minimal.so.4``, which makes CPU training faster: README, "Speed"), else
  ``"default"``; ``"unknown"`` where ``/proc/self/maps`` cannot be read."""
  try:
    with open("/proc/self/maps") as f:
      names = {os.path.basename(line.split()[-1]) for line in f if "/" in line}
  except OSError:
    return "unknown"
  found = sorted(n for n in names if any(a in n for a in ALLOCATORS))
  return found[0] if found else "default"


def place(r: Run, params: Any) -> Any:
  """Parameters on the mesh, from the host: each process places its devices' shards of the
  values every process holds. Records the devices (and the host's ``malloc``, which sets the
  CPU's speed) in the results."""
  r.results["device"] = {"kind": jax.devices()[0].device_kind, "count": jax.device_count(),
                         "processes": jax.process_count(), "mesh": r.axes, "dtype": r.cfg.dtype,
                         "malloc": malloc_library()}
  return jax.device_put(jax.device_get(params), parallel.shardings_by_shape(r.mesh, params))


def load(r: Run, train_set: data.Examples, evals: dict[str, data.Examples]
         ) -> tuple[loading.Classifier, Splits]:
  """The model (float32 parameters on the mesh, ``cfg.dtype`` compute) and the encoded splits."""
  t = time.perf_counter()
  model, tokenizer = classifier_for(r.cfg, r.task)
  splits, digests = make_splits(r.cfg, tokenizer, train_set, evals)
  r.results["train_examples"] = len(splits.train)
  r.results["data_sha256"] = digests
  model.params = place(r, model.params)
  r.timings["load_s"] = time.perf_counter() - t
  record_config(r)
  return model, splits


def make_loss(task: data.Task, logits_fn: Callable) -> Callable:
  """``loss(params, batch, dropout_rng=None)``: the mean loss over the batch's real rows."""

  def loss_fn(params: Any, batch: dict, dropout_rng: jax.Array | None = None) -> jax.Array:
    logits = logits_fn(params, batch, dropout_rng).astype(jnp.float32)
    if task.is_regression:
      losses = jnp.square(logits[:, 0] - batch["labels"])
    else:
      losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
    weights = batch["weights"]
    return jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1.0)

  return loss_fn


def child_network(r: Run, loss_fn: Callable, params: Any, splits: Splits, *, resume: bool,
                  keep_like_d: str | None) -> Any:
  """The fixed child network of modes D and random (``None`` for the others), saved.

  D's comes from a resumed run's own file, a given ``cfg.child_mask``, or a Fisher pass
  over the training split (sharded over the mesh's devices).
  """
  cfg = r.cfg
  if cfg.mode not in ("D", "random"):
    return None
  mask_path = os.path.join(r.out_dir, files.MASK_FILE)
  reserve_p = cfg.reserve_p  # what sized the network, saved with it
  if resume and os.path.exists(mask_path):
    keep, reserve_p = maskfile.load(mask_path, params), maskfile.record(mask_path).reserve_p
  elif cfg.child_mask:
    keep, reserve_p = given_network(r, params)
  elif cfg.mode == "D":
    t = time.perf_counter()
    keep = fisher_mask(fisher_pass(r, loss_fn, params, splits), cfg.reserve_p,
                       where=is_encoder_layer)
    r.timings["fisher_s"] = time.perf_counter() - t
  else:
    size = {"reserve_p": cfg.reserve_p}
    if keep_like_d:
      size = {"count": kept_fraction(maskfile.load(keep_like_d, params),
                                     where=is_encoder_layer)[0]}
      reserve_p = None
    keep = random_keep(cfg.seed + 1_000_003, params, **size, where=is_encoder_layer)
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


def fisher_pass(r: Run, loss_fn: Callable, params: Any, splits: Splits) -> Any:
  """The Fisher information on the training split, sharded over the mesh's devices.

  ``cfg.fisher``: ``per-example`` (the paper's) or ``per-batch`` (the reference code's,
  with its per-tensor clip); batches in the seed's Fisher order.
  """
  cfg = r.cfg
  several = jax.device_count() > 1
  order = data.fisher_order(len(splits.train), cfg.seed)
  batches = list(data.batches(splits.train, cfg.batch_size, cfg.max_seq_length, splits.pad_id,
                              order, bucket=cfg.pad_multiple, pad_rows=several))
  if several:  # split over the mesh (padding rows have weight 0)
    sharding = parallel.batch_sharding(r.mesh)
    batches = [parallel.put_batch(b, sharding) for b in batches]
  per_example = cfg.fisher == "per-example"
  return fisher_information(
      loss_fn, params, batches, per_example=per_example,
      microbatch_size=cfg.fisher_microbatch if per_example else None,
      weights_key="weights" if per_example else None,
      max_grad_norm=None if per_example else cfg.max_grad_norm)


def record_network(r: Run, keep: Any, mask_path: str, reserve_p: float | None) -> None:
  """Saves a fixed child network (gathered by every process) and records and logs its size.

  ``reserve_p``: the fraction that sized it, saved in the file (``None``: unknown, or sized
  otherwise).
  """
  host_keep = jax.tree_util.tree_map(parallel.to_host, keep)
  if r.primary:
    maskfile.save(mask_path, host_keep, reserve_p=reserve_p, seed=r.cfg.seed)
  kept, total = kept_fraction(keep, where=is_encoder_layer)
  r.results["child_network"] = {"kept": kept, "total": total, "fraction": kept / total}
  logger.info("child network: %d of %d encoder-layer scalars (%.2f%%)%s", kept, total,
              100 * kept / total,
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
  """Clipping, then the mode's optimizer; ``optax.MultiSteps`` around both to accumulate."""
  cfg = r.cfg
  schedule = linear_warmup_decay(cfg.learning_rate, plan.optimizer_steps, cfg.warmup_ratio)
  adamw_kwargs = dict(b1=0.9, b2=0.999, eps=1e-6, weight_decay=cfg.weight_decay)
  if cfg.mode == "vanilla":
    core = optax.adamw(schedule, mask=default_weight_decay_mask, **adamw_kwargs)
  elif cfg.mode == "F":
    core = child_tuning_adamw(schedule, mode="F", reserve_p=cfg.reserve_p,
                              key=stream_key(cfg.seed, "child"), sampler=cfg.sampler,
                              freeze_non_child=cfg.freeze_non_child, **adamw_kwargs)
  elif cfg.mode == "dynamic":
    every = cfg.every or max(1, round(0.05 * plan.optimizer_steps))  # DPS: 5% of the steps
    full_stage = every if cfg.full_stage is None else cfg.full_stage
    r.results["child_network"] = {
        "every": every, "full_stage": full_stage, "reserve_p": cfg.reserve_p,
        "score": cfg.dynamic_score,
        "score_decay": cfg.score_decay if cfg.dynamic_score == "ema" else adamw_kwargs["b2"],
        "total": sum(x.size for x, take in zip(jax.tree_util.tree_leaves(params),
                                               _tree.resolve_where(is_encoder_layer, params))
                     if take)}
    if cfg.dynamic_score == "adam":
      core = child_tuning_dynamic_adamw(schedule, cfg.reserve_p, every=every,
                                        full_stage=full_stage, mask=default_weight_decay_mask,
                                        where=is_encoder_layer, **adamw_kwargs)
    else:
      core = optax.chain(
          child_tuning_dynamic(cfg.reserve_p, every=every, full_stage=full_stage,
                               decay=cfg.score_decay, where=is_encoder_layer),
          optax.adamw(schedule, mask=default_weight_decay_mask, **adamw_kwargs))
  else:
    core = child_tuning_adamw(schedule, mode="D", keep=keep, packing="uint8",
                              freeze_non_child=cfg.freeze_non_child, **adamw_kwargs)
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
  """``train_step(params, opt_state, batch, step) -> (params, opt_state, loss)``, jitted.

  Parameters and optimizer state keep their shardings (donated, updated in place); the
  dropout key of micro-batch ``step`` is ``fold_in(stream_key(seed, "dropout"), step)``.
  """
  dropout_key = stream_key(r.cfg.seed, "dropout")

  @partial(jax.jit, donate_argnums=(0, 1),
           out_shardings=(parallel.shardings_by_shape(r.mesh, params),
                          parallel.shardings_by_shape(r.mesh, opt_state),
                          parallel.replicated(r.mesh)))
  def train_step(params: Any, opt_state: Any, batch: dict, step: jax.Array):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch, jax.random.fold_in(dropout_key, step))
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return train_step


def make_evaluate(r: Run, logits_fn: Callable, splits: Splits) -> Callable:
  """``evaluate(params, name) -> metrics`` of the named evaluation split, sharded by rows."""
  return evaluator(r.task, r.mesh, logits_fn, splits.evals, splits.pad_id, rows=r.eval_rows,
                   max_seq_length=r.cfg.max_seq_length, pad_multiple=r.cfg.pad_multiple)


def evaluator(task: data.Task, mesh: jax.sharding.Mesh, logits_fn: Callable,
              evals: dict[str, data.Encoded], pad_id: int, *, rows: int, max_seq_length: int,
              pad_multiple: int) -> Callable:
  """``evaluate(params, name) -> metrics`` of ``evals[name]``: ``task``'s metrics of
  ``logits_fn(params, batch)``, ``rows`` (a multiple of the mesh's devices) at a time."""
  predict = predictor(task, mesh, logits_fn, evals, pad_id, rows=rows,
                      max_seq_length=max_seq_length, pad_multiple=pad_multiple)

  def evaluate(params: Any, name: str) -> dict[str, float]:
    return glue_metrics(task.metrics, predict(params, name), evals[name].labels)

  return evaluate


def predictor(task: data.Task, mesh: jax.sharding.Mesh, logits_fn: Callable,
              evals: dict[str, data.Encoded], pad_id: int, *, rows: int, max_seq_length: int,
              pad_multiple: int) -> Callable:
  """``predict(params, name)``: the predicted class of each example of ``evals[name]`` (its
  score, for regression), in order, as :func:`evaluator` scores them."""
  eval_logits = jax.jit(logits_fn, out_shardings=parallel.replicated(mesh))  # all rows, each host
  sharding = parallel.batch_sharding(mesh)

  def predict(params: Any, name: str) -> np.ndarray:
    enc = evals[name]
    outs = []
    for batch in tqdm(data.batches(enc, rows, max_seq_length, pad_id,
                                   pad_rows=True, bucket=pad_multiple),
                      total=math.ceil(len(enc) / rows), desc=f"eval {name}",
                      disable=None, leave=False):
      logits = eval_logits(params, parallel.put_batch(batch, sharding))
      outs.append(np.asarray(jax.device_get(logits), np.float32))
    logits = np.concatenate(outs)[:len(enc)]
    return logits[:, 0] if task.is_regression else logits.argmax(-1)

  return predict


def restore_or_start(r: Run, plan: Plan, ckpt: Checkpoints, params: Any, opt_state: Any,
                     resume: bool) -> TrainState:
  """Step 0, or the latest checkpoint's state (with the history kept beside it)."""
  state = TrainState(0, params, opt_state, [], {"selection": {}, "networks": []})
  history_path = os.path.join(r.out_dir, files.HISTORY_FILE)
  if not resume:
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
  t = time.perf_counter()
  with tqdm(total=plan.total_steps, initial=state.step, desc=f"train seed {cfg.seed}",
            unit="step", disable=None) as bar:
    while state.step < plan.total_steps:
      state.params, state.opt_state, loss = train_step(
          state.params, state.opt_state, parallel.put_batch(next_batch(state.step), sharding),
          jnp.int32(state.step))
      state.step += 1
      state.losses.append(loss)
      bar.update(1)
      step = state.step
      if after_step is not None:
        after_step(step)
      end_of_epoch = step % plan.steps_per_epoch == 0
      saving = bool(cfg.save_every and step % cfg.save_every == 0 and step < plan.total_steps)
      if end_of_epoch or saving or step == plan.total_steps:
        check_finite(state.losses, state.params, step, ckpt)
      if selection is not None and end_of_epoch and step < plan.total_steps:
        score = selection(state.params)
        if score is not None:
          state.history["selection"][str(step // plan.steps_per_epoch)] = score
          write_history(r, state)
      if saving:
        ckpt.save(step, state.params, state.opt_state, state.all_losses(plan.total_steps))
  jax.block_until_ready(state.params)
  r.timings["train_s"] = time.perf_counter() - t
  return state


def train_loop(r: Run, plan: Plan, state: TrainState, train_step: Callable, evaluate: Callable,
               splits: Splits, ckpt: Checkpoints) -> TrainState:
  """:func:`run_steps` over the training split, in each epoch's order.

  The selection split is scored after every epoch (how the score moves with training),
  and a dynamic child network is compared with the one before at every re-selection.
  """
  cfg = r.cfg
  orders: dict[int, np.ndarray] = {}

  def next_batch(step: int) -> dict:
    epoch, offset = divmod(step, plan.steps_per_epoch)
    if epoch not in orders:
      orders.clear()
      orders[epoch] = data.epoch_order(len(splits.train), cfg.seed, epoch)
    index = orders[epoch][offset * cfg.batch_size:(offset + 1) * cfg.batch_size]
    return data.make_batch(splits.train, index, cfg.max_seq_length, splits.pad_id,
                           rows=cfg.batch_size, bucket=cfg.pad_multiple)

  after_step = None
  if cfg.mode == "dynamic":  # the network in force, to compare the next selection with
    info = r.results["child_network"]
    network = {"every": info["every"], "full_stage": info["full_stage"],
               "previous": jax.tree_util.tree_map(jnp.copy,
                                                  _dynamic_state(state.opt_state).keep)}

    def after_step(step: int) -> None:
      t_opt = step // cfg.grad_accum - 1  # the optimizer step just taken, if any
      if step % cfg.grad_accum == 0 and t_opt >= network["full_stage"] \
          and (t_opt - network["full_stage"]) % network["every"] == 0:
        state.history["networks"].append(_network_change(network, state.opt_state, t_opt))
        write_history(r, state)

  selection = ((lambda params: evaluate(params, SELECTION)) if SELECTION in splits.evals
               else None)
  return run_steps(r, plan, state, train_step, next_batch, ckpt, selection=selection,
                   after_step=after_step)


def finish(r: Run, plan: Plan, state: TrainState, model: loading.Classifier,
           evaluate: Callable, splits: Splits, ckpt: Checkpoints) -> dict:
  """Evaluates, writes results.json (and the model), and removes the checkpoints."""
  cfg, results = r.cfg, r.results
  losses = [float(x) for x in state.losses]
  per_epoch = plan.steps_per_epoch
  results["train_loss_last_epoch"] = float(np.mean(losses[-per_epoch:])) if losses else None
  results["train_loss_per_epoch"] = [
      float(np.mean(losses[e * per_epoch:(e + 1) * per_epoch])) for e in range(cfg.epochs)
  ] if len(losses) == plan.total_steps else None
  results["train_losses"] = losses

  t = time.perf_counter()
  results["metrics"] = {name: evaluate(state.params, name) for name in splits.evals}
  r.timings["eval_s"] = time.perf_counter() - t
  main = r.task.metrics[0]
  tests = [m[main] for name, m in results["metrics"].items()
           if name != SELECTION and "/" not in name]
  # ``score``: the main metric on the task's own evaluation (dev/test) splits (another task's,
  # ``TASK/SPLIT``, are transfer results, apart); ``selection_score``: on the selection
  # split, the only one a hyperparameter search may look at.
  results["score"] = float(np.mean(tests)) if tests and None not in tests else None
  if SELECTION in results["metrics"]:
    results["selection_score"] = results["metrics"][SELECTION][main]
    state.history["selection"][str(cfg.epochs)] = results["metrics"][SELECTION]
    results["selection_by_epoch"] = [state.history["selection"].get(str(e), {}).get(main)
                                     for e in range(1, cfg.epochs + 1)]
  if cfg.mode == "dynamic":
    results["child_network"]["selections"] = state.history["networks"]
  return write_outputs(r, plan, state, ckpt, model.save)


def write_outputs(r: Run, plan: Plan, state: TrainState, ckpt: Checkpoints,
                  save: Callable[[str, Any], None]) -> dict:
  """Closes a finished run: results.json, the model (``save(folder, params)``, written whole
  or not at all), the checkpoints and history removed. Only process 0 writes."""
  results = r.results
  results["timings"] = r.timings
  results["steps"] = plan.total_steps
  results["versions"] = versions()
  ckpt.close()
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


def run(cfg: TrainConfig, train_set: data.Examples, evals: dict[str, data.Examples],
        out_dir: str, *, resume: bool = False, keep_like_d: str | None = None) -> dict:
  """Fine-tunes one seed and returns its results (also written to ``out_dir/results.json``).

  Args:
    cfg: the run's configuration.
    train_set: training examples (before the per-seed subsample).
    evals: evaluation splits by name.
    out_dir: the seed's folder; checkpoints, the D mask and results go there.
    resume: continue from the last checkpoint in ``out_dir`` if there is one.
    keep_like_d: for mode ``random``, a D mask file whose kept count to match.
  """
  r = start(cfg, out_dir)
  model, splits = load(r, train_set, evals)
  loss_fn = make_loss(r.task, model.apply)
  keep = child_network(r, loss_fn, model.params, splits, resume=resume, keep_like_d=keep_like_d)
  plan = Plan.of(cfg, len(splits.train))
  tx, opt_state = init_optimizer(r, plan, keep, model.params)
  train_step = make_train_step(r, loss_fn, tx, model.params, opt_state)
  evaluate = make_evaluate(r, model.apply, splits)
  ckpt = Checkpoints(os.path.join(out_dir, files.CHECKPOINT_DIR))
  state = restore_or_start(r, plan, ckpt, model.params, opt_state, resume)
  state = train_loop(r, plan, state, train_step, evaluate, splits, ckpt)
  return finish(r, plan, state, model, evaluate, splits, ckpt)
