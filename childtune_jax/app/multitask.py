"""Several tasks trained together: one encoder, a head per task (``childtune multitask``).

Modes:

- ``vanilla``: plain multi-task AdamW.
- ``F``: Child-Tuning_F over every parameter, as in ``train``.
- ``D``: one child network from the Fisher information of all tasks' examples pooled
  (each example counts once: the task with the most examples weighs the most).
- ``shared-D``: each task's Fisher information on its own, combined by
  :func:`childtune_jax.shared_fisher_mask` (``--combine``; by default each task's Fisher
  normalised by its own total, so that a small task counts as much as a large one).

The child network covers the shared encoder's layers (``is_encoder_layer``); the heads are
always trained. Each step trains one task's batch, the task drawn with probability
``n_t^(1/T) / sum_s n_s^(1/T)`` (``--temperature T``: 1 is proportional to the tasks' training
examples, a large T uniform); each task walks through its own shuffled examples, reshuffled
after every pass. An epoch is ``sum_t ceil(n_t / batch)`` steps. All other parameters of the
optimizer (AdamW, including its momentum and weight decay on the heads of the tasks not in
the batch) are one optax chain over the whole parameter tree, as in ``train``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from childtune_jax.app import classifier, data, files, modes, steps, train
from childtune_jax.app.checkpoints import Checkpoints
from childtune_jax.app.config import MultitaskConfig
from childtune_jax.app.tasks import TASKS, Task
from childtune_jax.masks import fisher_mask, is_encoder_layer, jaccard, shared_fisher_mask

logger = logging.getLogger(__name__)

HEAD = "classifier"  # the task head's top-level name in every supported model family


def task_probabilities(counts: Sequence[int], temperature: float) -> np.ndarray:
  """The probability of drawing each task at a step: ``n_t^(1/T)``, normalised."""
  weights = np.asarray(counts, np.float64) ** (1.0 / temperature)
  return weights / weights.sum()


def task_sequence(counts: Sequence[int], temperature: float, seed: int, epoch: int,
                  steps: int) -> np.ndarray:
  """Which task each step of ``epoch`` trains: a function of the seed and epoch alone."""
  rng = np.random.default_rng([seed, epoch, 5])
  return rng.choice(len(counts), steps, p=task_probabilities(counts, temperature))


class TaskStream:
  """The ``k``-th batch of one task: rows ``k*B .. k*B+B`` of its passes, each reshuffled."""

  def __init__(self, n: int, batch_size: int, seed: int, task_index: int):
    self.n, self.batch_size, self.key = n, batch_size, (seed, task_index)
    self._orders: dict[int, np.ndarray] = {}

  def _order(self, p: int) -> np.ndarray:
    if p not in self._orders:
      self._orders = {p: np.random.default_rng([*self.key, p, 9]).permutation(self.n)}
    return self._orders[p]

  def rows(self, k: int) -> np.ndarray:
    positions = np.arange(k * self.batch_size, (k + 1) * self.batch_size)
    return np.array([self._order(int(q // self.n))[q % self.n] for q in positions])


def _split_params(params: list[Any]) -> dict:
  """``{"shared": the first model's encoder, "heads": [each model's head]}``."""
  shared = {k: v for k, v in params[0].items() if k != HEAD}
  return {"shared": shared, "heads": {str(i): p[HEAD] for i, p in enumerate(params)}}


def param_shapes(model: str, tasks: Sequence[Task], backend: str) -> dict:
  """The shapes of a multi-task run's parameters (shared encoder, a head per task)."""
  return _split_params([classifier.param_shapes(model, t.num_labels, backend) for t in tasks])


