"""One seed of ``childtune sft``: a decoder LM fine-tuned on prompt-response pairs.

:func:`run` reads as ``train.run`` does, with a decoder: the loss is the response tokens'
(:func:`childtune_jax.decoder.causal_lm_loss`), D's per-example Fisher term is the paper's
:math:`\\log p(y \\mid x)` (the summed response log-likelihood), and every split is scored
by its response loss and perplexity, a labelled one (a task rendered by its template) also
by accuracy as the likelihood of each class's answer ranks them, and plain texts
(``--eval-text``) by their perplexity. The child network is chosen among every parameter
(no new head to protect: :mod:`childtune_jax.decoder`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from childtune_jax import decoder, parallel
from childtune_jax.app import data, files, lm, lmdata, modes
from childtune_jax.app.checkpoints import Checkpoints
from childtune_jax.app.config import SFTConfig
from childtune_jax.app.steps import (
    SELECTION,
    Plan,
    Run,
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
from childtune_jax.masks import fisher_mask

logger = logging.getLogger(__name__)

TEXT = "text/"  # the prefix of a plain-text split's name among the metrics
PAIRS = Task("pairs", (), "", None, ("loss", "perplexity"), "")  # your own pairs' "task"


def task_of(labelled: Task | None) -> Task:
  """The metrics of a run: a task's accuracy first, or (your own pairs) the response loss."""
  if labelled is None:
    return PAIRS
  return dataclasses.replace(labelled, metrics=("accuracy", "loss", "perplexity"))


@dataclasses.dataclass
class Splits:
  """The tokenised splits of one run."""

  train: lmdata.Encoded
  evals: dict[str, lmdata.Encoded]  # pairs: dev (and test, other tasks), the selection split
  pad_id: int


def load(r: Run, train_pairs: lmdata.Pairs, evals: dict[str, lmdata.Pairs],
         texts: dict[str, list[str]]) -> tuple[lm.LM, Splits]:
  """The decoder (float32 parameters on the mesh) and the seed's encoded splits."""
  cfg = r.cfg
  t = time.perf_counter()
  model = lm.load(cfg.model, getattr(jnp, cfg.dtype))
  tok = model.tokenizer
  if not cfg.eval_dev:  # the task's own splits unseen; other tasks and texts still scored
    evals = {k: v for k, v in evals.items() if "/" in k}
  train_pairs, selection = data.training_split(train_pairs, cfg.max_train_samples,
                                               cfg.selection_samples, cfg.seed)
  if selection is not None:
    evals[SELECTION] = selection
  encoded = {k: lmdata.encode(tok, v, cfg.max_seq_length, chat=cfg.chat_template)
             for k, v in evals.items()}
  for name, lines in texts.items():
    encoded[TEXT + name] = lmdata.encode_texts(tok, lines, cfg.max_seq_length)
  splits = Splits(lmdata.encode(tok, train_pairs, cfg.max_seq_length, chat=cfg.chat_template),
                  encoded, tok.pad_id)
  r.results["train_examples"] = len(train_pairs)
  r.results["data_sha256"] = {"train": train_pairs.digest(),
                              **{k: v.digest() for k, v in evals.items()}}
  model.params = place(r, model.params)
  r.timings["load_s"] = time.perf_counter() - t
  record_config(r)
  return model, splits


def response_nll(model: lm.LM, params: Any, batch: dict) -> jax.Array:
  """Each row's summed response NLL, from the logits at the response positions only."""
  m = model.module(params)
  hidden = m(batch["input_ids"], batch["attention_mask"], hidden=True)
  at = jnp.take_along_axis(hidden, batch["positions"][..., None], axis=1)
  return decoder.gathered_nll(m.logits(at), batch["input_ids"], batch["positions"],
                              batch["valid"])


def make_loss(model: lm.LM) -> Callable:
  """``loss(params, batch, dropout_rng=None)``: the mean loss per response token."""

  def loss_fn(params: Any, batch: dict, dropout_rng: jax.Array | None = None) -> jax.Array:
    del dropout_rng  # decoders fine-tune without dropout
    nll = response_nll(model, params, batch) * batch["weights"]
    tokens = jnp.sum(batch["valid"] * batch["weights"][:, None])
    return jnp.sum(nll) / jnp.maximum(tokens, 1.0)

  return loss_fn


