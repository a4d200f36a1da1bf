"""``childtune evaluate``: a saved model scored without training, its classes matched by name."""

import json
import os
import re
import shutil

import numpy as np
import pytest
from conftest import GLUE, NLI, TINY

from childtune_jax.app import classifier, cli, data, tasks
from childtune_jax.app.evaluate import label_columns

SNLI = tasks.TASKS["snli"]


@pytest.fixture(scope="module")
def snli_run(tmp_path_factory):
  """A tiny SNLI run with its saved model, that also scored SICK's test part."""
  out = str(tmp_path_factory.mktemp("snli") / "run")
  argv = ["train", "--task", "snli", "--mode", "vanilla", "--data-dir", NLI,
          "--train-split", "validation", "--heldout-samples", "10", "--eval-task", "sick:test",
          "--model", TINY, "--epochs", "2", "--batch-size", "8", "--max-seq-length", "32",
          "--learning-rate", "1e-3", "--seeds", "3", "--output-dir", out]
  assert cli.main(argv) == 0
  with open(os.path.join(out, "seed-3", "results.json")) as f:
    return os.path.join(out, "seed-3", "model"), json.load(f)


def _by_hand(model_dir, examples, columns=(0, 1, 2)):
  """Predicted classes from the saved model, one pair at a time (no batching, padding or jit)."""
  from transformers import AutoTokenizer

  from childtune_jax.models import from_pretrained

  model, new = from_pretrained(model_dir, num_labels=3)
  assert not new
  tok = AutoTokenizer.from_pretrained(model_dir)
  predictions = []
  for a, b in zip(*examples.texts):
    enc = tok([a], [b], truncation=True, max_length=32, return_tensors="np")
    logits = np.asarray(model(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]))
    predictions.append(int(np.argmax(logits[0][list(columns)])))
  return np.array(predictions)


def _accuracy(model_dir, examples, columns=(0, 1, 2)):
  return float(np.mean(_by_hand(model_dir, examples, columns) == examples.labels))


def test_a_saved_snli_model_scores_sick_as_its_run_did_and_as_computed_by_hand(
    snli_run, tmp_path, capsys):
  model_dir, run = snli_run
  with open(os.path.join(model_dir, "config.json")) as f:
    assert json.load(f)["id2label"] == {"0": "entailment", "1": "neutral", "2": "contradiction"}
  out = tmp_path / "new" / "eval.json"
  assert cli.main(["evaluate", "--model", model_dir, "--task", "sick", "--data-dir", NLI,
                   "--eval-task", "snli:validation", "--max-seq-length", "32",
                   "--batch-size", "5", "--json", str(out)]) == 0
  result = json.loads(out.read_text())
  assert set(result["metrics"]) == {"trial", "test", "snli/validation"}
  sick = {part: data.read_split(tasks.TASKS["sick"], NLI, part) for part in ("trial", "test")}
  assert result["examples"] == {"trial": len(sick["trial"]), "test": len(sick["test"]),
                                "snli/validation": len(data.read_split(SNLI, NLI, "validation"))}
  assert result["data_sha256"]["test"] == run["data_sha256"]["sick/test"]
  assert result["metrics"]["test"]["accuracy"] == pytest.approx(
      run["metrics"]["sick/test"]["accuracy"])
  for part, examples in sick.items():
    predictions = _by_hand(model_dir, examples)
    assert result["metrics"][part]["accuracy"] == pytest.approx(
        np.mean(predictions == examples.labels))
    counts = np.zeros((3, 3), int)
    for gold, predicted in zip(examples.labels, predictions):
      counts[gold, predicted] += 1
    assert result["confusion"][part] == counts.tolist()
  assert result["label_columns"] is None
  printed = capsys.readouterr().out.splitlines()
  assert printed[0].split() == ["split", "accuracy", "examples"]
  test_row = next(line.split() for line in printed if line.startswith("test "))
  assert test_row == ["test", f"{100 * result['metrics']['test']['accuracy']:.2f}",
                      str(len(sick["test"]))]
  table = printed[printed.index("test: examples by gold label (rows) and prediction (columns)"):]
  assert table[1].split() == ["gold", "\\", "predicted", "entailment", "neutral",
                              "contradiction", "all"]
  matrix = result["confusion"]["test"]
  for line, label, row in zip(table[3:6], SNLI.labels, matrix):
    assert line.split() == [label, *map(str, row), str(sum(row))]
  assert table[6].split() == ["all", *(str(sum(c)) for c in zip(*matrix)), str(len(sick["test"]))]


def _reordered(model_dir, folder, order, names):
  """A copy of the model whose classes are ``order`` of the original, named ``names``."""
  from safetensors.numpy import load_file, save_file

  shutil.copytree(model_dir, folder)
  tensors = load_file(os.path.join(folder, "model.safetensors"))
  for key in ("classifier.weight", "classifier.bias"):
    tensors[key] = np.ascontiguousarray(tensors[key][list(order)])
  save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(folder, "config.json")) as f:
    config = json.load(f)
  config["id2label"] = {str(i): n for i, n in enumerate(names)}
  config["label2id"] = {n: i for i, n in enumerate(names)}
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(config, f)
  return folder


