"""The tuned study: each method tuned on a selection split, then tested once on unseen data.

Protocol (``results/tuned/README.md``): per task and seed, 1,000 training examples and a
disjoint selection split of 500 more, both drawn from the training file (``childtune train
--selection-samples``). Every grid point of every method trains on the selection seeds
with the dev set unseen (``--selection-only``); a method's point with the best mean
selection score is its choice, and only then do fresh test seeds train at that point and
score the official dev set, which so chooses nothing.

The NLI transfer arm (task ``snli``, ``--nli DIR``; issue 20) follows the same protocol on
SNLI: per seed 5,000 training pairs and a selection split of 1,000 more from SNLI's
validation file, after a held-out split of 2,000 drawn once for all seeds (the in-domain
test); the test runs also score SICK's TEST part zero-shot (``sick/test``).

The multi-task arm (task ``glue4``; issue 18) trains SST-2, CoLA, MRPC and RTE together
(``childtune multitask``: one encoder, a head per task), each task's data as in its own
arm (the same 1,000 training examples and 500 selection examples per task and seed), by
multi-task vanilla AdamW and by shared-D (one child network from the tasks' normalised
Fisher information); its selection score is the tasks' mean main metric on their
selection splits, and its test runs are compared per task with the single-task runs of
the same seeds.

Layout, all resumable (a finished run is never rerun; stop and continue at any time)::

  OUT/<task>/select/<method>/lr<LR>-ep<E>/seed-<s>/results.json   selection runs
  OUT/<task>/masks/<method>-seed-<s>.npz    D's child network of a seed: one Fisher pass,
                                            reused across the grid (it depends on the seed,
                                            not on the learning rate or epochs)
  OUT/<task>/choice.json                    each method's chosen point, with the evidence
  OUT/<task>/test/<method>/seed-<s>/results.json   test runs at the chosen point
  OUT/<task>/control/vanilla-at-<method>/seed-<s>/results.json
                                            vanilla on the test seeds at <method>'s chosen
                                            point (``--control-at``): its learning rate and
                                            length without its masks

  python examples/tuned_study.py --glue ../shared/glue --nli ../shared/nli --out results/tuned

Adding a method is one line in ``METHODS``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Sequence

import numpy as np

from childtune_jax.app import cli, files, presets

# p: the authors' per-task value (`presets.AUTHORS_P`); SNLI (none stated for this setting)
# and glue4 (one network for the four tasks) take the default 0.3.
METHODS = {  # method: its childtune arguments; {p_F} and {p_D} are the task's p
    "vanilla": "--mode vanilla",
    "F": "--mode F --reserve-p {p_F}",
    "D": "--mode D --reserve-p {p_D} --fisher per-example",
    "dynamic": "--mode dynamic --reserve-p {p_D}",
    "shared-D": "--mode shared-D --reserve-p {p_D}",  # multi-task only
}
MULTI, MULTI_TASKS = "glue4", ("sst2", "cola", "mrpc", "rte")
TASK_METHODS = {MULTI: ("vanilla", "shared-D")}  # the rest: every single-task method
SINGLE_METHODS = ("vanilla", "F", "D", "dynamic")
MAX_LEN = {"sst2": 64, "cola": 64, "mrpc": 128, "rte": 128, "snli": 128, "glue4": 128}
LEARNING_RATES = (2e-5, 5e-5, 1e-4, 2e-4, 5e-4)
EPOCHS, LONG_EPOCHS = 3, 10
SELECTION_SEEDS = (1, 2)
TEST_SEEDS = (101, 102, 103, 104, 105)
TRAIN_SAMPLES, SELECTION_SAMPLES = 1000, 500
NLI_TRAIN, NLI_SELECTION, NLI_HELDOUT = 5000, 1000, 2000
FAILED = "failed.json"  # a run that could not finish (e.g. diverged): never chosen


def data_args(task: str, args: argparse.Namespace) -> list[str]:
  """The task's data options: GLUE's files, or SNLI's validation file with SICK's test."""
  if task == "snli":
    if not args.nli:
      sys.exit("task snli needs --nli DIR (the folder with SNLI/ and SICK/)")
    return ["--data-dir", args.nli, "--train-split", "validation",
            "--heldout-samples", str(NLI_HELDOUT), "--max-train-samples", str(NLI_TRAIN),
            "--selection-samples", str(NLI_SELECTION), "--eval-task", "sick:test"]
  if not args.glue:
    sys.exit(f"task {task} needs --glue DIR")
  return ["--data-dir", args.glue, "--max-train-samples", str(TRAIN_SAMPLES),
          "--selection-samples", str(SELECTION_SAMPLES)]


def method_args(method: str, task: str) -> list[str]:
  return METHODS[method].format(p_F=presets.reserve_p(task, "F"),
                                p_D=presets.reserve_p(task, "D")).split()


def point_name(lr: float, epochs: int) -> str:
  return f"lr{lr:g}-ep{epochs}"


def read_results(folder: str, seeds: Sequence[int]) -> dict[int, dict]:
  """The finished ``results.json`` of ``seeds`` in ``folder``; a failed run as ``FAILED``."""
  out = {}
  for seed in seeds:
    for name in ("results.json", FAILED):
      path = os.path.join(folder, f"seed-{seed}", name)
      if os.path.exists(path):
        with open(path) as f:
          out[seed] = json.load(f)
        break
  return out


def selection_scores(runs: dict[int, dict]) -> list[float]:
  """Selection scores of a grid point; a run that failed (diverged) scores ``-inf``."""
  return [r["selection_score"] if r.get("selection_score") is not None else -np.inf
          for r in runs.values()]


def choose(points: dict[tuple[float, int], list[float]]) -> tuple[float, int]:
  """The point with the best mean selection score; ties go to fewer epochs, then lower lr."""
  return max(sorted(points, key=lambda p: (p[1], p[0])),
             key=lambda p: float(np.mean(points[p])))


def still_rising(runs: dict[int, dict]) -> bool:
  """Whether the mean selection score rose over the last epoch (more epochs may help)."""
  if not runs or any("selection_by_epoch" not in r for r in runs.values()):
    return False  # a failed run: nothing to extend
  by_epoch = np.array([r["selection_by_epoch"] for r in runs.values()], dtype=float)
  return by_epoch.shape[1] >= 2 and bool(np.mean(by_epoch[:, -1]) > np.mean(by_epoch[:, -2]))


class Study:
  """Runs the protocol for one task; every step skips what is already finished."""

  def __init__(self, task: str, args: argparse.Namespace):
    self.task, self.args = task, args
    self.root = os.path.join(args.out, task)

  def _train(self, method: str, out: str, seed: int, lr: float, epochs: int,
             extra: Sequence[str]) -> None:
    if any(os.path.exists(os.path.join(out, f"seed-{seed}", n)) for n in ("results.json", FAILED)):
      return
    command = (["multitask", "--tasks", *MULTI_TASKS] if self.task == MULTI
               else ["train", "--task", self.task])
    argv = [*command, *method_args(method, self.task),
            *data_args(self.task, self.args), "--max-seq-length", str(MAX_LEN[self.task]),
            "--learning-rate", f"{lr:g}",
            "--epochs", str(epochs), "--seeds", str(seed), "--no-save-model",
            "--save-every", "100", "--output-dir", out, "--resume", *extra,
            "--backend", self.args.backend]
    if self.args.model:
      argv += ["--model", self.args.model]
    if self.args.compilation_cache:
      argv += ["--compilation-cache", self.args.compilation_cache]
    masks = os.path.join(self.root, "masks", f"{method}-seed-{files.SEED_FIELD}.npz")
    mask = files.for_seed(masks, seed)
    fisher = method in ("D", "shared-D")  # a network that depends on the seed alone
    if fisher and os.path.exists(mask):  # the same argument for every seed: one experiment
      argv += ["--child-mask", masks]
    print("+ childtune " + " ".join(argv), flush=True)
    status = cli.main(argv)
    if status == 1:  # the run failed (diverged): a result of this grid point, recorded
      os.makedirs(os.path.join(out, f"seed-{seed}"), exist_ok=True)
      files.write_json(os.path.join(out, f"seed-{seed}", FAILED),
                       {"failed": True, "argv": argv, "selection_score": None})
      return
    if status:
      sys.exit(f"failed: {' '.join(argv)}")
    own = os.path.join(out, f"seed-{seed}", "child_mask.npz")
    if fisher and not os.path.exists(mask):
      os.makedirs(os.path.dirname(mask), exist_ok=True)
      with files.replacing(mask) as tmp:
        shutil.copyfile(own, tmp)

  def select_dir(self, method: str, lr: float, epochs: int) -> str:
    return os.path.join(self.root, "select", method, point_name(lr, epochs))

  def selection(self, method: str) -> dict | None:
    """Runs ``method``'s grid on the selection seeds; its choice, once the grid is complete."""
    for seed in SELECTION_SEEDS:  # seed-major: each seed completes a comparable sweep
      for lr in LEARNING_RATES:
        self._train(method, self.select_dir(method, lr, EPOCHS), seed, lr, EPOCHS,
                    ["--selection-only"])
    grid = {(lr, EPOCHS): read_results(self.select_dir(method, lr, EPOCHS), SELECTION_SEEDS)
            for lr in LEARNING_RATES}
    best_lr, _ = choose({p: selection_scores(runs) for p, runs in grid.items()})
    if still_rising(grid[(best_lr, EPOCHS)]):
      for seed in SELECTION_SEEDS:
        self._train(method, self.select_dir(method, best_lr, LONG_EPOCHS), seed, best_lr,
                    LONG_EPOCHS, ["--selection-only"])
      grid[(best_lr, LONG_EPOCHS)] = read_results(
          self.select_dir(method, best_lr, LONG_EPOCHS), SELECTION_SEEDS)
    scores = {p: selection_scores(runs) for p, runs in grid.items()}
    lr, epochs = choose(scores)
    return {"learning_rate": lr, "epochs": epochs, "selection_seeds": list(SELECTION_SEEDS),
            "grid": [{"learning_rate": p[0], "epochs": p[1], "mean": float(np.mean(s)),
                      "scores": s} for p, s in sorted(scores.items())]}  # null: diverged

  def run(self, methods: Sequence[str]) -> None:
    own = TASK_METHODS.get(self.task, SINGLE_METHODS)
    methods = [m for m in methods if m in own]
    controls = [m for m in self.args.control_at if m in own]
    choice_path = os.path.join(self.root, "choice.json")
    choices = {}
    if os.path.exists(choice_path):
      with open(choice_path) as f:
        choices = json.load(f)
    for method in methods:
      if method not in choices:  # a choice, once made, is final: tests never revise it
        choices[method] = self.selection(method)
        files.write_json(choice_path, choices)
    if missing := [m for m in controls if m not in choices]:
      sys.exit(f"--control-at {' '.join(missing)}: {self.task} has no choice for it yet "
               "(run its selection first: --methods)")
    for seed in TEST_SEEDS:  # seed-major: each seed adds one paired comparison
      for method in methods:
        c = choices[method]
        self._train(method, os.path.join(self.root, "test", method), seed,
                    c["learning_rate"], c["epochs"], [])
    for seed in TEST_SEEDS:  # vanilla at another method's point: its schedule, no masks
      for method in controls:
        c = choices[method]
        self._train("vanilla", os.path.join(self.root, "control", f"vanilla-at-{method}"),
                    seed, c["learning_rate"], c["epochs"], [])


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--glue", help="folder with the GLUE TSV tasks")
  parser.add_argument("--nli", help="folder with SNLI/ and SICK/ (task snli)")
  parser.add_argument("--out", default="results/tuned")
  parser.add_argument("--tasks", nargs="+",
                      default=["sst2", "cola", "mrpc", "rte", "glue4", "snli"],
                      choices=sorted(MAX_LEN))
  parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
  parser.add_argument("--model", help="default: the packaged all-MiniLM-L6-v2")
  parser.add_argument("--backend", choices=("nnx", "hf-flax"), default="hf-flax",
                      help="the model implementation (default hf-flax: every run of this "
                           "study so far, so that a seed's head initialisation is the same)")
  parser.add_argument(
      "--compilation-cache", metavar="DIR",
      default=os.environ.get("JAX_COMPILATION_CACHE_DIR")
      or os.path.join(os.path.expanduser("~"), ".cache", "childtune-jax", "xla"),
      help="JAX's persistent compilation cache, shared by the runs ('' for none)")
  parser.add_argument(
      "--control-at", nargs="+", default=[], metavar="METHOD",
      choices=[m for m in METHODS if m != "vanilla"],
      help="also train vanilla on the test seeds at each METHOD's chosen point (its "
           "learning rate and epochs, no masks): does the method's difference to vanilla "
           "come from its schedule or from its masks?")
  args = parser.parse_args(argv)
  for task in args.tasks:
    Study(task, args).run(args.methods)


if __name__ == "__main__":
  main()