def run(cfg: MultitaskConfig, datasets: dict[str, tuple[data.Examples, dict]], out_dir: str,
        *, resume: bool = False, report_to: str = "auto") -> dict:
  """Trains one seed on every task of ``cfg`` together; results also in ``results.json``.

  Args:
    cfg: the run's configuration.
    datasets: per task name, its training examples and evaluation splits by name.
    out_dir: the seed's folder.
    resume: continue from the last checkpoint in ``out_dir`` if there is one.
  """
  tasks = [TASKS[name] for name in cfg.tasks]
  r = steps.start(cfg, out_dir, task=tasks[0], report_to=report_to)
  t0 = time.perf_counter()
  models, splits = [], []
  for task in tasks:
    model, tokenizer = train.classifier_for(cfg, task)
    split, digests = train.make_splits(cfg, tokenizer, *datasets[task.name])
    models.append(model)
    splits.append(split)
    r.results.setdefault("data_sha256", {})[task.name] = digests
  r.results["train_examples"] = {t.name: len(s.train) for t, s in zip(tasks, splits)}
  params = steps.place(r, _split_params([m.params for m in models]))
  r.timings["load_s"] = time.perf_counter() - t0
  steps.record_config(r)

  def logits_of(i: int) -> Callable:
    def apply(params: Any, batch: dict, dropout_rng: jax.Array | None = None) -> jax.Array:
      own = {**params["shared"], HEAD: params["heads"][str(i)]}
      return models[i].apply(own, batch, dropout_rng)
    return apply

  def task_loss(i: int) -> Callable:  # labels as the task reads them (int classes or scores)
    loss = train.make_loss(tasks[i], logits_of(i))
    dtype = jnp.float32 if tasks[i].is_regression else jnp.int32

    def f(params: Any, batch: dict, dropout_rng: jax.Array | None = None) -> jax.Array:
      return loss(params, {**batch, "labels": batch["labels"].astype(dtype)}, dropout_rng)
    return f

  losses = [task_loss(i) for i in range(len(tasks))]

  def loss_fn(params: Any, batch: dict, dropout_rng: jax.Array | None = None) -> jax.Array:
    """The loss of the batch's task (``batch["task"]``, the same on every row)."""
    branches = [functools.partial(f, dropout_rng=dropout_rng) for f in losses]
    return jax.lax.switch(batch["task"][0], branches, params, batch)

  keep = child_network(r, losses, params, splits, resume=resume)
  counts = [len(s.train) for s in splits]
  steps_per_epoch = sum(math.ceil(n / cfg.batch_size) for n in counts)
  total = steps_per_epoch * cfg.epochs
  plan = steps.Plan(steps_per_epoch, total, math.ceil(total / cfg.grad_accum))
  tx, opt_state = steps.init_optimizer(r, plan, keep, params)
  train_step = steps.make_train_step(r, loss_fn, tx, params, opt_state)
  evaluates = [train.make_evaluate(dataclasses.replace(r, task=t), logits_of(i), s)
               for i, (t, s) in enumerate(zip(tasks, splits))]
  ckpt = Checkpoints(os.path.join(out_dir, files.CHECKPOINT_DIR))
  state = steps.restore_or_start(r, plan, ckpt, params, opt_state, resume)
  state = _loop(r, plan, state, train_step, splits, counts, ckpt,
                functools.partial(_selection_score, tasks, evaluates, splits))
  return _finish(r, plan, state, models, tasks, evaluates, splits, ckpt)


class MultitaskSource(modes.NetworkSource):
  """A multi-task run's fixed child networks, from each task's Fisher pass (made once)."""

  def __init__(self, r: steps.Run, losses: list[Callable], params: Any,
               splits: list[train.Splits]):
    self.r, self.losses, self.params, self.splits = r, losses, params, splits
    self.fishers: list[Any] | None = None

  def _fishers(self) -> list[Any]:
    if self.fishers is None:
      self.fishers = [train.fisher_pass(self.r, loss, self.params, s)
                      for loss, s in zip(self.losses, self.splits)]
    return self.fishers

  def fisher_mask(self, reserve_p: float) -> Any:
    """The pooled examples' network: each task's Fisher weighted by its examples."""
    t = time.perf_counter()
    counts = np.array([len(s.train) for s in self.splits], np.float64)
    pooled = jax.tree_util.tree_map(
        lambda *f: sum(x * (n / counts.sum()) for x, n in zip(f, counts)), *self._fishers())
    keep = shared_fisher_mask([pooled], reserve_p, where=is_encoder_layer)
    self.r.timings["fisher_s"] = time.perf_counter() - t
    return keep

  def shared_mask(self, reserve_p: float, combine: str) -> Any:
    t = time.perf_counter()
    keep = shared_fisher_mask(self._fishers(), reserve_p, combine=combine,
                              where=is_encoder_layer)
    self.r.timings["fisher_s"] = time.perf_counter() - t
    return keep


def child_network(r: steps.Run, losses: list[Callable], params: Any,
                  splits: list[train.Splits], *, resume: bool) -> Any:
  """The mode's child network of the shared encoder (``None`` for vanilla and F).

  It comes from a resumed run's own file, a given ``cfg.child_mask`` (an earlier run's), or
  the tasks' Fisher passes (:class:`MultitaskSource`). These also record, per task, the
  network's Jaccard with the task's own network: the top ``reserve_p`` of that task's
  Fisher information alone, over the same examples
  (``child_network.jaccard_with_task_network`` in results.json; a given network has none).
  """
  cfg = r.cfg
  source = MultitaskSource(r, losses, params, splits)
  keep = steps.child_network(r, source, params, resume=resume)
  overlap_path = os.path.join(r.out_dir, files.OVERLAP_FILE)
  overlap = None
  if source.fishers is not None:
    overlap = {name: jaccard(keep, fisher_mask(f, cfg.reserve_p, where=is_encoder_layer),
                             where=is_encoder_layer)
               for name, f in zip(cfg.tasks, source.fishers)}
    if r.primary:  # kept beside the mask: a resumed run reads it instead of the Fisher passes
      files.write_json(overlap_path, overlap)
  elif keep is not None and resume and os.path.exists(overlap_path):
    with open(overlap_path) as f:
      overlap = json.load(f)
  if overlap is not None:
    r.results["child_network"]["jaccard_with_task_network"] = overlap
    logger.info("Jaccard with each task's own network: %s",
                ", ".join(f"{name} {j:.3f}" for name, j in overlap.items()))
  return keep


