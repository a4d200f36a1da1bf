"""``childtune evaluate``: a fine-tuned model's metrics on evaluation splits, without training;
and the predictor and evaluator that ``train`` scores its splits with.

The model's classes are matched to the task's labels by name: a model whose config names
them (``id2label``, as every ``childtune train`` run's saved model does) may list them in
any order (``roberta-large-mnli`` says contradiction, neutral, entailment); a model whose
config names none (``LABEL_0``, ...) is read in the task's order.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from childtune_jax import parallel
from childtune_jax.app import (
    argtypes,
    classifier,
    config,
    data,
    files,
    preflight,
    provenance,
    sources,
)
from childtune_jax.app.classifier import ModelError
from childtune_jax.app.metrics import confusion, glue_metrics
from childtune_jax.app.summary import confusion_table, text_table
from childtune_jax.app.tasks import TASKS, Task

UNNAMED = re.compile(r"LABEL_\d+")  # transformers' names for classes nobody named


def label_columns(config: dict, task: Task, where: str) -> list[int] | None:
  """The model's output column of each of ``task``'s labels, in the task's order.

  ``None`` where they are the columns' own order (or the config names no labels). A model
  with another number of classes, or with classes named other than the task's labels, is a
  :class:`ModelError`.
  """
  id2label = config.get("id2label")
  if not isinstance(id2label, dict) or not id2label:
    return None
  try:
    names = [str(id2label[str(i)]) for i in range(len(id2label))]
  except KeyError:
    raise ModelError(f"{where}: id2label's keys are not 0..{len(id2label) - 1}") from None
  if len(names) != task.num_labels:
    raise ModelError(f"{where}: the model has {len(names)} classes ({', '.join(names)}); "
                             f"{task.name} has {task.num_labels}")
  if task.is_regression or all(UNNAMED.fullmatch(n) for n in names):
    return None
  spelling = dict(task.label_map)  # SICK's ENTAILMENT is SNLI's entailment, ...
  canonical = [spelling.get(n.lower(), n.lower()) for n in names]
  if sorted(canonical) != sorted(task.labels):
    raise ModelError(
        f"{where}: the model's classes ({', '.join(names)}) are not {task.name}'s labels "
        f"({', '.join(task.labels)}); --ignore-label-names reads them in that order")
  columns = [canonical.index(label) for label in task.labels]
  return None if columns == list(range(len(columns))) else columns


def run(model: str, task: Task, evals: dict[str, data.Examples], *, batch_size: int = 64,
        max_seq_length: int = 128, pad_multiple: int = 16, label_names: bool = True
        ) -> dict[str, Any]:
  """Scores ``evals`` (by name) with the fine-tuned classifier ``model`` (a folder; a hub
  name needs a network).

  ``label_names=False`` reads the model's classes in the task's order, whatever its config
  calls them. Returns what ``--json`` writes: the metrics by split, the examples and the
  digest of each split, the model's column of each label (``None``: in order), and the
  settings and versions.
  """
  path = classifier.local_folder(model)
  with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
    config = json.load(f)
  columns = label_columns(config if label_names else {}, task, path)
  loaded, tokenizer = classifier.load_classifier(path, task.num_labels, 0, trained_head=True)

  def logits_fn(params: Any, batch: dict) -> jax.Array:  # in the task's label order
    logits = loaded.apply(params, batch)
    return logits if columns is None else logits[:, jnp.asarray(columns)]

  devices = jax.device_count()
  mesh = parallel.make_mesh(parallel.parse_mesh(None, devices))
  params = jax.device_put(loaded.params, parallel.shardings_by_shape(mesh, loaded.params))
  encoded = {name: data.encode(tokenizer, v, max_seq_length) for name, v in evals.items()}
  predict = predictor(task, mesh, logits_fn, encoded, tokenizer.pad_token_id or 0,
                      rows=-(-batch_size // devices) * devices,
                      max_seq_length=max_seq_length, pad_multiple=pad_multiple)
  predictions = {name: predict(params, name) for name in evals}
  return {"model": model, "task": task.name,
          "metrics": {name: glue_metrics(task.metrics, p, evals[name].labels)
                      for name, p in predictions.items()},
          "confusion": None if task.is_regression else {
              name: confusion(p, evals[name].labels, task.num_labels)
              for name, p in predictions.items()},
          "examples": {name: len(v) for name, v in evals.items()},
          "data_sha256": {name: v.digest() for name, v in evals.items()},
          "label_columns": columns,
          "config": {"batch_size": batch_size, "max_seq_length": max_seq_length,
                     "pad_multiple": pad_multiple},
          "versions": provenance.versions()}


def evaluator(task: Task, mesh: jax.sharding.Mesh, logits_fn: Callable,
              evals: dict[str, data.Encoded], pad_id: int, *, rows: int, max_seq_length: int,
              pad_multiple: int) -> Callable:
  """``evaluate(params, name) -> metrics`` of ``evals[name]``: ``task``'s metrics of
  ``logits_fn(params, batch)``, ``rows`` (a multiple of the mesh's devices) at a time."""
  predict = predictor(task, mesh, logits_fn, evals, pad_id, rows=rows,
                      max_seq_length=max_seq_length, pad_multiple=pad_multiple)

  def evaluate(params: Any, name: str) -> dict[str, float]:
    return glue_metrics(task.metrics, predict(params, name), evals[name].labels)

  return evaluate


def predictor(task: Task, mesh: jax.sharding.Mesh, logits_fn: Callable,
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


def add_arguments(p: argparse.ArgumentParser) -> None:
  """``childtune evaluate``'s options."""
  p.add_argument("--model", required=True,
                 help="a fine-tuned classifier's folder, with its head: a train run's "
                      "OUT/seed-N/model, or any BERT/RoBERTa/ELECTRA sequence classifier")
  p.add_argument("--task", required=True, choices=sorted(TASKS),
                 help="the label set and metric to score with")
  src = p.add_argument_group("data (default: HF datasets, needs a network)")
  src.add_argument("--data-dir", help="folder in the GLUE TSV layout (as for train)")
  src.add_argument("--split", action="append", metavar="NAME",
                   help="a split of the task to score (default: its evaluation splits, e.g. "
                        "dev; SICK's trial and test); repeatable")
  src.add_argument("--eval-task", action="append", metavar="TASK[:SPLIT]",
                   help="also score another task's split from --data-dir with the same labels, "
                        "as TASK/SPLIT; repeatable")
  src.add_argument("--validation-file", help="your own .csv/.tsv/.json/.jsonl file to score")
  src.add_argument("--text-columns", help="A[,B]: text column(s) of your own file")
  src.add_argument("--label-column", help="label column of your own file")
  p.add_argument("--ignore-label-names", action="store_true",
                 help="read the model's classes in the task's label order, whatever its "
                      "config's id2label calls them (default: matched to the labels by name)")
  p.add_argument("--batch-size", type=argtypes.positive_int,
                 default=config.default(config.TrainConfig, "eval_batch_size"))
  for name in ("max_seq_length", "pad_multiple"):
    p.add_argument(f"--{name.replace('_', '-')}", type=argtypes.positive_int,
                   default=config.default(config.TrainConfig, name))
  p.add_argument("--json", metavar="FILE",
                 help="also write the metrics, confusion matrices and data digests here")


def main(args: argparse.Namespace) -> dict:
  """Scores a fine-tuned model on its task's splits (and other tasks' with its labels)."""
  task = TASKS[args.task]
  if args.json:
    preflight.writable_file(args.json, "--json")
  preflight.check_model(args.model, args.max_seq_length)
  evals = sources.evaluation_splits(args, task)
  result = run(args.model, task, evals, batch_size=args.batch_size,
               max_seq_length=args.max_seq_length, pad_multiple=args.pad_multiple,
               label_names=not args.ignore_label_names)
  names = list(task.metrics)
  print(text_table([["split", *names, "examples"]] + [
      [name, *("undefined" if m[k] is None else f"{100 * m[k]:.2f}" for k in names),
       str(result["examples"][name])] for name, m in result["metrics"].items()]))
  for name, matrix in (result["confusion"] or {}).items():
    print(f"\n{name}: examples by gold label (rows) and prediction (columns)")
    print(confusion_table(task.labels, matrix))
  if args.json and parallel.is_primary():
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    files.write_json(args.json, result)
  return result
