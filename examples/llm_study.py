"""The learn–forget study: SmolLM2 fine-tuned on SNLI by each method, and what it forgets.

The protocol is ``results/llm/README.md`` (written before any number). This driver makes the
study's data once (SNLI's 1,000 test pairs held out of its validation file, the rest to
train on; the plain texts for perplexity), scores the base model zero-shot, runs each
method's learning-rate grid on the selection seed, chooses each method's rate on the
selection split alone, and runs the chosen rates on the five test seeds.

Resumable and parallel: a finished run is never rerun, an interrupted one resumes, and
several workers share the work (each run's folder is locked: a worker skips a run another
holds). On CPU, one worker a core, pinned::

  taskset -c 0 python examples/llm_study.py --shared ../shared --out results/llm &
  taskset -c 1 python examples/llm_study.py --shared ../shared --out results/llm &

Layout::

  OUT/base.json                              the base model's zero-shot scores
  OUT/select/<method>/lr<LR>/seed-1/results.json
  OUT/masks/D-seed-<s>.npz                   D's network of a seed, made once, reused
  OUT/choice.json                            each method's chosen rate and the evidence
  OUT/test/<method>/seed-<s>/results.json

Adding a method is one line in ``METHODS``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import time

from childtune_jax.app import cli, data, files
from childtune_jax.app.tasks import TASKS

METHODS = {  # method: its childtune sft arguments, and its grid of learning rates
    "vanilla": ("--mode vanilla", "full"),
    "F": ("--mode F --reserve-p 0.3", "full"),
    "D": ("--mode D --reserve-p 0.3 --fisher-samples 500", "full"),
    "dynamic": ("--mode dynamic --reserve-p 0.3", "full"),
    "hft": ("--mode hft --hft-every 63", "full"),  # 4 stages of the 250 steps
    "lora-r8": ("--mode lora --lora-rank 8", "lora"),
    "lora-r64": ("--mode lora --lora-rank 64", "lora"),
}
GRIDS = {"full": (1e-5, 3e-5, 1e-4), "lora": (1e-4, 3e-4, 1e-3)}
SELECTION_SEED, TEST_SEEDS = 1, (101, 102, 103, 104, 105)
TRAIN, SELECTION, TEST, EVAL_SAMPLES, TEXT_LINES = 2000, 500, 1000, 500, 400
EVAL_TASKS = ("sst2:dev", "rte:dev", "sick:test")
COMMON = ["--task", "snli", "--epochs", "1", "--batch-size", "8", "--max-seq-length", "128",
          "--no-chat-template", "--max-train-samples", str(TRAIN), "--selection-samples",
          str(SELECTION), "--eval-samples", str(EVAL_SAMPLES), "--no-save-model",
          "--save-every", "50", "--resume"]
FAILED = "failed.json"


def make_data(shared: str, work: str) -> None:
  """The study's data folder: SNLI split once into train/test, the other tasks linked, and
  the perplexity texts (MRPC test's first sentences, CoLA dev's acceptable ones)."""
  done = os.path.join(work, "done.json")
  if os.path.exists(done):
    return
  os.makedirs(os.path.join(work, "SNLI"), exist_ok=True)
  snli = TASKS["snli"]
  pool = data.read_split(snli, os.path.join(shared, "nli"), "validation")
  rest, test = data.split_heldout(pool, TEST)  # the CLI's own --heldout-samples split
  for name, part in (("train", rest), ("validation", test)):
    with files.replacing(os.path.join(work, "SNLI", f"{name}.tsv")) as tmp, \
        open(tmp, "w", newline="", encoding="utf-8") as f:
      w = csv.writer(f, delimiter="\t")
      w.writerow(["premise", "hypothesis", "label"])
      for a, b, y in zip(*part.texts, part.labels):
        w.writerow([a, b, int(y)])
  for link, target in (("SICK", os.path.join(shared, "nli", "SICK")),
                       ("SST-2", os.path.join(shared, "glue", "SST-2")),
                       ("RTE", os.path.join(shared, "glue", "RTE"))):
    path = os.path.join(work, link)
    if not os.path.exists(path):
      os.symlink(os.path.abspath(target), path)
  os.makedirs(os.path.join(work, "texts"), exist_ok=True)
  mrpc = data.read_glue_tsv(TASKS["mrpc"], os.path.join(shared, "glue", "MRPC",
                                                        "test-labelled.tsv"))
  cola = data.read_split(TASKS["cola"], os.path.join(shared, "glue"), "dev")
  acceptable = [s for s, y in zip(cola.texts[0], cola.labels) if y == 1]
  for name, lines in (("mrpc", mrpc.texts[0]), ("cola", acceptable)):
    files.write_text(os.path.join(work, "texts", f"{name}.txt"),
                     "\n".join(x.strip() for x in lines[:TEXT_LINES]) + "\n")
  files.write_json(done, {"snli_train": len(rest), "snli_test": len(test),
                          "test_sha256": test.digest()})


def eval_args(work: str) -> list[str]:
  args = ["--data-dir", work]
  for spec in EVAL_TASKS:
    args += ["--eval-task", spec]
  for name in ("mrpc", "cola"):
    args += ["--eval-text", f"{name}={os.path.join(work, 'texts', name + '.txt')}"]
  return args


def base_scores(out: str, work: str) -> None:
  """The base model zero-shot: SNLI's 1,000 test pairs (all of them), and the forgetting
  measures on the very examples the runs score (the same subsets, the same texts)."""
  common = ["lm-evaluate", "--data-dir", work, "--max-seq-length", "128",
            "--no-chat-template"]
  target = os.path.join(out, "base-snli.json")
  if not os.path.exists(target):
    run([*common, "--eval-task", "snli:validation", "--json", target])
  path = os.path.join(out, "base.json")
  if not os.path.exists(path):
    argv = [*common, "--max-samples", str(EVAL_SAMPLES), "--json", path]
    for spec in EVAL_TASKS:
      argv += ["--eval-task", spec]
    for name in ("mrpc", "cola"):
      argv += ["--eval-text", f"{name}={os.path.join(work, 'texts', name + '.txt')}"]
    run(argv)


def run(argv: list[str]) -> int:
  print("+ childtune " + " ".join(argv), flush=True)
  return cli.main(argv)


def lr_name(lr: float) -> str:
  return f"lr{lr:g}"


def read(folder: str, seed: int) -> dict | None:
  for name in ("results.json", FAILED):
    path = os.path.join(folder, f"seed-{seed}", name)
    if os.path.exists(path):
      with open(path) as f:
        return json.load(f)
  return None


def train(out: str, work: str, method: str, lr: float, seed: int, folder: str,
          test: bool) -> str:
  """One run: ``"done"`` (finished before), ``"ran"``, ``"busy"`` (another worker holds
  it) or ``"failed"`` (diverged: a result of the point)."""
  if read(folder, seed) is not None:
    return "done"
  args, _ = METHODS[method]
  argv = ["sft", *args.split(), *COMMON, *eval_args(work), "--learning-rate", f"{lr:g}",
          "--seeds", str(seed), "--output-dir", folder]
  if not test:
    argv.append("--selection-only")
  masks = os.path.join(out, "masks", f"{method}-seed-{files.SEED_FIELD}.npz")
  mask = files.for_seed(masks, seed)
  fixed = method == "D"
  if fixed and os.path.exists(mask):
    argv += ["--child-mask", masks]
  status = run(argv)
  if status == 2 and os.path.exists(os.path.join(folder, ".childtune.lock")):
    return "busy"
  if status == 1:  # diverged: a result of this point, recorded
    os.makedirs(os.path.join(folder, f"seed-{seed}"), exist_ok=True)
    files.write_json(os.path.join(folder, f"seed-{seed}", FAILED),
                     {"failed": True, "argv": argv, "selection_score": None})
    return "failed"
  if status:
    sys.exit(f"failed: {' '.join(argv)}")
  if fixed and not os.path.exists(mask):
    os.makedirs(os.path.dirname(mask), exist_ok=True)
    with files.replacing(mask) as tmp:
      shutil.copyfile(os.path.join(folder, f"seed-{seed}", "child_mask.npz"), tmp)
  return "ran"


def grid(method: str, out: str) -> dict[float, float | None]:
  """The selection scores of a method's grid so far (``None``: not run, ``-inf``: failed);
  the grid grows by one rate (x3) when its largest is the best."""
  rates = list(GRIDS[METHODS[method][1]])
  while True:
    scores = {}
    for lr in rates:
      res = read(os.path.join(out, "select", method, lr_name(lr)), SELECTION_SEED)
      scores[lr] = None if res is None else (res.get("selection_score")
                                              if res.get("selection_score") is not None
                                              else float("-inf"))
    if None in scores.values():
      return scores
    best = choose(scores)
    if best != rates[-1]:
      return scores
    rates.append(round(rates[-1] * 3, 10))


def choose(scores: dict[float, float]) -> float:
  """The rate with the best selection score; ties go to the smaller rate."""
  return max(sorted(scores), key=lambda lr: scores[lr])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shared", required=True, help="the folder with glue/ and nli/")
  parser.add_argument("--out", default="results/llm")
  parser.add_argument("--work", default=os.path.join(os.path.expanduser("~"), ".cache",
                                                     "childtune-jax", "llm-study"),
                      help="where the study's data folder is made (not committed)")
  parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
  parser.add_argument("--stage", choices=("select", "test", "all"), default="all")
  args = parser.parse_args()
  make_data(args.shared, args.work)
  base_scores(args.out, args.work)
  while True:
    progressed = busy = False
    choices = {}
    for method in args.methods:  # the selection grid
      for lr, score in grid(method, args.out).items():
        if score is None and args.stage in ("select", "all"):
          state = train(args.out, args.work, method, lr, SELECTION_SEED,
                        os.path.join(args.out, "select", method, lr_name(lr)), test=False)
          progressed |= state in ("ran", "failed")
          busy |= state == "busy"
      scores = grid(method, args.out)
      if None not in scores.values():
        choices[method] = {"learning_rate": choose(scores),
                           "grid": {f"{lr:g}": s for lr, s in sorted(scores.items())}}
    if choices:
      path = os.path.join(args.out, "choice.json")
      previous = {}
      if os.path.exists(path):
        with open(path) as f:
          previous = json.load(f)
      files.write_json(path, {**previous, **choices})
    if args.stage in ("test", "all"):
      for method, choice in choices.items():
        for seed in TEST_SEEDS:
          folder = os.path.join(args.out, "test", method)
          state = train(args.out, args.work, method, choice["learning_rate"], seed, folder,
                        test=True)
          progressed |= state in ("ran", "failed")
          busy |= state == "busy"
    remaining = [m for m in args.methods if m not in choices] or [
        m for m in choices for s in TEST_SEEDS
        if read(os.path.join(args.out, "test", m), s) is None]
    if not remaining:
      print("the study is complete", flush=True)
      return
    if not progressed:
      if not busy:
        print("nothing this worker can run now", flush=True)
        return
      time.sleep(60)  # the other worker holds what is left: wait for it


if __name__ == "__main__":
  main()
