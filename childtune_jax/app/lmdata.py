"""Prompt-response pairs for a decoder: reading, rendering, tokenising, and padded batches.

A pair is trained on its response tokens only: the batch's ``loss_mask`` is 1 at the
response (and the end-of-turn token after it), 0 at the prompt and padding. A pair comes
from your JSON-lines or CSV file (``--prompt-column``, ``--response-column``) or from a
task rendered by its template (:mod:`.prompts`); either way the prompt goes through the
model's chat template where it has one (``--no-chat-template``: plain text).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence

import numpy as np

from childtune_jax import decoder
from childtune_jax.app.data import DataError, Examples, padded_length
from childtune_jax.app.prompts import Template
from childtune_jax.models.tokenizer import TextTokenizer

logger = logging.getLogger("childtune")


@dataclasses.dataclass
class Pairs:
  """Prompts and responses of one split (``labels``: each pair's class, for a task)."""

  prompts: list[str]
  responses: list[str]
  source: str
  labels: np.ndarray | None = None
  answers: tuple[str, ...] | None = None  # the responses of the classes, for scoring

  def __len__(self) -> int:
    return len(self.prompts)

  def subset(self, index: Sequence[int]) -> Pairs:
    return Pairs([self.prompts[i] for i in index], [self.responses[i] for i in index],
                 self.source, None if self.labels is None else self.labels[np.asarray(index)],
                 self.answers)

  def digest(self) -> str:
    """A SHA-256 of the pairs in order: equal digests, the same examples."""
    return hashlib.sha256(json.dumps([self.prompts, self.responses],
                                     ensure_ascii=False).encode()).hexdigest()


def from_examples(examples: Examples, template: Template) -> Pairs:
  """A task's examples as instructions (the template) and answers (its verbalizer)."""
  prompts = [template.render([col[i] for col in examples.texts]) for i in range(len(examples))]
  responses = [template.answers[int(y)] for y in examples.labels]
  return Pairs(prompts, responses, examples.source, examples.labels.astype(np.int32),
               template.answers)


def read_pairs(path: str, prompt_column: str, response_column: str) -> Pairs:
  """Prompt-response pairs from a ``.jsonl``/``.json`` file (one object a line) or a
  ``.csv``/``.tsv`` file with a header; a missing field, or one that is not text, is a
  one-line :class:`DataError` naming the file and line."""
  if os.path.isdir(path):
    raise DataError(f"{path} is a folder, not a file")
  if not os.path.isfile(path):
    raise DataError(f"{path} does not exist")
  rows: list[tuple[str, dict]] = []
  try:
    with open(path, encoding="utf-8", newline="") as f:
      if path.endswith((".jsonl", ".json")):
        for n, line in enumerate(f, start=1):
          if line.strip():
            try:
              row = json.loads(line)
            except json.JSONDecodeError as e:
              raise DataError(f"{path}:{n}: not a JSON object ({e.msg})") from None
            if not isinstance(row, dict):
              raise DataError(f"{path}:{n}: not a JSON object")
            rows.append((f"{path}:{n}", row))
      elif path.endswith((".csv", ".tsv")):
        reader = csv.DictReader(f, delimiter="\t" if path.endswith(".tsv") else ",")
        for n, row in enumerate(reader, start=2):
          rows.append((f"{path}:{n}", row))
      else:
        raise DataError(f"{path}: use a .jsonl, .json, .csv or .tsv file")
  except UnicodeDecodeError:
    raise DataError(f"{path} is not UTF-8 text") from None
  except csv.Error as e:
    raise DataError(f"{path}: bad CSV ({e})") from None
  prompts, responses = [], []
  for where, row in rows:
    for column, out in ((prompt_column, prompts), (response_column, responses)):
      value = row.get(column)
      if not isinstance(value, str):
        raise DataError(f"{where}: {column!r} is {'missing' if value is None else 'not text'}")
      out.append(value)
    if not responses[-1].strip():
      raise DataError(f"{where}: the response is empty")
  if not prompts:
    raise DataError(f"{path}: no examples")
  return Pairs(prompts, responses, path)


@dataclasses.dataclass
class Encoded:
  """Token ids of one split: each pair's prompt and response, unpadded."""

  prompt_ids: list[list[int]]
  response_ids: list[list[int]]
  labels: np.ndarray | None
  answer_ids: list[list[int]] | None  # each class's answer, for scoring by likelihood

  def __len__(self) -> int:
    return len(self.prompt_ids)


def render_prompt(tokenizer: TextTokenizer, prompt: str, chat: bool) -> str:
  """The prompt as the model reads it: in its chat template (a user turn, then the
  assistant's turn opened), or as plain text followed by a line break."""
  if chat and tokenizer.chat_template is not None:
    return tokenizer.render_chat([{"role": "user", "content": prompt}],
                                 add_generation_prompt=True)
  return prompt + "\n"


def encode(tokenizer: TextTokenizer, pairs: Pairs, max_length: int, *, chat: bool) -> Encoded:
  """Tokenises ``pairs``; the response ends with the end-of-sequence token. A pair longer
  than ``max_length`` loses the start of its prompt (never its response); a response that
  alone does not fit is a :class:`DataError`."""
  eos = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
  prompts, responses, cut = [], [], 0
  for i, (p, r) in enumerate(zip(pairs.prompts, pairs.responses)):
    prompt = tokenizer.encode(render_prompt(tokenizer, p, chat))
    response = tokenizer.encode(r, add_bos=False) + eos
    if len(response) >= max_length:
      raise DataError(f"{pairs.source}: the response of example {i + 1} has {len(response)} "
                      f"tokens, more than --max-seq-length {max_length} allows")
    if len(prompt) + len(response) > max_length:
      prompt = prompt[len(prompt) + len(response) - max_length:]
      cut += 1
    prompts.append(prompt)
    responses.append(response)
  if cut:
    logger.warning("%s: %d of %d prompts were cut at the start to fit --max-seq-length %d",
                   pairs.source, cut, len(pairs), max_length)
  answers = None
  if pairs.answers is not None:
    answers = [tokenizer.encode(a, add_bos=False) for a in pairs.answers]
  return Encoded(prompts, responses, pairs.labels, answers)


def make_batch(data: Encoded, index: Sequence[int], max_length: int, pad_id: int,
               rows: int | None = None, bucket: int = 16,
               responses: Sequence[list[int]] | None = None) -> dict[str, np.ndarray]:
  """The pairs ``index`` as right-padded int32 arrays (``input_ids``, ``attention_mask``,
  ``loss_mask``) and ``weights`` (0 for the padding rows that fill a short batch to
  ``rows``). ``responses``: other responses to score in place of the pairs' own (one per
  index: a class's answer)."""
  rows = len(index) if rows is None else rows
  own = responses if responses is not None else [data.response_ids[i] for i in index]
  seqs = [data.prompt_ids[i] + r for i, r in zip(index, own)]
  length = padded_length(max(len(s) for s in seqs), max_length, bucket)
  ids = np.full((rows, length), pad_id, np.int32)
  attention = np.zeros((rows, length), np.int32)
  loss = np.zeros((rows, length), np.int32)
  attention[:, 0] = 1  # padding rows attend to one token, so that they stay finite
  for row, (seq, r) in enumerate(zip(seqs, own)):
    seq = seq[-length:] if len(seq) > length else seq
    n = len(seq)
    ids[row, :n] = seq
    attention[row, :n] = 1
    loss[row, n - min(len(r), n):n] = 1
  weights = (np.arange(rows) < len(index)).astype(np.float32)
  longest = int(loss[:, 1:].sum(-1).max(initial=1))
  positions, valid = decoder.predicted_positions(loss, -(-longest // 4) * 4)  # few shapes
  return {"input_ids": ids, "attention_mask": attention, "loss_mask": loss, "weights": weights,
          "positions": positions, "valid": valid}


def batches(data: Encoded, batch_size: int, max_length: int, pad_id: int,
            order: Sequence[int] | None = None, pad_rows: bool = False, bucket: int = 16
            ) -> Iterator[dict[str, np.ndarray]]:
  """Consecutive batches of ``data`` in ``order``; the last short, or padded with weight-0
  rows when ``pad_rows``."""
  order = np.arange(len(data)) if order is None else np.asarray(order)
  for start in range(0, len(order), batch_size):
    yield make_batch(data, order[start:start + batch_size], max_length, pad_id,
                     rows=batch_size if pad_rows else None, bucket=bucket)


def choice_batches(data: Encoded, batch_size: int, max_length: int, pad_id: int,
                   bucket: int = 16) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
  """Every (example, class) pair as a sequence ``prompt + answer``, ``batch_size`` at a time,
  padded rows of weight 0; yields the flat pair indices (``example * classes + class``)
  and the batch."""
  classes = len(data.answer_ids)
  flat = np.arange(len(data) * classes)
  for start in range(0, len(flat), batch_size):
    part = flat[start:start + batch_size]
    index = [int(f) // classes for f in part]
    answers = [data.answer_ids[int(f) % classes] for f in part]
    yield part, make_batch(data, index, max_length, pad_id, rows=batch_size, bucket=bucket,
                           responses=answers)


def read_texts(path: str) -> list[str]:
  """A plain-text file's non-empty lines (a perplexity set: one text a line)."""
  if not os.path.isfile(path):
    raise DataError(f"{path} does not exist" if not os.path.isdir(path)
                    else f"{path} is a folder, not a file")
  try:
    with open(path, encoding="utf-8") as f:
      lines = [line.strip() for line in f if line.strip()]
  except UnicodeDecodeError:
    raise DataError(f"{path} is not UTF-8 text") from None
  if not lines:
    raise DataError(f"{path}: no text")
  return lines


def encode_texts(tokenizer: TextTokenizer, texts: list[str], max_length: int) -> Encoded:
  """Plain texts for perplexity: every token after the first is predicted (a text longer
  than ``max_length`` is cut to it)."""
  ids = [tokenizer.encode(t)[:max_length] for t in texts]
  return Encoded([s[:1] for s in ids], [s[1:] for s in ids], None, None)


def prompt_batches(data: Encoded, rows: int, pad_id: int, bucket: int = 16,
                   order: Sequence[int] | None = None
                   ) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
  """The prompts alone, ``rows`` at a time in ``order`` (default: shortest first, so that a
  batch pads little), *left*-padded (to a multiple of ``bucket``), so that every row's
  answer starts at the same position of a KV cache; yields the batch's example indices
  (its real rows) and the batch (``input_ids``, ``attention_mask``, ``positions``)."""
  if order is None:
    order = np.argsort([len(p) for p in data.prompt_ids], kind="stable")
  order = np.asarray(order)
  for start in range(0, len(order), rows):
    index = order[start:start + rows]
    prompts = [data.prompt_ids[i] for i in index]
    length = -(-max(len(p) for p in prompts) // bucket) * bucket
    ids = np.full((rows, length), pad_id, np.int32)
    attention = np.zeros((rows, length), np.int32)
    attention[:, -1] = 1  # padding rows attend to one token, so that they stay finite
    for row, p in enumerate(prompts):
      ids[row, length - len(p):] = p
      attention[row, length - len(p):] = 1
    positions = np.maximum(np.cumsum(attention, axis=1) - 1, 0).astype(np.int32)
    yield index, {"input_ids": ids, "attention_mask": attention, "positions": positions}
