"""The tasks' data and yours: reading, subsampling, tokenising and dynamically padded batches."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import logging
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from childtune_jax.app.tasks import Task, eval_split_names

logger = logging.getLogger(__name__)


class DataError(ValueError):
  """Bad or missing data, reported to the user in one line."""


_MAX_SCORE = 1e6  # a regression label beyond this overflows the float32 squared loss
csv.field_size_limit(1 << 30)  # a long text is data, not an error (the default is 128 KiB)


# HF datasets' GLUE class order where it differs from the TSV label strings.
_HF_LABELS = {"mnli": ("entailment", "neutral", "contradiction")}


@dataclasses.dataclass
class Examples:
  """Texts and labels of one split: ``texts`` holds one or two lists of strings."""

  texts: list[list[str]]
  labels: np.ndarray  # int32 class ids, or float32 scores for regression
  source: str

  def __len__(self) -> int:
    return len(self.labels)

  def subset(self, index: Sequence[int]) -> Examples:
    texts = [[col[i] for i in index] for col in self.texts]
    return Examples(texts, self.labels[np.asarray(index)], self.source)

  def digest(self) -> str:
    """A SHA-256 of the texts and labels in order: equal digests, the same examples."""
    import hashlib

    h = hashlib.sha256(json.dumps(self.texts, ensure_ascii=False).encode())
    h.update(np.ascontiguousarray(self.labels).tobytes())
    return h.hexdigest()


def _parse_label(task: Task, value: Any, where: str) -> float | int:
  if task.is_regression:
    try:
      number = float(value)
    except (TypeError, ValueError):
      raise DataError(f"{where}: label {value!r} is not a number (task {task.name})") from None
    if not math.isfinite(number) or abs(number) > _MAX_SCORE:
      raise DataError(f"{where}: label {value!r} is not a finite number of at most "
                      f"{_MAX_SCORE:g} in magnitude (task {task.name})")
    return number
  text = str(value).strip()
  if task.label_map:
    text = dict(task.label_map).get(text.lower(), text)
  if text not in task.labels:
    raise DataError(
        f"{where}: label {text!r} is outside the label set of {task.name} {list(task.labels)}"
    )
  return task.labels.index(text)


def _finish(task: Task, texts: list[list[str]], labels: list, source: str) -> Examples:
  if not labels:
    raise DataError(f"{source}: no examples")
  dtype = np.float32 if task.is_regression else np.int32
  return Examples(texts, np.asarray(labels, dtype), source)


@contextlib.contextmanager
def _text_file(path: str) -> Iterator[Any]:
  """``path`` open as UTF-8 text; a folder, an unreadable file or a non-UTF-8 one, or bad
  CSV inside, is a one-line :class:`DataError`."""
  if os.path.isdir(path):
    raise DataError(f"{path} is a folder, not a file")
  try:
    with open(path, encoding="utf-8-sig", newline="") as f:
      yield f
  except OSError as e:
    raise DataError(f"cannot read {path}: {e.strerror or e}") from None
  except UnicodeDecodeError:
    raise DataError(f"cannot read {path}: not UTF-8 text") from None
  except csv.Error as e:
    raise DataError(f"cannot read {path}: {e}") from None


def read_glue_tsv(task: Task, path: str, part: str | None = None) -> Examples:
  """Reads one file of the GLUE TSV layout (headers, BOM and CoLA's header-less rows).

  Also SNLI's CSV-quoted TSV and SICK's one CRLF file (``part``: the rows of one split,
  by the task's ``split_column``, matched case-insensitively). Rows the task marks as
  unlabeled are skipped, with a count in the log.
  """
  quoting = csv.QUOTE_MINIMAL if task.quoted else csv.QUOTE_NONE
  with _text_file(path) as f:
    rows = list(csv.reader(f, delimiter="\t", quoting=quoting))
  rows = [r for r in rows if r]
  if task.header:
    if not rows:
      raise DataError(f"{path}: empty file")
    header, rows = rows[0], rows[1:]
    missing = [c for c in (*task.text_columns, task.label_column) if c not in header]
    if missing:
      raise DataError(f"{path}: missing column(s) {missing} for task {task.name}")
    text_idx = [header.index(c) for c in task.text_columns]
    label_idx = header.index(task.label_column)
  else:
    text_idx, label_idx = list(task.text_columns), task.label_column
  part_idx = None
  if part is not None:
    if task.split_column is None or task.split_column not in header:
      raise DataError(f"{path}: no column {task.split_column!r} to take part {part!r} from")
    part_idx = header.index(task.split_column)
  width = max(*text_idx, label_idx, part_idx or 0) + 1
  texts: list[list[str]] = [[] for _ in text_idx]
  labels, skipped, parts = [], 0, set()
  for line, row in enumerate(rows, start=2 if task.header else 1):
    if len(row) < width:
      raise DataError(f"{path}:{line}: expected at least {width} tab-separated columns")
    if part_idx is not None:
      parts.add(row[part_idx].strip().lower())
      if row[part_idx].strip().lower() != part.lower():
        continue
    if row[label_idx].strip() in task.unlabeled:
      skipped += 1
      continue
    labels.append(_parse_label(task, row[label_idx], f"{path}:{line}"))
    for col, i in zip(texts, text_idx):
      col.append(row[i])
  if skipped:
    logger.info("%s: skipped %d pairs without a gold label", path, skipped)
  source = path if part is None else f"{path}[{part.lower()}]"
  if part is not None and not labels:
    raise DataError(f"{path}: no rows of part {part!r} (its parts: {sorted(parts)})")
  return _finish(task, texts, labels, source)


def read_user_file(
    task: Task, path: str, text_columns: Sequence[str], label_column: str
) -> Examples:
  """Reads a CSV, TSV, JSON (a list of objects) or JSON Lines file of the user's."""
  ext = os.path.splitext(path)[1].lower()
  with _text_file(path) as f:
    if ext in (".json", ".jsonl"):
      content = f.read()
      try:
        records = json.loads(content) if content.lstrip().startswith("[") else [
            json.loads(line) for line in content.splitlines() if line.strip()]
      except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON: {e}") from None
    elif ext in (".csv", ".tsv"):
      records = list(csv.DictReader(f, delimiter="\t" if ext == ".tsv" else ","))
    else:
      raise DataError(f"{path}: unknown file type {ext!r} (use .csv, .tsv, .json or .jsonl)")
  if not isinstance(records, list) or not records:
    raise DataError(f"{path}: no examples (expected a list of records)")
  for i, rec in enumerate(records, start=1):
    if not isinstance(rec, dict):
      raise DataError(f"{path}: record {i} is a {type(rec).__name__}, not an object with "
                      "named fields")
  missing = [c for c in (*text_columns, label_column) if c not in records[0]]
  if missing:
    raise DataError(f"{path}: missing column(s) {missing}; it has {sorted(records[0])}")
  texts: list[list[str]] = [[] for _ in text_columns]
  labels = []
  for i, rec in enumerate(records, start=1):
    labels.append(_parse_label(task, rec.get(label_column), f"{path}: record {i}"))
    for col, name in zip(texts, text_columns):
      text = rec.get(name)
      if not isinstance(text, str):
        what = "no value" if text is None else f"a {type(text).__name__}, not text"
        raise DataError(f"{path}: record {i} has {what} in column {name!r}")
      col.append(text)
  return _finish(task, texts, labels, path)


def task_folder(task: Task, data_dir: str) -> str:
  """The task's folder in ``data_dir`` (``data_dir/<Task folder>``, or ``data_dir`` itself)."""
  folder = os.path.join(data_dir, task.folder)
  if not os.path.isdir(folder):
    folder = data_dir
  if not os.path.isdir(folder):
    raise DataError(f"data folder {data_dir} does not exist")
  return folder


def read_split(task: Task, data_dir: str, name: str) -> Examples:
  """One split of a task by name: ``<name>.tsv`` in its folder, or a part of its one file."""
  folder = task_folder(task, data_dir)
  if task.single_file:
    return read_glue_tsv(task, os.path.join(folder, task.single_file), part=name)
  files = {os.path.splitext(f)[0]: f for f in ("train.tsv", *task.dev_files)}
  return read_glue_tsv(task, os.path.join(folder, files.get(name, f"{name}.tsv")))


def load_glue_folder(task: Task, data_dir: str, train_split: str = "train"
                     ) -> tuple[Examples, dict[str, Examples]]:
  """Train and evaluation splits from ``data_dir`` (the task folder itself, or its parent).

  ``train_split`` names the split to train on (default ``train``); the task's evaluation
  splits other than it are the evaluation splits (SNLI trained on ``validation`` has none:
  carve a held-out split from it).
  """
  train = read_split(task, data_dir, train_split)
  evals = {name: read_split(task, data_dir, name) for name in eval_split_names(task)
           if name != train_split}
  return train, evals


_HF_DATASETS = {"snli": ("stanfordnlp/snli", None)}  # the rest: ("glue", task name)


def load_hf_glue(task: Task) -> tuple[Examples, dict[str, Examples]]:
  """The task from Hugging Face ``datasets`` (needs a network or a local cache)."""
  import datasets

  if task.single_file:
    raise DataError(f"{task.name} has no copy on the Hugging Face hub that childtune reads; "
                    f"pass --data-dir with its folder ({task.folder}/{task.single_file})")
  path, config = _HF_DATASETS.get(task.name, ("glue", task.name))
  try:
    ds = datasets.load_dataset(path, config)
  except Exception as e:  # noqa: BLE001 - any hub failure means the same to the user
    raise DataError(
        f"cannot load {path} {config or ''} from the Hugging Face hub ({type(e).__name__}); "
        "offline, pass --data-dir with the task's TSV files or --train-file/--validation-file"
    ) from None
  hf_labels = _HF_LABELS.get(task.name, task.labels)

  def convert(split: Any, name: str) -> Examples:
    keep = [i for i, v in enumerate(split["label"]) if v != -1]  # -1: no gold label
    texts = [[col[i] for i in keep] for col in (list(split[c]) for c in task.hf_columns)]
    values = [split["label"][i] for i in keep]
    if task.is_regression:
      labels = [float(v) for v in values]
    else:
      labels = [task.labels.index(hf_labels[v]) for v in values]
    return _finish(task, texts, labels, f"hf:{path}/{config or task.name}/{name}")

  evals = {"validation_matched": "dev_matched", "validation_mismatched": "dev_mismatched",
           "validation": "dev" if path == "glue" else "validation"}
  return convert(ds["train"], "train"), {
      out: convert(ds[k], k) for k, out in evals.items() if k in ds}


def split_heldout(examples: Examples, n: int) -> tuple[Examples, Examples]:
  """A held-out split of ``n`` examples drawn once (the same for every seed), and the rest.

  For corpora without a test split of their own (SNLI trained on its validation file): a
  test that neither trains nor selects anything, the same examples for every seed and
  method, drawn before any seed's training subset and selection split.
  """
  if not 0 < n < len(examples):
    raise DataError(f"{examples.source}: {len(examples)} examples cannot give a held-out "
                    f"split of {n} and leave any to train on")
  chosen = np.sort(np.random.default_rng([0, 3]).choice(len(examples), n, replace=False))
  rest = np.setdiff1d(np.arange(len(examples)), chosen)
  return examples.subset(rest), examples.subset(chosen)


def _subset_index(total: int, n: int, seed: int) -> np.ndarray:
  return np.sort(np.random.default_rng(seed).choice(total, n, replace=False))


def subsample(examples: Examples, n: int | None, seed: int) -> Examples:
  """A fixed random subset of ``n`` examples per seed (the paper's low-resource setting)."""
  if n is None or n >= len(examples):
    return examples
  return examples.subset(_subset_index(len(examples), n, seed))


def split_selection(examples: Examples, n_train: int | None, n_selection: int, seed: int
                    ) -> tuple[Examples, Examples]:
  """The seed's training subset and a disjoint *selection split* carved from the same file.

  The selection split chooses hyperparameters, so that the official dev set, the test,
  chooses nothing. With ``n_train``, the training subset is :func:`subsample`'s (the same
  examples with or without a selection split) and the selection split is drawn from the
  rest; without it, the selection split is drawn first and training takes everything else.
  Both are functions of ``seed`` alone, so every method of a study sees the same splits.

  Raises:
    DataError: when the file has too few examples for both.
  """
  total = len(examples)
  if n_train is None:
    if n_selection >= total:
      raise DataError(f"{examples.source}: {total} examples cannot give a selection split of "
                      f"{n_selection} and leave any to train on")
    chosen = _subset_index(total, n_selection, seed)
    rest = np.setdiff1d(np.arange(total), chosen)
    return examples.subset(rest), examples.subset(chosen)
  if n_train + n_selection > total:
    raise DataError(f"{examples.source}: {total} examples cannot give {n_train} to train on and "
                    f"a disjoint selection split of {n_selection}")
  train = np.arange(total) if n_train >= total else _subset_index(total, n_train, seed)
  rest = np.setdiff1d(np.arange(total), train)
  chosen = np.sort(np.random.default_rng([seed, 2]).choice(rest, n_selection, replace=False))
  return examples.subset(train), examples.subset(chosen)


def training_split(examples: Examples, n_train: int | None, n_selection: int | None, seed: int
                   ) -> tuple[Examples, Examples | None]:
  """The seed's training subset, and its selection split where ``n_selection`` asks for one
  (:func:`split_selection`; else :func:`subsample` and ``None``)."""
  if n_selection:
    return split_selection(examples, n_train, n_selection, seed)
  return subsample(examples, n_train, seed), None


@dataclasses.dataclass
class Encoded:
  """Token ids of one split, unpadded; batched on demand with dynamic padding."""

  input_ids: list[list[int]]
  token_type_ids: list[list[int]]
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.labels)


def encode(tokenizer: Any, examples: Examples, max_length: int) -> Encoded:
  enc = tokenizer(*examples.texts, truncation=True, max_length=max_length, padding=False)
  types = enc.get("token_type_ids") or [[0] * len(ids) for ids in enc["input_ids"]]
  return Encoded(list(enc["input_ids"]), list(types), examples.labels)


def padded_length(longest: int, max_length: int, bucket: int = 16) -> int:
  """The padded length of a batch: its longest sequence rounded up to ``bucket``."""
  return min(-(-longest // bucket) * bucket, max_length)


def make_batch(data: Encoded, index: Sequence[int], max_length: int, pad_id: int,
               rows: int | None = None, bucket: int = 16) -> dict[str, np.ndarray]:
  """Pads the examples ``index`` to their longest length (bucketed) as int32 arrays.

  With ``rows``, a short batch is padded to ``rows`` rows of weight 0 (``weights``), so
  that every batch has one of a few shapes and jit compiles each shape once.
  """
  rows = len(index) if rows is None else rows
  length = padded_length(max(len(data.input_ids[i]) for i in index), max_length, bucket)
  ids = np.full((rows, length), pad_id, np.int32)
  types = np.zeros((rows, length), np.int32)
  mask = np.zeros((rows, length), np.int32)
  mask[:, 0] = 1  # padding rows attend to one token, so that they stay finite
  for row, i in enumerate(index):
    n = min(len(data.input_ids[i]), length)
    ids[row, :n] = data.input_ids[i][:n]
    types[row, :n] = data.token_type_ids[i][:n]
    mask[row, :n] = 1
  labels = np.zeros((rows,), data.labels.dtype)
  labels[:len(index)] = data.labels[np.asarray(index)]
  weights = (np.arange(rows) < len(index)).astype(np.float32)
  return {"input_ids": ids, "token_type_ids": types, "attention_mask": mask,
          "labels": labels, "weights": weights}


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
  """The shuffled example order of training epoch ``epoch``: a function of (seed, epoch)."""
  return np.random.default_rng([seed, 0, epoch]).permutation(n)


def fisher_order(n: int, seed: int) -> np.ndarray:
  """The shuffled example order of the Fisher pass (a stream of its own)."""
  return np.random.default_rng([seed, 1]).permutation(n)


def batches(data: Encoded, batch_size: int, max_length: int, pad_id: int,
            order: Sequence[int] | None = None, pad_rows: bool = False, bucket: int = 16
            ) -> Iterator[dict[str, np.ndarray]]:
  """Consecutive batches of ``data`` in ``order`` (default: as stored).

  The last batch is short, or padded with weight-0 rows when ``pad_rows``.
  """
  order = np.arange(len(data)) if order is None else np.asarray(order)
  for start in range(0, len(order), batch_size):
    yield make_batch(data, order[start:start + batch_size], max_length, pad_id,
                     rows=batch_size if pad_rows else None, bucket=bucket)
