"""The same train step in PyTorch, for comparison: torch AdamW vs the reference's masked AdamW.

The reference code masks each gradient with ``torch.bernoulli`` (one mask per parameter per
step, divided by p) before AdamW's moments. This script times, side by side in one process,
a BERT train step with plain ``torch.optim.AdamW`` and with that masking, on transformers'
PyTorch BERT at the same config as ``bench_train_step.py`` (whose vanilla step, run on the
same idle machine, gives the absolute JAX/PyTorch ratio). Needs torch
(``pip install torch==2.13.0``).

  python benchmarks/bench_torch.py --size mini --json benchmarks/results/torch_mini.json
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import torch
from bench_train_step import SIZES, step_parser
from transformers import BertConfig, BertForSequenceClassification


def main() -> None:
  parser = step_parser(__doc__)
  parser.add_argument("--reserve-p", type=float, default=0.3)
  args = parser.parse_args()
  torch.manual_seed(0)
  config = BertConfig(vocab_size=30522, num_labels=2, **SIZES[args.size])
  rng = np.random.default_rng(0)
  ids = torch.tensor(rng.integers(1000, 30000, (args.batch, args.seq)))
  labels = torch.tensor(rng.integers(0, 2, args.batch))
  models = {name: BertForSequenceClassification(config).train() for name in ("AdamW", "masked")}
  opts = {name: torch.optim.AdamW(m.parameters(), lr=4e-5, eps=1e-6, weight_decay=0.01)
          for name, m in models.items()}

  def step(name: str) -> None:
    model, opt = models[name], opts[name]
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    if name == "masked":  # the reference's ChildTuningAdamW, F mode
      for p in model.parameters():
        if p.grad is not None:
          keep = p.grad.new_full(p.grad.size(), args.reserve_p)
          p.grad.mul_(torch.bernoulli(keep) / args.reserve_p)
    opt.step()
    opt.zero_grad(set_to_none=True)

  times: dict[str, list[float]] = {name: [] for name in models}
  for name in models:
    step(name)
  for _ in range(args.rounds):
    for name in models:
      for _ in range(args.reps):
        t = time.perf_counter()
        step(name)
        times[name].append(time.perf_counter() - t)
  base = float(np.median(times["AdamW"]))
  rows = [{"case": f"torch {name}", "ms": 1000 * float(np.median(t)),
           "ratio_to_adamw": float(np.median(t)) / base} for name, t in times.items()]
  print(f"PyTorch {torch.__version__}, BERT-{args.size}, batch {args.batch} x {args.seq}, "
        f"{torch.get_num_threads()} threads")
  for r in rows:
    print(f"{r['case']:24s} {r['ms']:9.1f} ms {r['ratio_to_adamw']:7.3f}x")
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
      json.dump({"size": args.size, "torch": torch.__version__, "rows": rows}, f, indent=2)


if __name__ == "__main__":
  main()
