"""The CLI on 8 emulated CPU devices: data parallelism and FSDP give one device's numbers.

The 8-device runs happen in a subprocess (the device count is fixed when JAX starts); the
one-device reference runs in this process. Tolerance: training losses to rtol 1e-5 (only
the order of float reductions differs), dev metrics equal.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import GLUE, HERE, TINY

from childtune_jax.app import classifier, cli

BASE = ["train", "--task", "mrpc", "--model", TINY, "--data-dir", GLUE, "--epochs", "1",
        "--batch-size", "8", "--max-seq-length", "32", "--learning-rate", "1e-3",
        "--no-save-model"]

RUN_JOBS = os.path.join(HERE, "fixtures", "run_jobs.py")


def _results(out):
  with open(os.path.join(out, "seed-42", "results.json")) as f:
    return json.load(f)


def _run8(jobs):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, RUN_JOBS, json.dumps(jobs), "8"], env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0 and "JOBS OK 0" in proc.stdout, proc.stderr[-3000:]
  return proc


def _same(a, b):
  np.testing.assert_allclose(a["train_losses"], b["train_losses"], rtol=1e-5)
  assert a["metrics"] == b["metrics"]


def test_data_and_fsdp_meshes_equal_one_device_and_resume_across_meshes(tmp_path):
  cases = [("vanilla", "data=8"), ("D", "data=8"), ("F", "data=4,fsdp=2"),
           ("D", "data=4,fsdp=2")]
  for mode in ("vanilla", "F", "D"):
    assert cli.main([*BASE, "--mode", mode, "--output-dir", str(tmp_path / f"one-{mode}")]) == 0
  jobs = [{"argv": [*BASE, "--mode", mode, "--mesh", mesh, "--output-dir",
                    str(tmp_path / f"{mesh}-{mode}")]} for mode, mesh in cases]
  part = str(tmp_path / "part")  # F killed on data=8 after its step-2 checkpoint ...
  jobs.append({"argv": [*BASE, "--mode", "F", "--save-every", "2", "--output-dir", part],
               "die_at": 4})
  jobs.append({"argv": [*BASE, "--mode", "F", "--mesh", "data=2,fsdp=4", "--output-dir", part,
                        "--resume"]})  # ... resumes on another mesh
  jobs.append({"argv": [*BASE, "--mode", "F", "--mesh", "data=3", "--output-dir",
                        str(tmp_path / "bad")], "status": 2})
  jobs.append({"argv": [*BASE, "--mode", "F", "--batch-size", "12", "--output-dir",
                        str(tmp_path / "bad")], "status": 2})
  proc = _run8(jobs)
  for mode, mesh in cases:
    one = _results(str(tmp_path / f"one-{mode}"))
    many = _results(str(tmp_path / f"{mesh}-{mode}"))
    _same(many, one)
    axes = {"fsdp": 1, **{k: int(v) for k, v in (p.split("=") for p in mesh.split(","))}}
    assert many["device"]["count"] == 8 and many["device"]["mesh"] == axes
    if mode == "D":  # the Fisher pass split over the mesh picks the same network
      assert many["child_network"] == one["child_network"]
  _same(_results(part), _results(str(tmp_path / "one-F")))
  assert "does not divide over 8 devices" in proc.stderr
  assert "--mesh 'data=3' has 3 devices, but 8 are visible" in proc.stderr
  assert not os.path.exists(tmp_path / "bad")


@pytest.fixture
def no_dropout(tmp_path):
  model = tmp_path / "no-dropout"
  shutil.copytree(TINY, model)
  with open(model / "config.json") as f:
    config = json.load(f)
  config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  (model / "config.json").write_text(json.dumps(config))
  return str(model)


@pytest.mark.parametrize("mode", ["vanilla", "F"])
def test_grad_accum_equals_the_large_batch(tmp_path, no_dropout, mode):
  # 2 micro-batches of 4 accumulate to the batch of 8 (no dropout: the same function), and
  # F draws one mask per optimizer step: the same masks as without accumulation.
  argv = [*BASE, "--mode", mode, "--model", no_dropout]
  assert cli.main([*argv, "--output-dir", str(tmp_path / "big")]) == 0
  assert cli.main([*argv, "--batch-size", "4", "--grad-accum", "2",
                   "--output-dir", str(tmp_path / "accum")]) == 0
  big, accum = _results(str(tmp_path / "big")), _results(str(tmp_path / "accum"))
  micro = np.array(accum["train_losses"]).reshape(-1, 2).mean(1)
  np.testing.assert_allclose(micro, big["train_losses"], rtol=1e-5)
  assert accum["metrics"] == big["metrics"]


def test_half_precision_checkpoint_trains_float32_master_weights(tmp_path, caplog):
  import logging

  import jax
  import jax.numpy as jnp
  from flax import nnx
  from safetensors.numpy import save_file

  from childtune_jax import models

  caplog.set_level(logging.INFO, logger="childtune_jax.app.classifier")
  cfg = models.EncoderConfig.from_file(os.path.join(TINY, "config.json"), num_labels=2)
  half = tmp_path / "half"
  models.save_pretrained(models.SequenceClassifier(cfg, rngs=nnx.Rngs(0)), str(half))
  tensors = models.to_pytorch_layout(models.SequenceClassifier(cfg, rngs=nnx.Rngs(0)))
  save_file({k: v.astype(np.float16) for k, v in tensors.items()},
            str(half / "model.safetensors"))
  for name in ("vocab.txt", "tokenizer_config.json"):
    shutil.copy(os.path.join(TINY, name), half / name)
  model, _ = classifier.load_classifier(str(half), 2, 0, jnp.bfloat16)
  assert {x.dtype for x in jax.tree_util.tree_leaves(model.params)} == {jnp.dtype("float32")}
  for value in models.read_safetensors(str(half)).values():  # stored in half precision
    assert value.dtype == np.float16
  assert "float16" in caplog.text and "float32 master weights" in caplog.text
  out = str(tmp_path / "bf16")
  assert cli.main([*BASE, "--mode", "F", "--model", str(half), "--dtype", "bfloat16",
                   "--output-dir", out]) == 0
  res = _results(out)
  assert res["device"]["dtype"] == "bfloat16" and np.isfinite(res["train_losses"]).all()


def test_evaluate_on_eight_devices_equals_one(tmp_path):
  out = str(tmp_path / "run")
  argv = [a for a in BASE if a != "--no-save-model"]
  assert cli.main([*argv, "--mode", "vanilla", "--output-dir", out]) == 0
  score = ["evaluate", "--model", os.path.join(out, "seed-42", "model"), "--task", "mrpc",
           "--data-dir", GLUE, "--max-seq-length", "32", "--batch-size", "5"]  # 8 on 8 devices
  one, many = str(tmp_path / "one.json"), str(tmp_path / "many.json")
  assert cli.main([*score, "--json", one]) == 0
  _run8([{"argv": [*score, "--json", many]}])
  with open(one) as a, open(many) as b:
    one, many = json.load(a), json.load(b)
  assert many["metrics"] == one["metrics"] == _results(out)["metrics"]
