"""The CPU train step and evaluation under glibc's malloc, tcmalloc and jemalloc.

On CPU, XLA allocates and frees every step's large buffers (gradients, AdamW's moments and
updates, activations); with glibc's ``malloc`` each of them is a fresh ``mmap`` that the
kernel zero-fills page by page, which shows as minor page faults and system time. A
preloaded allocator that keeps freed memory (``LD_PRELOAD=...libtcmalloc_minimal.so.4``)
avoids that; the computation, and so every loss, is bitwise the same.

Each allocator runs in its own process (``LD_PRELOAD`` acts at start-up), the processes
interleaved over rounds; each times the MiniLM-sized NNX BERT's jitted train step (forward,
backward, clip, AdamW, vanilla and Child-Tuning_F) and its evaluation forward pass after
compiling, with the minor page faults and system seconds per step, and the last loss (which
must be the same for every allocator). Medians over steps, then over rounds; ratios to glibc.

  python benchmarks/bench_allocator.py --jsonl benchmarks/results/allocator.jsonl
"""

from __future__ import annotations

import argparse
import ctypes.util
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
CANDIDATES = {  # name: the library names ``ctypes.util.find_library`` looks for
    "tcmalloc": ("tcmalloc_minimal", "tcmalloc"),
    "jemalloc": ("jemalloc",),
}


def find_allocator(name: str) -> str | None:
  """The installed allocator library's name (loadable by ``LD_PRELOAD``), or ``None``."""
  return next(filter(None, map(ctypes.util.find_library, CANDIDATES[name])), None)


def worker(args: argparse.Namespace) -> dict:
  """Times the train steps and the evaluation pass in this process; returns medians."""
  import jax
  import optax
  from bench_models import make_batch, make_step, nnx_apply
  from bench_train_step import SIZES
  from flax import nnx

  from childtune_jax import child_tuning_f
  from childtune_jax.models import EncoderConfig, SequenceClassifier

  cfg = EncoderConfig("bert", vocab_size=30522, num_labels=2, **SIZES[args.size])
  graphdef, state = nnx.split(SequenceClassifier(cfg, rngs=nnx.Rngs(0)))
  params = nnx.to_pure_dict(state)
  batch = make_batch(args.batch, args.seq)
  apply = nnx_apply(graphdef)
  cases = {"train step vanilla": optax.chain(optax.clip_by_global_norm(1.0),
                                             optax.adamw(4e-5)),
           "train step F": optax.chain(optax.clip_by_global_norm(1.0),
                                       child_tuning_f(0.3, key=0), optax.adamw(4e-5))}
  evaluate = jax.jit(nnx_apply(graphdef, dropout=False))
  out = {}

  def timed(fn, reps):
    usage = resource.getrusage(resource.RUSAGE_SELF)
    times = []
    for i in range(reps):
      t = time.perf_counter()
      fn(i)
      times.append(time.perf_counter() - t)
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {"ms": 1000 * float(np.median(times)),
            "faults_per_step": (after.ru_minflt - usage.ru_minflt) / reps,
            "sys_s_per_step": (after.ru_stime - usage.ru_stime) / reps}

  for name, tx in cases.items():
    step = make_step(apply, tx)
    carry = [jax.tree.map(np.array, params), None, None]
    carry[1] = tx.init(carry[0])

    def run(i, step=step, carry=carry):
      carry[0], carry[1], carry[2] = step(carry[0], carry[1], batch, i)
      carry[2].block_until_ready()

    run(0)  # compile
    out[name] = timed(run, args.reps)
    out[name]["last_loss"] = float(carry[2])
  out["evaluation forward"] = timed(
      lambda i: evaluate(params, batch, None).block_until_ready(), args.reps)
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", default="minilm")
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--seq", type=int, default=128)
  parser.add_argument("--reps", type=int, default=20)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--jsonl", help="append each allocator's result here")
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    print(json.dumps(worker(args)))
    return
  allocators = {"glibc": None}
  for name in CANDIDATES:
    path = find_allocator(name)
    if path:
      allocators[name] = path
    else:
      print(f"{name}: not installed, skipped (Debian: apt install libtcmalloc-minimal4 "
            "libjemalloc2)")
  results: dict[str, list[dict]] = {name: [] for name in allocators}
  command = [sys.executable, os.path.abspath(__file__), "--worker", "--size", args.size,
             "--batch", str(args.batch), "--seq", str(args.seq), "--reps", str(args.reps)]
  for r in range(args.rounds):
    for name, path in allocators.items():
      env = dict(os.environ, PYTHONPATH=os.pathsep.join(
          [HERE, os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]))
      env.pop("LD_PRELOAD", None)
      if path:
        env["LD_PRELOAD"] = path
      done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
      results[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
      print(f"round {r + 1}/{args.rounds}: {name} done", flush=True)
  cases = list(results["glibc"][0])
  rows = []
  for name, runs in results.items():
    for case in cases:
      row = {"allocator": name, "case": case,
             "library": os.path.basename(allocators[name] or "") or None,
             **{k: float(np.median([run[case][k] for run in runs]))
                for k in ("ms", "faults_per_step", "sys_s_per_step")}}
      row["ratio_to_glibc"] = row["ms"] / float(np.median([run[case]["ms"]
                                                           for run in results["glibc"]]))
      if "last_loss" in runs[0][case]:
        row["last_losses"] = sorted({run[case]["last_loss"] for run in runs})
      rows.append(row)
  print(f"BERT-{args.size}, batch {args.batch} x {args.seq} tokens, {os.cpu_count()} cores, "
        f"{args.rounds} rounds of {args.reps} steps")
  print(f"{'allocator':10s} {'case':20s} {'ms':>8s} {'x glibc':>8s} {'faults/step':>12s} "
        f"{'sys s/step':>10s}  last loss")
  for row in rows:
    print(f"{row['allocator']:10s} {row['case']:20s} {row['ms']:8.1f} {row['ratio_to_glibc']:8.3f} "
          f"{row['faults_per_step']:12.0f} {row['sys_s_per_step']:10.3f}  "
          f"{row.get('last_losses', '')}")
  if args.jsonl:
    os.makedirs(os.path.dirname(os.path.abspath(args.jsonl)), exist_ok=True)
    with open(args.jsonl, "a") as f:
      for row in rows:
        f.write(json.dumps({**row, "size": args.size, "batch": args.batch, "seq": args.seq,
                            "rounds": args.rounds, "reps": args.reps,
                            "cpus": os.cpu_count()}) + "\n")


if __name__ == "__main__":
  main()
