"""Does Child-Tuning_D's network follow the data once the new head has been trained?

The study found that D's child network is decided by the random initialisation of the
new classification head far more than by the training data. This trains the head alone
(encoder frozen, AdamW) for ``--head-steps`` steps before the per-example Fisher pass,
for every (data seed, head seed) pair given, and prints the Jaccard of the resulting
networks, for each number of head steps (0: D as it is).

  python examples/head_first_fisher.py --glue ../shared/glue --task sst2 \\
      --pairs 42:42 42:52 52:42 --head-steps 0 100 --json results/diagnostics/head-first.json
"""

from __future__ import annotations

import argparse
import itertools
import os

import jax
import jax.numpy as jnp
import optax

from childtune_jax import fisher_information, fisher_mask, is_encoder_layer, jaccard
from childtune_jax.app import data, files, tasks
from childtune_jax.app.classifier import BACKENDS, DEFAULT_MODEL, load_classifier
from childtune_jax.app.maskfile import save as save_keep
from childtune_jax.models import FAMILIES


def child_network(task: data.Task, train: data.Examples, data_seed: int, head_seed: int,
                  args: argparse.Namespace, head_steps: int) -> dict:
  """D's network for one (data seed, head seed) pair after ``head_steps`` head-only steps."""
  model, tokenizer = load_classifier(args.model, task.num_labels, head_seed,
                                    backend=args.backend)
  pad_id = tokenizer.pad_token_id or 0
  enc = data.encode(tokenizer, data.subsample(train, args.max_train_samples, data_seed),
                    args.max_seq_length)

  def loss_fn(params, batch):
    logits = model.apply(params, batch).astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
    return jnp.sum(losses * batch["weights"]) / jnp.maximum(jnp.sum(batch["weights"]), 1.0)

  params = model.params  # the pretrained encoder and pooler, and the new random classifier
  head = {k: v for k, v in params.items() if k not in FAMILIES}  # all but the backbone
  tx = optax.adamw(args.head_lr, eps=1e-6, weight_decay=0.01)

  @jax.jit
  def head_step(head, state, batch):
    grads = jax.grad(lambda h: loss_fn({**params, **h}, batch))(head)
    updates, state = tx.update(grads, state, head)
    return optax.apply_updates(head, updates), state

  def training_batches():  # the training run's batches, epoch after epoch
    for epoch in itertools.count():
      order = data.epoch_order(len(enc), data_seed, epoch)
      yield from data.batches(enc, 16, args.max_seq_length, pad_id, order, pad_rows=True)

  state = tx.init(head)
  for batch in itertools.islice(training_batches(), head_steps):
    head, state = head_step(head, state, batch)
  params = {**params, **head}
  order = data.fisher_order(len(enc), data_seed)
  fisher = fisher_information(loss_fn, params, data.batches(enc, 16, args.max_seq_length,
                                                             pad_id, order),
                              per_example=True, microbatch_size=8)
  return fisher_mask(fisher, args.reserve_p, where=is_encoder_layer)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--glue", required=True, help="folder with the GLUE TSV tasks")
  parser.add_argument("--task", default="sst2")
  parser.add_argument("--model", default=DEFAULT_MODEL)
  parser.add_argument("--backend", choices=BACKENDS, default="nnx",
                      help="the model implementation, as childtune train --backend")
  parser.add_argument("--pairs", nargs="+", default=["42:42", "42:52", "52:42"],
                      help="DATA_SEED:HEAD_SEED pairs")
  parser.add_argument("--head-steps", type=int, nargs="+", default=[0, 100])
  parser.add_argument("--head-lr", type=float, default=1e-3)
  parser.add_argument("--reserve-p", type=float, default=0.3)
  parser.add_argument("--max-train-samples", type=int, default=1000)
  parser.add_argument("--max-seq-length", type=int, default=64)
  parser.add_argument("--json", help="write the Jaccard matrices here")
  parser.add_argument("--save-dir", help="keep each network as SAVE_DIR/steps-S/data-D-head-H.npz")
  args = parser.parse_args()
  task = tasks.TASKS[args.task]
  train, _ = data.load_glue_folder(task, args.glue)
  pairs = [tuple(int(x) for x in p.split(":")) for p in args.pairs]
  names = [f"data {d} / head {h}" for d, h in pairs]
  out = {"pairs": names, "config": vars(args), "jaccard": {}}
  for steps in args.head_steps:
    keeps = [child_network(task, train, d, h, args, steps) for d, h in pairs]
    if args.save_dir:
      for (d, h), keep in zip(pairs, keeps):
        folder = os.path.join(args.save_dir, f"steps-{steps}")
        os.makedirs(folder, exist_ok=True)
        # A network is a run's own where one seed drew both the data and the head.
        save_keep(os.path.join(folder, f"data-{d}-head-{h}.npz"), keep, reserve_p=args.reserve_p,
                  seed=d if d == h else None)
    matrix = [[jaccard(a, b, where=is_encoder_layer) for b in keeps] for a in keeps]
    out["jaccard"][steps] = matrix
    print(f"\nJaccard after {steps} head-only steps")
    for name, row in zip(names, matrix):
      print(f"{name:>20}  " + "  ".join(f"{v:.3f}" for v in row))
  if args.json:
    files.write_json(args.json, out)


if __name__ == "__main__":
  main()
