"""Two JAX processes on localhost, 4 emulated CPU devices each: one run over 8 devices.

Each process runs the same ``childtune train`` (``JAX_COORDINATOR_ADDRESS``,
``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``, as a multi-host launch sets them); the CPU
collectives go through gloo. The one-process reference runs in this process. Tolerance as
in ``test_multidevice``: training losses to rtol 1e-5, dev metrics and D's mask equal; the
saved model to atol 1e-5 (only the order of float reductions differs).
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
from conftest import GLUE, HERE, TINY

from childtune_jax.app import cli

BASE = ["train", "--task", "mrpc", "--model", TINY, "--data-dir", GLUE, "--epochs", "1",
        "--batch-size", "8", "--max-seq-length", "32", "--learning-rate", "1e-3",
        "--compilation-cache", ""]

RUN_JOBS = os.path.join(HERE, "fixtures", "run_jobs.py")


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _run_two_processes(jobs):
  address = f"localhost:{_free_port()}"
  procs = []
  for pid in range(2):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES="2",
               JAX_PROCESS_ID=str(pid))
    procs.append(subprocess.Popen([sys.executable, RUN_JOBS, json.dumps(jobs), "8"], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  outs = []
  try:
    for proc in procs:
      outs.append(proc.communicate(timeout=600))
  finally:
    for proc in procs:
      proc.kill()
  for pid, (proc, (stdout, stderr)) in enumerate(zip(procs, outs)):
    assert proc.returncode == 0 and f"JOBS OK {pid}" in stdout, stderr[-3000:]


def _results(out):
  with open(os.path.join(out, "seed-42", "results.json")) as f:
    return json.load(f)


def test_two_processes_train_like_one_device(tmp_path):
  runs = {"F": ("data=8", ["--no-save-model"]),  # each process puts its half of each batch
          "D": ("data=4,fsdp=2", [])}  # D's Fisher, mask and saved model span both processes
  for mode, (_, extra) in runs.items():
    assert cli.main([*BASE, "--mode", mode, *extra, "--output-dir",
                     str(tmp_path / f"one-{mode}")]) == 0
  jobs = [{"argv": [*BASE, "--mode", mode, *extra, "--mesh", mesh, "--output-dir",
                    str(tmp_path / f"two-{mode}")]} for mode, (mesh, extra) in runs.items()]
  part = str(tmp_path / "part")  # orbax saves from both processes, then restores elsewhere
  f_argv = [*BASE, "--mode", "F", "--no-save-model", "--output-dir", part]
  jobs.append({"argv": [*f_argv, "--save-every", "2"], "die_at": 4})
  jobs.append({"argv": [*f_argv, "--mesh", "data=2,fsdp=4", "--resume"]})
  _run_two_processes(jobs)

  for mode in runs:
    one, two = _results(str(tmp_path / f"one-{mode}")), _results(str(tmp_path / f"two-{mode}"))
    np.testing.assert_allclose(two["train_losses"], one["train_losses"], rtol=1e-5)
    assert two["metrics"] == one["metrics"]
    assert two["device"]["count"] == 8 and two["device"]["processes"] == 2
  part_res, one_f = _results(part), _results(str(tmp_path / "one-F"))
  np.testing.assert_allclose(part_res["train_losses"], one_f["train_losses"], rtol=1e-5)
  assert part_res["metrics"] == one_f["metrics"]

  with np.load(tmp_path / "one-D" / "seed-42" / "child_mask.npz") as a, \
       np.load(tmp_path / "two-D" / "seed-42" / "child_mask.npz") as b:
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
  from childtune_jax import models

  one = models.read_safetensors(str(tmp_path / "one-D" / "seed-42" / "model"))
  two = models.read_safetensors(str(tmp_path / "two-D" / "seed-42" / "model"))
  assert set(one) == set(two)
  for name in one:
    np.testing.assert_allclose(two[name], one[name], atol=1e-5, err_msg=name)
  # Only process 0 wrote: one results file per run, no stray files from process 1.
  assert sorted(os.listdir(tmp_path / "two-D")) == ["seed-42", "summary.json"]
