"""``childtune lm-evaluate``: a decoder's scores without training (a base model's zero-shot,
or a fine-tuned folder's): tasks by answer likelihood, texts by perplexity."""

from __future__ import annotations

import argparse
import os

import jax

from childtune_jax import parallel
from childtune_jax.app import (
    argtypes,
    config,
    data,
    files,
    lm,
    lmdata,
    preflight,
    prompts,
    provenance,
    sft,
)
from childtune_jax.app.errors import UsageError
from childtune_jax.app.summary import cell, text_table
from childtune_jax.app.tasks import eval_split_names


def add_arguments(p: argparse.ArgumentParser) -> None:
  """``childtune lm-evaluate``'s options."""
  p.add_argument("--model", default=config.DEFAULT_LM,
                 help="a decoder folder, a GGUF file, or the default SmolLM2-135M-Instruct")
  p.add_argument("--eval-task", action="append", metavar="TASK[:SPLIT]", default=[],
                 help="score a task's split (default its last evaluation split) from "
                      "--data-dir by answer likelihood; repeatable")
  p.add_argument("--eval-text", action="append", metavar="NAME=FILE", default=[],
                 help="score a plain-text file's perplexity (a text a line); repeatable")
  p.add_argument("--data-dir", help="folder in the GLUE layout, for --eval-task")
  p.add_argument("--max-samples", type=argtypes.positive_int,
                 help="score a fixed random subset of at most N examples of each task")
  p.add_argument("--no-chat-template", action="store_true",
                 help="render prompts as plain text, not in the model's chat template")
  p.add_argument("--batch-size", type=argtypes.positive_int,
                 default=config.default(config.SFTConfig, "eval_batch_size"))
  for name in ("max_seq_length", "pad_multiple"):
    p.add_argument(f"--{name.replace('_', '-')}", type=argtypes.positive_int,
                   default=config.default(config.SFTConfig, name))
  p.add_argument("--seed", type=argtypes.seed, default=0, help="draws --max-samples")
  p.add_argument("--json", metavar="FILE", help="also write the scores here")


def main(args: argparse.Namespace) -> dict:
  """Scores ``--model`` on every ``--eval-task`` and ``--eval-text``."""
  if not args.eval_task and not args.eval_text:
    raise UsageError("give at least one --eval-task or --eval-text")
  if args.eval_task and not args.data_dir:
    raise UsageError("--eval-task reads from --data-dir")
  if args.json:
    preflight.writable_file(args.json, "--json")
  lm.check(args.model, args.max_seq_length)
  pairs: dict[str, lmdata.Pairs] = {}
  for spec in args.eval_task:
    name, _, split = spec.partition(":")
    task, template = prompts.template(name)
    split = split or eval_split_names(task)[-1]
    examples = data.subsample(data.read_split(task, args.data_dir, split), args.max_samples,
                              args.seed)
    pairs[f"{task.name}/{split}"] = lmdata.from_examples(examples, template)
  texts = {}
  for spec in args.eval_text:
    name, sep, path = spec.partition("=")
    if not sep or not name or "/" in name:
      raise UsageError(f"--eval-text {spec!r}: give NAME=FILE (a name without '/')")
    texts[name] = lmdata.read_texts(path)
  model = lm.load(args.model)
  chat = not args.no_chat_template
  encoded = {k: lmdata.encode(model.tokenizer, v, args.max_seq_length, chat=chat)
             for k, v in pairs.items()}
  encoded.update({sft.TEXT + k: lmdata.encode_texts(model.tokenizer, v, args.max_seq_length)
                  for k, v in texts.items()})
  devices = jax.device_count()
  mesh = parallel.make_mesh(parallel.parse_mesh(None, devices))
  params = jax.device_put(model.params, parallel.shardings_by_shape(mesh, model.params))
  evaluate = sft.evaluator(model, encoded, mesh, rows=-(-args.batch_size // devices) * devices,
                           max_seq_length=args.max_seq_length, pad_multiple=args.pad_multiple)
  metrics = {name: evaluate(params, name) for name in encoded}
  names = ["accuracy", "loss", "perplexity"]
  print(text_table([["split", *names, "examples"]] + [
      [name, *(cell(k, m.get(k)) if k in m else "" for k in names), str(len(encoded[name]))]
      for name, m in metrics.items()]))
  result = {"model": args.model, "metrics": metrics,
            "examples": {k: len(v) for k, v in encoded.items()},
            "data_sha256": {k: v.digest() for k, v in pairs.items()},
            "config": {"batch_size": args.batch_size, "max_seq_length": args.max_seq_length,
                       "chat_template": chat, "max_samples": args.max_samples,
                       "seed": args.seed},
            "versions": provenance.versions()}
  if args.json and parallel.is_primary():
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    files.write_json(args.json, result)
  return result