class SFTSource(modes.NetworkSource):
  """An ``sft`` run's fixed child network: the per-example Fisher of its training pairs."""

  def __init__(self, r: Run, model: lm.LM, splits: Splits):
    self.r, self.model, self.splits = r, model, splits

  def fisher_mask(self, reserve_p: float) -> Any:
    cfg, t = self.r.cfg, time.perf_counter()

    def nll(params: Any, batch: dict) -> jax.Array:  # -log p(y | x) of a batch, summed
      return jnp.sum(response_nll(self.model, params, batch) * batch["weights"])

    several = jax.device_count() > 1
    order = data.fisher_order(len(self.splits.train), cfg.seed)[:cfg.fisher_samples]
    batches = list(lmdata.batches(self.splits.train, cfg.batch_size, cfg.max_seq_length,
                                  self.splits.pad_id, order, pad_rows=several,
                                  bucket=cfg.pad_multiple))
    if several:
      sharding = parallel.batch_sharding(self.r.mesh)
      batches = [parallel.put_batch(b, sharding) for b in batches]
    per_example = cfg.fisher == "per-example"
    fisher = fisher_information(
        nll, self.model.params, batches, per_example=per_example,
        microbatch_size=cfg.fisher_microbatch if per_example else None,
        weights_key="weights" if per_example else None,
        max_grad_norm=None if per_example else cfg.max_grad_norm)
    keep = fisher_mask(fisher, reserve_p, where=self.r.scope)
    self.r.timings["fisher_s"] = time.perf_counter() - t
    return keep


def evaluator(model: lm.LM, evals: dict[str, lmdata.Encoded], mesh: jax.sharding.Mesh, *,
              rows: int, max_seq_length: int, pad_multiple: int) -> Callable[[Any, str], dict]:
  """``evaluate(params, name) -> metrics`` of ``evals[name]``, ``rows`` at a time.

  A labelled split (a task) is scored as multiple choice: each prompt fills a KV cache once,
  then each class's answer (and the end token, as trained) is read after it; the likeliest
  answer is the prediction (``accuracy``), and the true answer's loss per token gives
  ``loss`` and ``perplexity``. Any other split (your own pairs; a text, every token after
  the first) is scored by its response loss and perplexity.
  """
  sharding = parallel.batch_sharding(mesh)
  eos = [] if model.tokenizer.eos_id is None else [model.tokenizer.eos_id]
  pad_id = model.tokenizer.pad_id

  @jax.jit
  def response(params: Any, batch: dict) -> tuple[jax.Array, jax.Array]:
    m = model.module(params)
    hidden = m(batch["input_ids"], batch["attention_mask"], hidden=True)
    at = jnp.take_along_axis(hidden, batch["positions"][..., None], axis=1)
    nll = decoder.gathered_nll(m.logits(at), batch["input_ids"], batch["positions"],
                               batch["valid"])
    return nll, jnp.sum(batch["valid"], axis=-1)

  @functools.partial(jax.jit, static_argnames="answers")
  def choices(params: Any, batch: dict, answers: tuple[tuple[int, ...], ...]) -> jax.Array:
    m = model.module(params)
    ids, attention = batch["input_ids"], batch["attention_mask"]
    n, length = ids.shape
    width = max(len(a) for a in answers)
    mask = jnp.concatenate([attention, jnp.ones((n, width), attention.dtype)], axis=1)
    hidden, cache = m(ids, mask, batch["positions"], cache=m.init_cache(n, length + width),
                      index=0, hidden=True)
    first = jax.nn.log_softmax(m.logits(hidden[:, -1]), axis=-1)
    real = jnp.sum(attention, axis=-1)
    out = []
    for answer in answers:  # each class's answer read after the cached prompt
      nll = -first[:, answer[0]]
      if len(answer) > 1:
        tokens = jnp.broadcast_to(jnp.asarray(answer[:-1], jnp.int32), (n, len(answer) - 1))
        positions = real[:, None] + jnp.arange(len(answer) - 1)
        h, _ = m(tokens, mask, positions, cache=cache, index=length, hidden=True)
        logp = jax.nn.log_softmax(m.logits(h), axis=-1)
        nll = nll - jnp.sum(jnp.take_along_axis(logp, jnp.asarray(answer[1:])[None, :, None],
                                                axis=-1)[..., 0], axis=-1)
      out.append(nll)
    return jnp.stack(out, axis=-1)

  def host(x: jax.Array) -> np.ndarray:
    return np.asarray(jax.device_get(x), np.float64)

  def evaluate(params: Any, name: str) -> dict[str, float]:
    enc = evals[name]
    n = len(enc)
    if enc.answer_ids is not None and enc.labels is not None:
      answers = tuple(tuple(a + eos) for a in enc.answer_ids)
      nll = np.zeros((n, len(answers)))
      for index, batch in tqdm(lmdata.prompt_batches(enc, rows, pad_id, pad_multiple),
                               total=math.ceil(n / rows), desc=f"eval {name}", disable=None,
                               leave=False):
        out = host(choices(params, parallel.put_batch(batch, sharding), answers))
        nll[index] = out[:len(index)]
      true = nll[np.arange(n), enc.labels]
      tokens = np.array([len(answers[y]) for y in enc.labels], np.float64)
      loss = float(true.sum() / tokens.sum())
      return {"accuracy": float(np.mean(nll.argmin(-1) == enc.labels)), "loss": loss,
              "perplexity": math.exp(min(loss, 700.0))}
    sums, counts = [], []
    by_length = np.argsort([len(p) + len(q) for p, q in zip(enc.prompt_ids, enc.response_ids)],
                           kind="stable")  # a batch of similar lengths pads little
    for batch in tqdm(lmdata.batches(enc, rows, max_seq_length, pad_id, by_length,
                                     pad_rows=True, bucket=pad_multiple),
                      total=math.ceil(n / rows), desc=f"eval {name}", disable=None, leave=False):
      s, c = response(params, parallel.put_batch(batch, sharding))
      sums.append(host(s))
      counts.append(host(c))
    loss = float(np.concatenate(sums)[:n].sum() / max(np.concatenate(counts)[:n].sum(), 1.0))
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}

  return evaluate


