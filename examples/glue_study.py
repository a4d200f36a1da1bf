"""The low-resource GLUE study: vanilla vs Child-Tuning_F vs _D on real data, resumable.

Each cell (task, mode, seed) is one ``childtune train`` run in
``OUT/<task>/<mode>/seed-<s>/``; rerunning skips finished seeds, so the study can be
stopped and continued at any time. The same seeds draw the same 1,000-example training
subsets in every mode, so that differences between modes are paired.

  python examples/glue_study.py --glue ../shared/glue --out results/low-resource

``--max-train-samples all`` runs the full-data setting on the whole training set.
"""

from __future__ import annotations

import argparse
import os
import sys

from childtune_jax.app import cli, presets

MAX_LEN = {"sst2": 64, "cola": 64, "mrpc": 128, "rte": 128, "stsb": 128}
FOLDERS = {"sst2": "SST-2", "cola": "CoLA", "mrpc": "MRPC", "rte": "RTE"}
SEEDS = [42, 52, 57, 63, 78]
MODES = {  # study mode: childtune arguments
    "vanilla": ["--mode", "vanilla"],
    "F": ["--mode", "F"],
    "D": ["--mode", "D", "--fisher", "per-example"],
    "D-ref": ["--mode", "D", "--fisher", "per-batch"],
    "random": ["--mode", "random"],
}


def _samples(text: str) -> int | None:
  if text == "all":
    return None
  n = int(text)
  if n < 1:
    raise argparse.ArgumentTypeError(f"must be a positive integer or 'all', got {text}")
  return n


def run_cell(task: str, mode: str, seeds: list[int], args: argparse.Namespace) -> int:
  out = os.path.join(args.out, task, mode)
  p = presets.reserve_p(task, "F" if mode == "F" else "D")  # the authors' (vanilla: D's)
  argv = ["train", "--task", task, *MODES[mode], "--preset", "reference", "--reserve-p", str(p),
          "--data-dir", args.glue,
          "--max-seq-length", str(MAX_LEN[task]), "--seeds", *map(str, seeds),
          "--no-save-model", "--save-every", "50", "--output-dir", out, "--resume",
          "--backend", args.backend]
  if mode == "random":  # the size of the seed's own D child network
    d_mask = os.path.join(args.out, task, "D", f"seed-{seeds[0]}", "child_mask.npz")
    if not os.path.exists(d_mask):
      print(f"skip {task}/random seed {seeds[0]}: run D first", file=sys.stderr)
      return 0
    argv += ["--random-like", d_mask]
  if args.max_train_samples is not None:
    argv += ["--max-train-samples", str(args.max_train_samples)]
  if args.model:
    argv += ["--model", args.model]
  if args.learning_rate is not None:
    argv += ["--learning-rate", str(args.learning_rate)]
  if args.compilation_cache:
    argv += ["--compilation-cache", args.compilation_cache]
  print("+ childtune " + " ".join(argv), flush=True)
  return cli.main(argv)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--glue", required=True, help="folder with the GLUE TSV tasks")
  parser.add_argument("--out", default="results/low-resource")
  parser.add_argument("--tasks", nargs="+", default=["rte", "mrpc", "cola", "sst2"])
  parser.add_argument("--modes", nargs="+", default=["vanilla", "F", "D", "D-ref"],
                      choices=sorted(MODES))
  parser.add_argument("--seeds", type=int, nargs="+", default=SEEDS)
  parser.add_argument("--max-train-samples", type=_samples, default=1000,
                      help="training examples drawn per seed, or 'all' (default: 1000)")
  parser.add_argument("--model", help="default: the packaged all-MiniLM-L6-v2")
  parser.add_argument("--backend", choices=("nnx", "hf-flax"), default="hf-flax",
                      help="the model implementation (default hf-flax: the one the study's "
                           "results were computed with)")
  parser.add_argument("--learning-rate", type=float,
                      help="the same for every mode; default: the reference's 4e-5")
  parser.add_argument(
      "--compilation-cache", metavar="DIR",
      default=os.environ.get("JAX_COMPILATION_CACHE_DIR")
      or os.path.join(os.path.expanduser("~"), ".cache", "childtune-jax", "xla"),
      help="JAX's persistent compilation cache, shared by the runs: each batch shape of a "
           "mode compiles once for the whole study ('' for none; default "
           "$JAX_COMPILATION_CACHE_DIR or ~/.cache/childtune-jax/xla)")
  args = parser.parse_args()
  # Seed-major order: every finished seed adds one complete paired comparison.
  for seed in args.seeds:
    for task in args.tasks:
      for mode in args.modes:
        if run_cell(task, mode, [seed], args):
          sys.exit(f"failed: {task} {mode} seed {seed}")


if __name__ == "__main__":
  main()
