"""benchmarks/accelerator.py: every case written as it finishes, a budget that skips, a kill."""

import importlib.util
import json
import os
import subprocess
import sys
import time

from conftest import HERE

SCRIPT = os.path.join(HERE, os.pardir, "benchmarks", "accelerator.py")


def _load():
  spec = importlib.util.spec_from_file_location("accelerator", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _rows(out):
  with open(os.path.join(out, "results.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_smoke_writes_every_case_with_its_fields(tmp_path):
  out = str(tmp_path / "smoke")
  _load().main(["--smoke", "--out", out])
  rows = _rows(out)
  cases = [r["case"] for r in rows]
  assert cases[-1] == "done" and not any("skipped" in r for r in rows)
  updates = [r for r in rows if r.get("group") == "update"]
  assert [r["case"] for r in updates][0] == "update adamw" and len(updates) == 6
  for r in updates:  # the bandwidth is the bytes the update moves over its time
    assert abs(r["gb_per_s"] - r["bytes_moved"] / (r["ms"] / 1000) / 1e9) < 1e-6 * r["gb_per_s"]
    assert r["ratio"] == r["ms"] / updates[0]["ms"]
  steps = [r for r in rows if r.get("group") == "train_step"]
  assert {(r["dtype"], r["case"].split()[-1]) for r in steps} == {
      (d, m) for d in ("float32", "bfloat16") for m in ("vanilla", "F", "D")}
  for r in steps:
    assert r["compile_s"] > 0 and r["ms"] > 0
    assert abs(r["examples_per_s"] - r["batch"] / (r["ms"] / 1000)) < 1e-6 * r["examples_per_s"]
  assert {"fisher per-example tiny", "fisher_mask tiny"} <= set(cases)
  assert all(r["platform"] == "cpu" and r["jax"] for r in rows)


def test_budget_skips_and_says_so(tmp_path):
  out = str(tmp_path / "budget")
  _load().main(["--smoke", "--out", out, "--budget-s", "5"])
  rows = _rows(out)
  skipped = [r for r in rows if "skipped" in r]
  assert skipped and all("left" in r["skipped"] for r in skipped)
  assert rows[-1]["case"] == "done"


def test_a_killed_run_keeps_the_cases_it_finished(tmp_path):
  out = str(tmp_path / "killed")
  proc = subprocess.Popen([sys.executable, SCRIPT, "--smoke", "--out", out],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  path = os.path.join(out, "results.jsonl")
  deadline = time.time() + 240
  try:
    while time.time() < deadline:
      if os.path.exists(path) and len(open(path).read().splitlines()) >= 2:
        break
      time.sleep(0.2)
  finally:
    proc.kill()
    proc.wait()
  rows = _rows(out)
  assert len(rows) >= 2 and rows[0]["case"] == "update adamw"
  assert rows[-1]["case"] != "done"