def make_evaluate(r: Run, model: lm.LM, splits: Splits) -> Callable[[Any, str], dict]:
  """:func:`evaluator` of the run's splits, sharded by rows over its mesh."""
  return evaluator(model, splits.evals, r.mesh, rows=r.eval_rows,
                   max_seq_length=r.cfg.max_seq_length, pad_multiple=r.cfg.pad_multiple)


def adapted(model: lm.LM, adapter: modes.Adapter, r: Run) -> lm.LM:
  """``model`` whose parameters are an adapter's tree (LoRA's), merged for every use."""
  base_module, base_save = model.module, model.save
  params = place(r, adapter.init(jax.device_get(model.params)))
  merge = jax.jit(adapter.merge)

  def module(tree: Any) -> Any:
    return base_module(adapter.merge(tree))

  def apply(tree: Any, input_ids: jax.Array, attention_mask: jax.Array | None = None
            ) -> jax.Array:
    return module(tree)(input_ids, attention_mask)

  return dataclasses.replace(model, params=params, module=module, apply=apply,
                             save=lambda folder, tree: base_save(folder, merge(tree)))


def run(cfg: SFTConfig, train_pairs: lmdata.Pairs, evals: dict[str, lmdata.Pairs],
        texts: dict[str, list[str]], out_dir: str, *, task: Task | None = None,
        resume: bool = False, report_to: str = "auto") -> dict:
  """Fine-tunes one seed of a decoder; its results (also in ``out_dir/results.json``).

  Args:
    cfg: the run's configuration.
    train_pairs: training pairs (before the per-seed subsample).
    evals: evaluation pairs by name (a task's dev split, other tasks' as ``TASK/SPLIT``).
    texts: plain texts by name, scored by perplexity as ``text/NAME``.
    out_dir: the seed's folder.
    task: the task the pairs render, if any (accuracy is then its main metric).
    resume: continue from the last checkpoint in ``out_dir`` if there is one.
  """
  r = start(cfg, out_dir, task=task_of(task), report_to=report_to)
  r.scope = None  # every parameter: a decoder has no new head (childtune_jax.decoder)
  model, splits = load(r, train_pairs, evals, texts)
  mode = modes.MODES[cfg.mode]
  if mode.adapter is not None:  # the run trains the adapters' tree; the model sees it merged
    model = adapted(model, mode.adapter(r), r)
  loss_fn = make_loss(model)
  keep = child_network(r, SFTSource(r, model, splits), model.params, resume=resume)
  plan = Plan.of(cfg, len(splits.train))
  tx, opt_state = init_optimizer(r, plan, keep, model.params)
  train_step = make_train_step(r, loss_fn, tx, model.params, opt_state)
  evaluate = make_evaluate(r, model, splits)
  ckpt = Checkpoints(os.path.join(out_dir, files.CHECKPOINT_DIR))
  state = restore_or_start(r, plan, ckpt, model.params, opt_state, resume)

  def make_batch(index: np.ndarray) -> dict:
    return lmdata.make_batch(splits.train, index, cfg.max_seq_length, splits.pad_id,
                             rows=cfg.batch_size, bucket=cfg.pad_multiple)

  selection = ((lambda params: evaluate(params, SELECTION)) if SELECTION in splits.evals
               else None)
  state = run_epochs(r, plan, state, train_step, len(splits.train), make_batch, ckpt,
                     selection=selection)
  t = time.perf_counter()
  metrics = {name: evaluate(state.params, name) for name in splits.evals}
  r.timings["eval_s"] = time.perf_counter() - t
  record_results(r, plan, state, metrics, r.task.metrics[0])
  return write_outputs(r, plan, state, ckpt, model.save)