def _with_task(batch: dict, index: int) -> dict:
  rows = len(next(iter(batch.values())))
  return {**batch, "task": np.full(rows, index, np.int32)}


def _selection_score(tasks: list[Task], evaluates: list[Callable],
                     splits: list[train.Splits], params: Any) -> float | None:
  """The tasks' mean main metric on their selection splits (``None`` without them)."""
  if not all(train.SELECTION in s.evals for s in splits):
    return None
  scores = [evaluate(params, train.SELECTION)[t.metrics[0]]
            for t, evaluate in zip(tasks, evaluates)]
  return None if None in scores else float(np.mean(scores))


def _loop(r: steps.Run, plan: steps.Plan, state: steps.TrainState, train_step: Callable,
          splits: list[train.Splits], counts: list[int], ckpt: Checkpoints,
          selection: Callable[[Any], float | None]) -> steps.TrainState:
  """:func:`steps.run_steps` with one task's batch per step, drawn as documented.

  After every epoch but the last, ``selection(params)`` (the tasks' mean selection score)
  goes to the history.
  """
  cfg = r.cfg
  streams = [TaskStream(n, cfg.batch_size, cfg.seed, i) for i, n in enumerate(counts)]
  drawn = np.zeros(len(counts), np.int64)  # batches each task has had before this step
  for epoch in range(state.step // plan.steps_per_epoch + 1):
    seq = task_sequence(counts, cfg.temperature, cfg.seed, epoch, plan.steps_per_epoch)
    upto = min(plan.steps_per_epoch, state.step - epoch * plan.steps_per_epoch)
    drawn += np.bincount(seq[:max(upto, 0)], minlength=len(counts))
  sequences: dict[int, np.ndarray] = {}

  def next_batch(step: int) -> dict:
    epoch, offset = divmod(step, plan.steps_per_epoch)
    if epoch not in sequences:
      sequences.clear()
      sequences[epoch] = task_sequence(counts, cfg.temperature, cfg.seed, epoch,
                                       plan.steps_per_epoch)
    i = int(sequences[epoch][offset])
    rows = streams[i].rows(int(drawn[i]))
    drawn[i] += 1
    batch = data.make_batch(splits[i].train, rows, cfg.max_seq_length, splits[i].pad_id,
                            rows=cfg.batch_size, bucket=cfg.pad_multiple)
    return _with_task(batch, i)

  return steps.run_steps(r, plan, state, train_step, next_batch, ckpt, selection=selection)


def _finish(r: steps.Run, plan: steps.Plan, state: steps.TrainState, models: list,
            tasks: list[Task], evaluates: list[Callable], splits: list[train.Splits],
            ckpt: Checkpoints) -> dict:
  """Scores every task's splits, writes results.json and each task's model, drops checkpoints."""
  cfg, results = r.cfg, r.results
  losses = [float(x) for x in state.losses]
  results["train_losses"] = losses
  results["train_loss_last_epoch"] = (
      float(np.mean(losses[-plan.steps_per_epoch:])) if losses else None)
  t = time.perf_counter()
  results["metrics"] = {f"{task.name}/{name}": evaluate(state.params, name)
                        for task, evaluate, s in zip(tasks, evaluates, splits)
                        for name in s.evals}
  r.timings["eval_s"] = time.perf_counter() - t
  r.stream.evaluation(state.step, results["metrics"])

  def mean_main(split: str) -> float | None:
    scores = [results["metrics"].get(f"{t.name}/{split}", {}).get(t.metrics[0]) for t in tasks]
    return float(np.mean(scores)) if None not in scores else None

  dev = sorted({name for s in splits for name in s.evals if name != train.SELECTION})
  results["score"] = (float(np.mean([mean_main(n) for n in dev]))
                      if dev and None not in map(mean_main, dev) else None)
  if any(train.SELECTION in s.evals for s in splits):
    results["selection_score"] = mean_main(train.SELECTION)  # the tasks' mean main metric
    state.history["selection"][str(cfg.epochs)] = results["selection_score"]
    results["selection_by_epoch"] = [state.history["selection"].get(str(e))
                                     for e in range(1, cfg.epochs + 1)]

  def save(folder: str, params: Any) -> None:  # each task's model: the encoder, its head
    for i, (task, model) in enumerate(zip(tasks, models)):
      model.save(os.path.join(folder, task.name),
                 {**params["shared"], HEAD: params["heads"][str(i)]})

  return steps.write_outputs(r, plan, state, ckpt, save)


__all__ = ["MultitaskConfig", "MultitaskSource", "TaskStream", "child_network", "run",
           "task_probabilities", "task_sequence"]
