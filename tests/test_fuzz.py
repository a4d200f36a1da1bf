"""A seeded fuzz test of the command line's bad-input contract.

Each case is a valid command with one hostile thing in it (an option's value, a path, a
folder held by another command), and random valid options around it (the mode, seeds,
``--resume`` or ``--overwrite``, the order of the options). The contract, for every case:
exit code 2, one line on stderr that starts ``childtune: error:`` and names what is wrong
(the option or the value given it),
no traceback; a finished run given as ``--output-dir`` stays byte-identical, and a new
folder is not created. The cases are drawn from a fixed seed, so a failure names its case
and replays.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil

import pytest
from conftest import BASE, FIXTURES, NLI, snapshot

from childtune_jax.app import cli, rundir

TINY_LLAMA = os.path.join(FIXTURES, "llama", "tiny-llama")
SFT = ["sft", "--model", TINY_LLAMA, "--task", "snli", "--data-dir", NLI, "--train-split",
       "validation", "--batch-size", "4", "--max-seq-length", "64", "--learning-rate", "1e-2",
       "--epochs", "1", "--no-save-model"]
# What a case may add around its hostile part, all valid on their own.
MODES = {"train": ["vanilla", "F", "D", "random", "dynamic"],
         "sft": ["vanilla", "F", "D", "dynamic", "lora", "hft"]}
EXTRAS = [[], ["--seeds", "1", "2"], ["--seeds", "42"], ["--resume"], ["--overwrite"],
          ["--warmup-ratio", "0.2"], ["--pad-multiple", "8"], ["--report-to", "none"]]


def _hostile(paths: dict[str, str]) -> dict[str, list[tuple[list[str], str]]]:
  """Per command: (the hostile arguments, a word the error must contain)."""
  common = [
      (["--learning-rate", "nan"], "--learning-rate"),
      (["--learning-rate", "inf"], "--learning-rate"),
      (["--learning-rate", "fast"], "--learning-rate"),
      (["--weight-decay", "-inf"], "--weight-decay"),
      (["--reserve-p", "0"], "--reserve-p"),
      (["--reserve-p", "1.5"], "--reserve-p"),
      (["--reserve-p", "nan"], "--reserve-p"),
      (["--batch-size", "0"], "--batch-size"),
      (["--batch-size", "-8"], "--batch-size"),
      (["--batch-size", "2.5"], "--batch-size"),
      (["--epochs", "0"], "--epochs"),
      (["--epochs", "-1"], "--epochs"),
      (["--max-seq-length", "0"], "--max-seq-length"),
      (["--seeds", "-1"], "--seeds"),
      (["--seeds", "18446744073709551616"], "--seeds"),
      (["--seeds", "x"], "--seeds"),
      (["--warmup-ratio", "1.5"], "--warmup-ratio"),
      (["--warmup-ratio", "nan"], "--warmup-ratio"),
      (["--max-train-samples", "0"], "--max-train-samples"),
      (["--max-train-samples", "-5"], "--max-train-samples"),
      (["--pad-multiple", "0"], "--pad-multiple"),
      (["--grad-accum", "0"], "--grad-accum"),
      (["--mesh", "model=2"], "--mesh"),
      (["--mesh", "data=0"], "--mesh"),
      (["--dtype", "float16"], "--dtype"),
      (["--sampler", "dice"], "--sampler"),
      (["--model", paths["missing"]], paths["missing"]),
      (["--model", paths["file"]], paths["file"]),
      (["--data-dir", paths["missing"]], paths["missing"]),
      (["--data-dir", paths["file"]], paths["file"]),
      (["--eval-task", "nope:dev"], "nope"),
      (["--child-mask", paths["missing"]], "--child-mask"),
      (["--child-mask", paths["file"]], "--child-mask"),
      (["--compilation-cache", paths["file"]], "--compilation-cache"),
      (["--resume", "--overwrite"], "--overwrite"),
      (["--selection-samples", "-1"], "--selection-samples"),
      (["--report-to", "wandb"], "--report-to"),
  ]
  return {"train": [*common, (["--task", "nope"], "--task"),
                    (["--every", "0"], "--every")],
          "sft": [*common, (["--lora-rank", "0"], "--lora-rank"),
                  (["--hft-every", "-1"], "--hft-every"),
                  (["--eval-text", "novalue"], "--eval-text"),
                  (["--eval-text", f"x={paths['missing']}"], paths["missing"])]}


def _code(argv: list[str]) -> int:
  try:
    return cli.main(argv)
  except SystemExit as e:  # argparse's errors exit from inside the parser
    return e.code


@pytest.mark.parametrize("command", ["train", "sft"])
def test_hostile_cases_keep_the_contract(command, finished, tmp_path, capsys):
  rng = random.Random(f"fuzz-{command}")
  paths = {"missing": str(tmp_path / "no-such-thing"), "file": str(tmp_path / "a-file.txt")}
  with open(paths["file"], "w") as f:
    f.write("not a model, a folder or a mask\n")
  base = BASE if command == "train" else SFT
  fin = str(tmp_path / "FIN")
  shutil.copytree(finished / "vanilla", fin)
  before = snapshot(fin)
  cases = _hostile(paths)[command]
  broken: list[str] = []
  for i in range(40):
    hostile, word = rng.choice(cases)
    lock = rng.random() < 0.1
    if lock:  # the folder held by another command, and otherwise valid
      hostile, word = rng.choice([["--overwrite"], ["--resume"]]), "in use by another"
    extra = [x for x in rng.choice(EXTRAS) if x not in ("--overwrite", "--resume")]
    out = fin if (lock or command == "train" and rng.random() < 0.7) else str(
        tmp_path / f"new-{i}")
    if out == fin and not lock and "--resume" not in hostile:
      extra = [*extra, "--overwrite"]  # valid on its own: replacing the finished run
    elif out != fin and rng.random() < 0.3:
      extra = [*extra, "--resume"]  # valid on its own: nothing to resume, a fresh start
    if "--overwrite" in hostile and "--resume" in hostile:
      extra = [x for x in extra if x not in ("--overwrite", "--resume")]
    mode = rng.choice(MODES[command])
    parts = [["--mode", mode], ["--output-dir", out], extra, hostile]
    rng.shuffle(parts)
    argv = [*base, *(x for part in parts for x in part)]
    case = f"case {i}: {' '.join(argv[len(base):])}"
    with rundir.locked(fin) if lock else contextlib.nullcontext():
      code = _code(argv)
    err = capsys.readouterr().err.strip()
    lines = err.splitlines()
    if code != 2:
      broken.append(f"{case}: exit {code}: {err[-300:]}")
    elif not (len(lines) == 1 and lines[0].startswith("childtune: error:")):
      broken.append(f"{case}: not one error line: {err[-300:]}")
    elif not any(w in err for w in (word, *hostile[1:])) or "Traceback" in err:
      broken.append(f"{case}: names neither {word!r} nor its value: {err}")
    now = {k: v for k, v in snapshot(fin).items() if k != rundir.LOCK_FILE}
    if now != before:
      broken.append(f"{case}: the finished run changed")
      shutil.rmtree(fin)
      shutil.copytree(finished / "vanilla", fin)
    if out != fin and os.path.exists(out):
      broken.append(f"{case}: made {out}")
  assert not broken, "\n".join(broken)
