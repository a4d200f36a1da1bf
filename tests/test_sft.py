"""``childtune sft``, ``lm-evaluate`` and ``generate`` on a tiny decoder, against independent
computations: full forward passes, a NumPy sum of log-probabilities, a loop without cache."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FIXTURES, NLI

from childtune_jax import decoder, parallel
from childtune_jax.app import cli, generate, lm, lmdata, prompts, sft
from childtune_jax.app.tasks import TASKS

TINY = os.path.join(FIXTURES, "llama", "tiny-llama")
SFT = ["sft", "--model", TINY, "--batch-size", "4", "--max-seq-length", "64",
       "--learning-rate", "1e-2", "--epochs", "1",
       "--pad-multiple", "64"]  # one padded length: one compiled program a function


@pytest.fixture(scope="module")
def model():
  return lm.load(TINY)


def _snli(n=6):
  from childtune_jax.app import data

  task, template = prompts.template("snli")
  examples = data.read_split(task, NLI, "validation")
  return lmdata.from_examples(examples.subset(range(n)), template)


def _full_nll(model, prompt_ids, response_ids):
  """-log p(response | prompt) from one forward pass of the whole sequence, summed in NumPy."""
  seq = prompt_ids + response_ids
  logits = np.asarray(model.apply(model.params, jnp.asarray([seq])))[0].astype(np.float64)
  top = logits.max(-1, keepdims=True)
  logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
  start = len(prompt_ids)
  return -sum(logp[t - 1, seq[t]] for t in range(start, len(seq)))


def test_choices_read_from_the_cache_equal_full_passes(model):
  pairs = _snli()
  enc = lmdata.encode(model.tokenizer, pairs, 64, chat=True)
  mesh = parallel.make_mesh(parallel.parse_mesh(None, jax.device_count()))
  evaluate = sft.evaluator(model, {"snli": enc}, mesh, rows=4, max_seq_length=64,
                           pad_multiple=16)
  got = evaluate(model.params, "snli")
  eos = [model.tokenizer.eos_id]
  nll = np.array([[_full_nll(model, enc.prompt_ids[i], a + eos) for a in enc.answer_ids]
                  for i in range(len(enc))])
  true = nll[np.arange(len(enc)), enc.labels]
  tokens = sum(len(enc.answer_ids[y]) + 1 for y in enc.labels)
  np.testing.assert_allclose(got["loss"], true.sum() / tokens, rtol=1e-4)
  assert got["accuracy"] == np.mean(nll.argmin(-1) == enc.labels)


def test_the_training_loss_reads_the_response_logits_only(model):
  pairs = _snli(4)
  enc = lmdata.encode(model.tokenizer, pairs, 64, chat=False)
  batch = lmdata.make_batch(enc, range(4), 64, model.tokenizer.pad_id, rows=5)
  got = sft.make_loss(model)(model.params, batch)
  logits = model.apply(model.params, batch["input_ids"], batch["attention_mask"])
  want = decoder.causal_lm_loss(logits, batch["input_ids"], batch["loss_mask"],
                                batch["weights"])
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # ... and the loss mask covers exactly each response and its end token
  for row in range(4):
    n = len(enc.prompt_ids[row]) + len(enc.response_ids[row])
    assert batch["loss_mask"][row].tolist() == ([0] * len(enc.prompt_ids[row])
                                                + [1] * len(enc.response_ids[row])
                                                + [0] * (batch["loss_mask"].shape[1] - n))
  assert batch["weights"].tolist() == [1, 1, 1, 1, 0]


def test_greedy_generation_with_the_cache_equals_argmax_without(model):
  from flax import nnx

  from childtune_jax.models import llama

  module = nnx.merge(nnx.graphdef(llama.CausalLM(model.config, rngs=nnx.Rngs(0))),
                     model.params)
  prompt = model.tokenizer.encode("the cat sat")
  got = generate.generate(module, prompt, max_new_tokens=6, eos=())
  seq = list(prompt)
  for _ in range(6):  # the whole sequence again at every step, no cache
    seq.append(int(np.argmax(np.asarray(model.apply(model.params, jnp.asarray([seq])))[0, -1])))
  assert got == seq[len(prompt):]


def _sft(tmp_path, *extra, name="run"):
  out = tmp_path / name
  assert cli.main([*SFT, "--task", "snli", "--data-dir", NLI, "--train-split", "validation",
                   "--heldout-samples", "8", "--selection-samples", "8", "--output-dir",
                   str(out), *extra]) == 0
  with open(out / "seed-42" / "results.json") as f:
    return json.load(f)


@pytest.mark.parametrize("mode", ["F", "D"])
def test_sft_trains_a_task_and_records_its_scores(mode, tmp_path):
  res = _sft(tmp_path, "--mode", mode, "--no-save-model")
  cfg = res["config"]
  assert cfg["mode"] == mode and cfg["task"] == "snli" and cfg["chat_template"] is True
  assert set(res["metrics"]) == {"heldout", "selection"}
  for split in res["metrics"].values():
    assert set(split) == {"accuracy", "loss", "perplexity"}
    assert np.isclose(split["perplexity"], np.exp(split["loss"]))
  assert res["score"] == res["metrics"]["heldout"]["accuracy"]
  assert res["selection_score"] == res["metrics"]["selection"]["accuracy"]
  assert len(res["train_losses"]) == res["steps"] and all(np.isfinite(res["train_losses"]))
  if mode == "D":  # every parameter takes part: a decoder has no new head
    assert res["child_network"]["total"] == sum(
        x.size for x in jax.tree_util.tree_leaves(lm.load(TINY).params))


def test_sft_saves_a_model_that_scores_as_it_did(tmp_path):
  res = _sft(tmp_path, "--mode", "vanilla", "--eval-task", "snli:validation")
  folder = tmp_path / "run" / "seed-42" / "model"
  assert {"config.json", "model.safetensors", "tokenizer.json",
          "tokenizer_config.json"} <= set(os.listdir(folder))
  out = tmp_path / "scores.json"
  assert cli.main(["lm-evaluate", "--model", str(folder), "--data-dir", NLI, "--eval-task",
                   "snli:validation", "--max-seq-length", "64", "--json", str(out)]) == 0
  scores = json.loads(out.read_text())["metrics"]["snli/validation"]
  np.testing.assert_allclose(scores["loss"], res["metrics"]["snli/validation"]["loss"],
                             rtol=1e-5)
  assert scores["accuracy"] == res["metrics"]["snli/validation"]["accuracy"]


def test_sft_resumes_bitwise(tmp_path, dies_at_batch):
  whole = _sft(tmp_path, "--mode", "F", "--no-save-model", name="whole")
  argv = [*SFT, "--task", "snli", "--data-dir", NLI, "--train-split", "validation",
          "--heldout-samples", "8", "--selection-samples", "8", "--mode", "F",
          "--no-save-model", "--save-every", "2", "--output-dir", str(tmp_path / "part")]
  from childtune_jax.app import lmdata as module

  real = module.make_batch
  calls = [0]

  def dying(*args, **kwargs):
    calls[0] += 1
    if calls[0] == 4:
      raise KeyboardInterrupt
    return real(*args, **kwargs)

  module.make_batch = dying
  try:
    assert cli.main(argv) == 130
  finally:
    module.make_batch = real
  assert cli.main([*argv, "--resume"]) == 0
  with open(tmp_path / "part" / "seed-42" / "results.json") as f:
    part = json.load(f)
  assert part["train_losses"] == whole["train_losses"]
  assert part["metrics"] == whole["metrics"]


def test_own_pairs_and_texts_and_bad_input(tmp_path, capsys):
  train = tmp_path / "train.jsonl"
  train.write_text("".join(json.dumps({"prompt": f"say {w}", "response": w}) + "\n"
                           for w in ("yes", "no", "maybe", "never", "always", "soon")))
  text = tmp_path / "text.txt"
  text.write_text("the cat sat on the mat\na dog ran\n")
  out = tmp_path / "own"
  assert cli.main([*SFT, "--mode", "F", "--train-file", str(train), "--validation-file",
                   str(train), "--eval-text", f"plain={text}", "--no-save-model",
                   "--output-dir", str(out)]) == 0
  res = json.loads((out / "seed-42" / "results.json").read_text())
  assert set(res["metrics"]) == {"dev", "text/plain"} and res["config"]["task"] == "pairs"
  assert res["score"] == res["metrics"]["dev"]["loss"]
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"prompt": "x"}\n')
  capsys.readouterr()
  for argv, message in (
      (["--train-file", str(bad), "--validation-file", str(train)], "'response' is missing"),
      (["--train-file", str(train)], "go together"),
      (["--task", "snli"], "--data-dir"),
      (["--train-file", str(train), "--validation-file", str(train), "--eval-text", "x"],
       "NAME=FILE"),
      (["--train-file", str(train), "--validation-file", str(train), "--model",
        str(tmp_path)], "config.json"),
  ):
    assert cli.main([*SFT, "--mode", "vanilla", *argv, "--output-dir",
                     str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("childtune: error:") and message in err and len(
        err.splitlines()) == 1, err
    assert not (tmp_path / "refused").exists()
  with pytest.raises(SystemExit):  # a task without a template is no choice of --task
    cli.main([*SFT, "--mode", "vanilla", "--task", "stsb", "--output-dir", str(out)])
  with pytest.raises(Exception, match="no instruction template"):
    prompts.template("stsb")
  assert TASKS["stsb"].is_regression


def _saved(tmp_path, mode, *extra):
  out = tmp_path / mode
  train = tmp_path / "pairs.jsonl"
  train.write_text("".join(json.dumps({"prompt": f"say {w}", "response": w}) + "\n"
                           for w in ("yes", "no", "maybe", "never")))
  assert cli.main([*SFT, "--mode", mode, "--train-file", str(train), "--validation-file",
                   str(train), "--output-dir", str(out), "--epochs", "3", "--batch-size",
                   "2", *extra]) == 0  # 6 steps: the first (warmup) has a rate of 0
  from childtune_jax.models.checkpoint import read_safetensors

  return (read_safetensors(str(out / "seed-42" / "model")), read_safetensors(TINY),
          json.loads((out / "seed-42" / "results.json").read_text()))


def test_lora_moves_only_the_adapted_matrices(tmp_path):
  after, before, res = _saved(tmp_path, "lora", "--lora-rank", "2")
  assert res["lora"] == {"rank": 2, "alpha": 4.0, "matrices": 7, "trainable": res["lora"][
      "trainable"]} and res["lora"]["trainable"] < 0.2 * sum(v.size for v in before.values())
  for key, value in before.items():
    if key == "lm_head.weight":  # tied: written once, as the embedding
      continue
    adapted = key.endswith(("proj.weight",)) and ".layers." in key
    assert np.array_equal(after[key], value) != adapted, key


def test_hft_in_one_stage_leaves_exactly_half_of_the_matrices_as_they_were(tmp_path):
  after, before, res = _saved(tmp_path, "hft", "--hft-every", "1000")
  assert res["hft"] == {"every": 1000, "stages": 1}
  matrices = [k for k in before if k.endswith("proj.weight") and ".layers." in k]
  same = [np.array_equal(after[k], before[k]) for k in matrices]
  assert sum(same) == len(matrices) // 2  # 7 matrices x 2 layers: 7 frozen, 7 trained
  others = [k for k in before if k not in matrices and k != "lm_head.weight"]
  assert not any(np.array_equal(after[k], before[k]) for k in others if "norm" not in k)
