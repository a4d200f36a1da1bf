"""SNLI and SICK: the readers, the shared label table, held-out splits, transfer evaluation."""

import json
import logging
import os

import numpy as np
import pytest
from conftest import NLI, TINY

from childtune_jax.app import cli, data, tasks

SNLI_FILE = os.path.join(NLI, "SNLI", "validation.tsv")
SICK_FILE = os.path.join(NLI, "SICK", "SICK.txt")


def _unquote(field):
  """CSV's quoting rule, by hand: a quoted field loses its quotes and un-doubles inner ones."""
  if field.startswith('"') and field.endswith('"') and len(field) > 1:
    return field[1:-1].replace('""', '"')
  return field


def test_snli_reads_quoted_fields_and_numeric_labels():
  with open(SNLI_FILE, encoding="utf-8") as f:
    raw = [line.rstrip("\n").split("\t") for line in f][1:]
  assert any('"' in line[0] + line[1] for line in raw)  # the fixture has quoted fields
  got = data.read_split(tasks.TASKS["snli"], NLI, "validation")
  assert len(got) == len(raw) == 46
  assert got.texts[0] == [_unquote(r[0]) for r in raw]
  assert got.texts[1] == [_unquote(r[1]) for r in raw]
  np.testing.assert_array_equal(got.labels, [int(r[2]) for r in raw])  # 0, 1, 2 as in SNLI


def test_sick_parts_crlf_and_upper_case_labels_map_like_snli():
  with open(SICK_FILE, "rb") as f:
    raw = [line.decode().split("\t") for line in f.read().split(b"\r\n")[1:]]
  task = tasks.TASKS["sick"]
  for part, size in (("train", 20), ("trial", 8), ("test", 20)):
    rows = [r for r in raw if r[-1].strip() == part.upper()]
    got = data.read_split(task, NLI, part)
    assert len(got) == len(rows) == size
    assert got.texts == [[r[1] for r in rows], [r[2] for r in rows]]
    assert "\r" not in "".join(got.texts[1])
    # One table for both corpora: SICK's ENTAILMENT is SNLI's 0, and so on.
    expected = [{"ENTAILMENT": 0, "NEUTRAL": 1, "CONTRADICTION": 2}[r[3]] for r in rows]
    np.testing.assert_array_equal(got.labels, expected)
  assert tasks.TASKS["sick"].labels == tasks.TASKS["snli"].labels
  with pytest.raises(data.DataError, match=r"no rows of part 'dev' \(its parts: \['test', "
                                           r"'train', 'trial'\]\)"):
    data.read_split(task, NLI, "dev")


def test_unlabeled_pairs_are_skipped_with_a_count_and_bad_labels_refused(tmp_path, caplog):
  snli = tmp_path / "SNLI"
  snli.mkdir()
  with open(SNLI_FILE, encoding="utf-8") as f:
    lines = f.read().splitlines()
  (snli / "validation.tsv").write_text("\n".join(lines[:4] + ["A dog.\tAn animal.\t-1"]
                                                 + lines[4:6]) + "\n")
  caplog.set_level(logging.INFO, logger="childtune_jax.app.data")
  got = data.read_split(tasks.TASKS["snli"], str(tmp_path), "validation")
  assert len(got) == 5 and "skipped 1 pairs without a gold label" in caplog.text
  (snli / "validation.tsv").write_text("\n".join(lines[:3] + ["A dog.\tAn animal.\tmaybe"]) + "\n")
  with pytest.raises(data.DataError, match=r"validation.tsv:4: label 'maybe' is outside"):
    data.read_split(tasks.TASKS["snli"], str(tmp_path), "validation")


def test_heldout_is_the_same_for_every_seed_and_disjoint_from_training_and_selection():
  examples = data.Examples([[f"s{i}" for i in range(100)]], np.arange(100) % 3, "x")
  rest, heldout = data.split_heldout(examples, 20)
  assert data.split_heldout(examples, 20)[1].texts == heldout.texts  # no seed involved
  for seed in (1, 2):
    train, selection = data.split_selection(rest, 50, 20, seed)
    sets = [set(s.texts[0]) for s in (train, selection, heldout)]
    assert sum(map(len, sets)) == len(set.union(*sets)) == 90
  with pytest.raises(data.DataError, match="cannot give a held-out split of 100"):
    data.split_heldout(examples, 100)


ARGS = ["train", "--task", "snli", "--data-dir", NLI, "--train-split", "validation",
        "--heldout-samples", "10", "--max-train-samples", "24", "--selection-samples", "8",
        "--model", TINY, "--epochs", "1", "--batch-size", "8", "--max-seq-length", "32",
        "--learning-rate", "1e-3"]


def test_snli_run_scores_heldout_and_sick_test_each_under_its_name(tmp_path):
  out = str(tmp_path / "run")
  assert cli.main([*ARGS, "--mode", "F", "--eval-task", "sick:test", "--seeds", "1", "2",
                   "--output-dir", out]) == 0
  res = [json.load(open(os.path.join(out, f"seed-{s}", "results.json"))) for s in (1, 2)]
  for r in res:
    assert set(r["metrics"]) == {"heldout", "selection", "sick/test"}
    assert r["score"] == r["metrics"]["heldout"]["accuracy"]  # transfer results stay apart
  assert res[0]["data_sha256"]["heldout"] == res[1]["data_sha256"]["heldout"]
  assert res[0]["data_sha256"]["train"] != res[1]["data_sha256"]["train"]
  assert res[0]["data_sha256"]["sick/test"] == data.read_split(
      tasks.TASKS["sick"], NLI, "test").digest()
  # The SICK accuracy, recomputed one pair at a time from the saved model.
  from transformers import AutoTokenizer

  from childtune_jax.models import from_pretrained

  model_dir = os.path.join(out, "seed-2", "model")
  model, _ = from_pretrained(model_dir, num_labels=3)
  tok = AutoTokenizer.from_pretrained(model_dir)
  sick = data.read_split(tasks.TASKS["sick"], NLI, "test")
  correct = 0
  for a, b, label in zip(*sick.texts, sick.labels):
    enc = tok([a], [b], truncation=True, max_length=32, return_tensors="np")
    logits = model(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
    correct += int(np.argmax(logits[0]) == label)
  assert res[1]["metrics"]["sick/test"]["accuracy"] == pytest.approx(correct / len(sick))
  with open(os.path.join(out, "summary.json")) as f:
    summary = json.load(f)
  assert summary["metrics"]["sick/test/accuracy"]["values"] == [
      r["metrics"]["sick/test"]["accuracy"] for r in res]


@pytest.mark.parametrize("extra, message", [
    (["--eval-task", "rte:dev"], "rte's labels ('entailment', 'not_entailment') are not snli's"),
    (["--eval-task", "nope"], "unknown task 'nope'"),
    (["--eval-task", "sick:dev"], "no rows of part 'dev'"),
    (["--heldout-samples", "5000"], "cannot give a held-out split of 5000"),
])
def test_bad_nli_options_one_line_exit_2(tmp_path, capsys, extra, message):
  out = tmp_path / "run"
  assert cli.main([*ARGS, "--mode", "vanilla", *extra, "--output-dir", str(out)]) == 2
  err = capsys.readouterr().err
  assert message in err and err.count("\n") == 1
  assert not out.exists()


def test_eval_task_needs_a_data_dir(capsys):
  assert cli.main(["train", "--task", "snli", "--mode", "vanilla", "--eval-task", "sick",
                   "--output-dir", "never"]) == 2
  assert "--eval-task and --train-split read from --data-dir" in capsys.readouterr().err