def test_classes_in_another_order_are_matched_by_name(snli_run, tmp_path):
  model_dir, _ = snli_run
  # The hub's MNLI models' order: contradiction, neutral, entailment (upper-case).
  hub = _reordered(model_dir, str(tmp_path / "hub"), (2, 1, 0),
                   ("CONTRADICTION", "NEUTRAL", "ENTAILMENT"))
  argv = ["evaluate", "--task", "sick", "--data-dir", NLI, "--split", "test",
          "--max-seq-length", "32"]
  out = {name: str(tmp_path / f"{name}.json") for name in ("own", "hub", "ignored")}
  assert cli.main([*argv, "--model", model_dir, "--json", out["own"]]) == 0
  assert cli.main([*argv, "--model", hub, "--json", out["hub"]]) == 0
  assert cli.main([*argv, "--model", hub, "--ignore-label-names", "--json", out["ignored"]]) == 0
  own, matched, ignored = (json.load(open(out[k])) for k in ("own", "hub", "ignored"))
  assert matched["label_columns"] == [2, 1, 0] and ignored["label_columns"] is None
  assert matched["metrics"] == own["metrics"]
  sick = data.read_split(tasks.TASKS["sick"], NLI, "test")
  assert ignored["metrics"]["test"]["accuracy"] == pytest.approx(
      _accuracy(hub, sick, columns=(0, 1, 2)))
  assert matched["metrics"]["test"]["accuracy"] == pytest.approx(
      _accuracy(hub, sick, columns=(2, 1, 0)))
  assert matched["confusion"] == own["confusion"]


@pytest.mark.parametrize("names, expected", [
    ({"0": "LABEL_0", "1": "LABEL_1", "2": "LABEL_2"}, None),
    ({"0": "entailment", "1": "neutral", "2": "contradiction"}, None),
    ({"0": "CONTRADICTION", "1": "NEUTRAL", "2": "ENTAILMENT"}, [2, 1, 0]),
    ({"1": "entailment", "0": "contradiction", "2": "neutral"}, [1, 2, 0]),
    (None, None),
])
def test_label_columns(names, expected):
  config = {} if names is None else {"id2label": names}
  assert label_columns(config, SNLI, "m") == expected


@pytest.mark.parametrize("names, message", [
    ({"0": "negative", "1": "positive"}, "model has 2 classes (negative, positive); snli has 3"),
    ({"0": "entailment", "1": "neutral", "2": "neutral"}, "are not snli's labels"),
    ({"0": "a", "1": "b", "3": "c"}, "id2label's keys are not 0..2"),
])
def test_label_columns_refuses_classes_that_are_not_the_tasks(names, message):
  with pytest.raises(classifier.ModelError, match=re.escape(message)):
    label_columns({"id2label": names}, SNLI, "m")


def _fails(capsys, argv, message):
  assert cli.main(argv) == 2
  err = capsys.readouterr().err
  assert message in err and err.count("\n") == 1, err


def test_bad_evaluations_are_one_line_and_exit_2(snli_run, tmp_path, capsys):
  model_dir, _ = snli_run
  base = ["evaluate", "--task", "sick", "--data-dir", NLI, "--max-seq-length", "32"]
  headless = shutil.copytree(model_dir, str(tmp_path / "headless"))
  from safetensors.numpy import load_file, save_file

  tensors = load_file(os.path.join(headless, "model.safetensors"))
  save_file({k: v for k, v in tensors.items() if not k.startswith("classifier")},
            os.path.join(headless, "model.safetensors"), metadata={"format": "pt"})
  _fails(capsys, [*base, "--model", headless], "has no trained classification head")
  _fails(capsys, [*base, "--model", TINY], "has no weights")
  _fails(capsys, ["evaluate", "--task", "rte", "--data-dir", GLUE, "--model", model_dir,
                  "--max-seq-length", "32"], "the model has 3 classes")
  _fails(capsys, [*base, "--model", model_dir, "--split", "dev"], "no rows of part 'dev'")
  _fails(capsys, [*base, "--model", model_dir, "--eval-task", "rte:dev"], "are not sick's")
  _fails(capsys, ["evaluate", "--task", "sick", "--model", model_dir, "--eval-task",
                  "snli:validation"], "--eval-task reads from --data-dir")
  _fails(capsys, [*base, "--model", model_dir, "--validation-file", "x.csv"],
         "use either --validation-file or --data-dir/--split")
  _fails(capsys, [*base, "--model", model_dir, "--json", str(tmp_path)], "is a folder")
  _fails(capsys, [*base, "--model", model_dir, "--max-seq-length", "4096"], "exceeds the")
  assert sorted(os.listdir(tmp_path)) == ["headless"]  # nothing written by a failure


def test_a_trained_head_is_read_with_the_nnx_backend_only():
  with pytest.raises(classifier.ModelError, match="with the nnx backend"):
    classifier.load_classifier(TINY, 2, 0, backend="hf-flax", trained_head=True)
