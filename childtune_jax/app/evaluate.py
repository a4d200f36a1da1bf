"""``childtune evaluate``: a fine-tuned model's metrics on evaluation splits, without training.

The model's classes are matched to the task's labels by name: a model whose config names
them (``id2label``, as every ``childtune train`` run's saved model does) may list them in
any order (``roberta-large-mnli`` says contradiction, neutral, entailment); a model whose
config names none (``LABEL_0``, ...) is read in the task's order.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import jax
import jax.numpy as jnp

from childtune_jax import parallel
from childtune_jax.app import data, loading, train
from childtune_jax.app.metrics import confusion, glue_metrics

UNNAMED = re.compile(r"LABEL_\d+")  # transformers' names for classes nobody named


def label_columns(config: dict, task: data.Task, where: str) -> list[int] | None:
  """The model's output column of each of ``task``'s labels, in the task's order.

  ``None`` where they are the columns' own order (or the config names no labels). A model
  with another number of classes, or with classes named other than the task's labels, is a
  :class:`loading.ModelError`.
  """
  id2label = config.get("id2label")
  if not isinstance(id2label, dict) or not id2label:
    return None
  try:
    names = [str(id2label[str(i)]) for i in range(len(id2label))]
  except KeyError:
    raise loading.ModelError(f"{where}: id2label's keys are not 0..{len(id2label) - 1}") from None
  if len(names) != task.num_labels:
    raise loading.ModelError(f"{where}: the model has {len(names)} classes ({', '.join(names)}); "
                             f"{task.name} has {task.num_labels}")
  if task.is_regression or all(UNNAMED.fullmatch(n) for n in names):
    return None
  spelling = dict(task.label_map)  # SICK's ENTAILMENT is SNLI's entailment, ...
  canonical = [spelling.get(n.lower(), n.lower()) for n in names]
  if sorted(canonical) != sorted(task.labels):
    raise loading.ModelError(
        f"{where}: the model's classes ({', '.join(names)}) are not {task.name}'s labels "
        f"({', '.join(task.labels)}); --ignore-label-names reads them in that order")
  columns = [canonical.index(label) for label in task.labels]
  return None if columns == list(range(len(columns))) else columns


def run(model: str, task: data.Task, evals: dict[str, data.Examples], *, batch_size: int = 64,
        max_seq_length: int = 128, pad_multiple: int = 16, label_names: bool = True
        ) -> dict[str, Any]:
  """Scores ``evals`` (by name) with the fine-tuned classifier ``model`` (a folder; a hub
  name needs a network).

  ``label_names=False`` reads the model's classes in the task's order, whatever its config
  calls them. Returns what ``--json`` writes: the metrics by split, the examples and the
  digest of each split, the model's column of each label (``None``: in order), and the
  settings and versions.
  """
  path = loading.local_folder(model)
  with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
    config = json.load(f)
  columns = label_columns(config if label_names else {}, task, path)
  classifier, tokenizer = loading.load_classifier(path, task.num_labels, 0, trained_head=True)

  def logits_fn(params: Any, batch: dict) -> jax.Array:  # in the task's label order
    logits = classifier.apply(params, batch)
    return logits if columns is None else logits[:, jnp.asarray(columns)]

  devices = jax.device_count()
  mesh = parallel.make_mesh(parallel.parse_mesh(None, devices))
  params = jax.device_put(classifier.params, parallel.shardings_by_shape(mesh, classifier.params))
  encoded = {name: data.encode(tokenizer, v, max_seq_length) for name, v in evals.items()}
  predict = train.predictor(task, mesh, logits_fn, encoded, tokenizer.pad_token_id or 0,
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
          "versions": train.versions()}
