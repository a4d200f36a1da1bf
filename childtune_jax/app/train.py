"""One seed of ``childtune train``: a sequence classifier fine-tuned on one task.

:func:`run` reads top to bottom: :func:`~childtune_jax.app.steps.start` (the mesh and the
seed's folder), :func:`load` (model, tokenizer, encoded splits),
:func:`~childtune_jax.app.steps.child_network` (the mode's fixed network from the Fisher
pass or a draw, :class:`TrainSource`, or a saved one), the mode's optimizer and the jitted
step (:mod:`~childtune_jax.app.steps`), :func:`train_loop` and :func:`finish` (evaluate,
write the results and the model). The precision lives in :func:`load` (the model's compute
``dtype``; the parameters stay float32).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from childtune_jax import parallel
from childtune_jax.app import classifier, data, files, maskfile, modes
from childtune_jax.app.checkpoints import Checkpoints
from childtune_jax.app.config import TrainConfig
from childtune_jax.app.evaluate import evaluator
from childtune_jax.app.steps import (
    SELECTION,
    Plan,
    Run,
    TrainState,
    child_network,
    init_optimizer,
    make_train_step,
    place,
    record_config,
    record_results,
    restore_or_start,
    run_epochs,
    start,
    write_outputs,
)
from childtune_jax.app.tasks import Task
from childtune_jax.fisher import fisher_information
from childtune_jax.masks import fisher_mask, is_encoder_layer, kept_fraction, random_keep

logger = logging.getLogger(__name__)

@dataclasses.dataclass
class Splits:
  """The tokenised splits of one run."""

  train: data.Encoded
  evals: dict[str, data.Encoded]  # by name: dev (and test), and the selection split if any
  pad_id: int


def classifier_for(cfg: TrainConfig, task: Task) -> tuple[classifier.Classifier, Any]:
  """The run's model for ``task`` (``cfg.dtype`` compute, head from the init seed), tokenizer."""
  init_seed = cfg.seed if cfg.init_seed is None else cfg.init_seed
  return classifier.load_classifier(cfg.model, task.num_labels, init_seed,
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


def load(r: Run, train_set: data.Examples, evals: dict[str, data.Examples]
         ) -> tuple[classifier.Classifier, Splits]:
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


def make_loss(task: Task, logits_fn: Callable) -> Callable:
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


class TrainSource(modes.NetworkSource):
  """A ``train`` run's fixed child networks: the Fisher pass over its training split, and a
  random draw from the seed."""

  def __init__(self, r: Run, loss_fn: Callable, params: Any, splits: Splits):
    self.r, self.loss_fn, self.params, self.splits = r, loss_fn, params, splits

  def fisher_mask(self, reserve_p: float) -> Any:
    t = time.perf_counter()
    keep = fisher_mask(fisher_pass(self.r, self.loss_fn, self.params, self.splits), reserve_p,
                       where=is_encoder_layer)
    self.r.timings["fisher_s"] = time.perf_counter() - t
    return keep

  def random_mask(self, reserve_p: float, like_d: str | None) -> tuple[Any, float | None]:
    size, recorded = {"reserve_p": reserve_p}, reserve_p
    if like_d:
      size = {"count": kept_fraction(maskfile.load(like_d, self.params),
                                     where=is_encoder_layer)[0]}
      recorded = None
    return random_keep(self.r.cfg.seed + 1_000_003, self.params, **size,
                       where=is_encoder_layer), recorded


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


def make_evaluate(r: Run, logits_fn: Callable, splits: Splits) -> Callable:
  """``evaluate(params, name) -> metrics`` of the named evaluation split, sharded by rows."""
  return evaluator(r.task, r.mesh, logits_fn, splits.evals, splits.pad_id, rows=r.eval_rows,
                   max_seq_length=r.cfg.max_seq_length, pad_multiple=r.cfg.pad_multiple)


def train_loop(r: Run, plan: Plan, state: TrainState, train_step: Callable, evaluate: Callable,
               splits: Splits, ckpt: Checkpoints) -> TrainState:
  """:func:`~childtune_jax.app.steps.run_epochs` over the training split; the selection split
  is scored after every epoch (how the score moves with training)."""
  cfg = r.cfg

  def make_batch(index: np.ndarray) -> dict:
    return data.make_batch(splits.train, index, cfg.max_seq_length, splits.pad_id,
                           rows=cfg.batch_size, bucket=cfg.pad_multiple)

  selection = ((lambda params: evaluate(params, SELECTION)) if SELECTION in splits.evals
               else None)
  return run_epochs(r, plan, state, train_step, len(splits.train), make_batch, ckpt,
                    selection=selection)


def finish(r: Run, plan: Plan, state: TrainState, model: classifier.Classifier,
           evaluate: Callable, splits: Splits, ckpt: Checkpoints) -> dict:
  """Evaluates, writes results.json (and the model), and removes the checkpoints."""
  t = time.perf_counter()
  metrics = {name: evaluate(state.params, name) for name in splits.evals}
  r.timings["eval_s"] = time.perf_counter() - t
  record_results(r, plan, state, metrics, r.task.metrics[0])
  return write_outputs(r, plan, state, ckpt, model.save)


def run(cfg: TrainConfig, train_set: data.Examples, evals: dict[str, data.Examples],
        out_dir: str, *, resume: bool = False, report_to: str = "auto") -> dict:
  """Fine-tunes one seed and returns its results (also written to ``out_dir/results.json``).

  Args:
    cfg: the run's configuration.
    train_set: training examples (before the per-seed subsample).
    evals: evaluation splits by name.
    out_dir: the seed's folder; checkpoints, the D mask and results go there.
    resume: continue from the last checkpoint in ``out_dir`` if there is one.
    report_to: the metrics stream's TensorBoard (:mod:`~childtune_jax.app.stream`).
  """
  r = start(cfg, out_dir, report_to=report_to)
  model, splits = load(r, train_set, evals)
  loss_fn = make_loss(r.task, model.apply)
  keep = child_network(r, TrainSource(r, loss_fn, model.params, splits), model.params,
                       resume=resume)
  plan = Plan.of(cfg, len(splits.train))
  tx, opt_state = init_optimizer(r, plan, keep, model.params)
  train_step = make_train_step(r, loss_fn, tx, model.params, opt_state)
  evaluate = make_evaluate(r, model.apply, splits)
  ckpt = Checkpoints(os.path.join(out_dir, files.CHECKPOINT_DIR))
  state = restore_or_start(r, plan, ckpt, model.params, opt_state, resume)
  state = train_loop(r, plan, state, train_step, evaluate, splits, ckpt)
  return finish(r, plan, state, model, evaluate, splits, ckpt)
