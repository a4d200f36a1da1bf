"""``childtune multitask``: the task sampler, the shared child network, resume and results."""

import hashlib
import json
import os

import jax
import numpy as np
import pytest
from conftest import GLUE, TINY

from childtune_jax import fisher_information, is_encoder_layer, shared_fisher_mask
from childtune_jax.app import classifier, cli, data, multitask, tasks, train
from childtune_jax.app.maskfile import RESERVE_P_KEY

ARGS = ["multitask", "--tasks", "rte", "mrpc", "--data-dir", GLUE, "--model", TINY,
        "--epochs", "1", "--batch-size", "8", "--max-seq-length", "32", "--learning-rate", "1e-3",
        "--compilation-cache", ""]


def _results(out, seed=42):
  with open(os.path.join(out, f"seed-{seed}", "results.json")) as f:
    return json.load(f)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 1e6])
def test_task_sampler_draws_n_to_the_one_over_t(temperature):
  counts = [100, 300, 50]
  want = np.array(counts, float) ** (1 / temperature)
  want /= want.sum()
  np.testing.assert_allclose(multitask.task_probabilities(counts, temperature), want)
  steps = 20000
  seq = np.concatenate([multitask.task_sequence(counts, temperature, 3, e, steps // 4)
                        for e in range(4)])
  freq = np.bincount(seq, minlength=3) / steps
  sigma = np.sqrt(want * (1 - want) / steps)
  assert np.all(np.abs(freq - want) < 5 * sigma), (freq, want)
  # A function of (seed, epoch) alone: a resumed run draws the same tasks.
  np.testing.assert_array_equal(multitask.task_sequence(counts, temperature, 3, 1, 50),
                                multitask.task_sequence(counts, temperature, 3, 1, 50))


def test_task_stream_covers_every_example_once_per_pass():
  stream = multitask.TaskStream(n=10, batch_size=4, seed=0, task_index=1)
  rows = np.concatenate([stream.rows(k) for k in range(5)])  # 20 rows: two passes
  assert sorted(rows[:10]) == list(range(10)) and sorted(rows[10:]) == list(range(10))
  assert not np.array_equal(rows[:10], rows[10:])  # reshuffled after a pass


def test_child_network_is_the_tasks_fisher_combined(tmp_path, monkeypatch):
  for mode in ("D", "shared-D"):
    assert cli.main([*ARGS, "--mode", mode, "--no-save-model",
                     "--output-dir", str(tmp_path / mode)]) == 0
  # The same Fisher passes, made here from the library's parts: each task's loss on its own
  # training data, over the shared parameters.
  both = [tasks.TASKS["rte"], tasks.TASKS["mrpc"]]
  models = [classifier.load_classifier(TINY, t.num_labels, 42)[0] for t in both]
  params = multitask._split_params([m.params for m in models])
  tok = classifier.load_tokenizer(TINY)
  fishers, counts = [], []
  for i, task in enumerate(both):
    train_set, _ = data.load_glue_folder(task, GLUE)
    enc = data.encode(tok, train_set, 32)

    def apply(p, batch, rng=None, i=i):
      return models[i].apply({**p["shared"], "classifier": p["heads"][str(i)]}, batch, rng)

    loss = train.make_loss(task, apply)

    batches = data.batches(enc, 8, 32, tok.pad_token_id, data.fisher_order(len(enc), 42))
    fishers.append(fisher_information(loss, params, list(batches), weights_key="weights"))
    counts.append(len(enc))
  from childtune_jax._tree import leaf_paths

  pooled = jax.tree_util.tree_map(
      lambda a, b: (a * counts[0] + b * counts[1]) / sum(counts), *fishers)
  for mode, want in (("D", shared_fisher_mask([pooled], 0.3, where=is_encoder_layer)),
                     ("shared-D", shared_fisher_mask(fishers, 0.3, where=is_encoder_layer))):
    out = str(tmp_path / mode)
    got = np.load(os.path.join(out, "seed-42", "child_mask.npz"))
    for path, leaf in zip(leaf_paths(want), jax.tree_util.tree_leaves(want)):
      np.testing.assert_array_equal(got[path], np.asarray(leaf), err_msg=f"{mode} {path}")
    assert _results(out)["child_network"]["kept"] == sum(
        int(np.sum(np.asarray(x))) for x, p in zip(jax.tree_util.tree_leaves(want),
                                                   leaf_paths(want)) if is_encoder_layer(p))
    # Its Jaccard with each task's own network: that task's top 30% by np.percentile.
    layers = [p for p in leaf_paths(want) if is_encoder_layer(p)]
    shared = np.concatenate([got[p].ravel() for p in layers])
    for task, f in zip(both, fishers):
      flat = dict(zip(leaf_paths(f), jax.tree_util.tree_leaves(f)))
      scores = np.concatenate([np.asarray(flat[p]).ravel() for p in layers])
      own = scores >= np.percentile(scores, 70)
      np.testing.assert_allclose(
          _results(out)["child_network"]["jaccard_with_task_network"][task.name],
          np.sum(shared & own) / np.sum(shared | own), rtol=1e-12, err_msg=mode)
  # A run resumed after its network was chosen reads the network and its overlaps back.
  out = str(tmp_path / "shared-D")
  first = _results(out)["child_network"]
  os.remove(os.path.join(out, "seed-42", "results.json"))  # as if killed before the end

  def no_fisher(*args, **kwargs):
    raise AssertionError("a resumed run reads its network, not a new Fisher pass")

  monkeypatch.setattr(train, "fisher_pass", no_fisher)
  assert cli.main([*ARGS, "--mode", "shared-D", "--no-save-model", "--output-dir", out,
                   "--resume"]) == 0
  assert _results(out)["child_network"] == first


def test_a_saved_network_trains_as_the_fisher_passes_that_chose_it(tmp_path, monkeypatch,
                                                                   capsys):
  first, again = str(tmp_path / "first"), str(tmp_path / "again")
  argv = [*ARGS, "--mode", "shared-D", "--no-save-model"]
  assert cli.main([*argv, "--output-dir", first]) == 0
  mask = os.path.join(first, "seed-{seed}", "child_mask.npz")

  def no_fisher(*args, **kwargs):
    raise AssertionError("a given network needs no Fisher pass")

  monkeypatch.setattr(train, "fisher_pass", no_fisher)
  assert cli.main([*argv, "--child-mask", mask, "--output-dir", again]) == 0
  a, b = _results(first), _results(again)
  assert a["train_losses"] == b["train_losses"] and a["metrics"] == b["metrics"]
  assert {k: v for k, v in a["child_network"].items() if k != "jaccard_with_task_network"} \
      == b["child_network"]  # the overlaps need the Fisher passes: a given network has none
  assert "jaccard_with_task_network" in a["child_network"]
  with open(os.path.join(first, "seed-42", "child_mask.npz"), "rb") as f:
    assert b["child_mask_sha256"] == hashlib.sha256(f.read()).hexdigest()
  assert "fisher_s" not in b["timings"]
  # The file records the reserve_p that chose it (0.3, the default): another is refused.
  with np.load(os.path.join(again, "seed-42", "child_mask.npz")) as f:
    assert f[RESERVE_P_KEY] == 0.3
  out = tmp_path / "other-p"
  assert cli.main([*argv, "--child-mask", mask, "--reserve-p", "0.5",
                   "--output-dir", str(out)]) == 2
  assert "holds a child network of reserve_p 0.3, not --reserve-p 0.5" in capsys.readouterr().err
  assert not out.exists()


def test_a_network_of_other_shapes_is_refused_before_anything_runs(tmp_path, capsys):
  single = str(tmp_path / "single")  # a single-task run's network: no shared/heads split
  assert cli.main(["train", "--task", "rte", *ARGS[4:], "--mode", "D", "--no-save-model",
                   "--max-train-samples", "8", "--output-dir", single]) == 0
  capsys.readouterr()
  for mask, message in ((os.path.join(single, "seed-42", "child_mask.npz"), "has no mask for"),
                        (str(tmp_path / "none-{seed}.npz"), "does not exist")):
    out = tmp_path / "run"
    assert cli.main([*ARGS, "--mode", "D", "--child-mask", mask, "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not out.exists()


def test_multitask_resumes_bitwise_and_scores_each_task_with_its_own_head(tmp_path,
                                                                          dies_at_batch):
  whole, part = str(tmp_path / "whole"), str(tmp_path / "part")
  argv = [*ARGS, "--mode", "F", "--save-every", "3"]
  assert cli.main([*argv, "--output-dir", whole]) == 0
  with dies_at_batch(5):
    assert cli.main([*argv, "--output-dir", part]) == 130
  assert cli.main([*argv, "--output-dir", part, "--resume"]) == 0
  a, b = _results(whole), _results(part)
  assert a["train_losses"] == b["train_losses"] and a["metrics"] == b["metrics"]
  assert set(a["metrics"]) == {"rte/dev", "mrpc/dev"} and a["steps"] == 8  # 4 + 4 batches
  # Each task's saved model (shared encoder + its head) scores its dev set as the run did.
  from transformers import AutoTokenizer

  from childtune_jax.models import from_pretrained

  for name in ("rte", "mrpc"):
    folder = os.path.join(whole, "seed-42", "model", name)
    model, _ = from_pretrained(folder, num_labels=2)
    tok = AutoTokenizer.from_pretrained(folder)
    dev = data.read_split(tasks.TASKS[name], GLUE, "dev")
    preds = []
    for x, y in zip(*dev.texts):
      enc = tok([x], [y], truncation=True, max_length=32, return_tensors="np")
      preds.append(int(np.argmax(model(enc["input_ids"], enc["attention_mask"],
                                       enc["token_type_ids"])[0])))
    assert a["metrics"][f"{name}/dev"]["accuracy"] == pytest.approx(
        np.mean(np.array(preds) == dev.labels))
  with open(os.path.join(whole, "summary.json")) as f:
    assert json.load(f)["metrics"]["rte/dev/accuracy"]["mean"] == a["metrics"]["rte/dev"][
        "accuracy"]


@pytest.mark.parametrize("extra, message", [
    (["--tasks", "rte", "rte"], "two or more different tasks"),
    (["--tasks", "rte"], "two or more different tasks"),
    (["--selection-only"], "--selection-only needs --selection-samples"),
    (["--child-mask", "x.npz"], "--child-mask goes with --mode D or shared-D"),
])
def test_bad_multitask_options_one_line_exit_2(tmp_path, capsys, extra, message):
  out = tmp_path / "run"
  assert cli.main([*ARGS, "--mode", "vanilla", *extra, "--output-dir", str(out)]) == 2
  err = capsys.readouterr().err
  assert message in err and err.count("\n") == 1
  assert not out.exists()


def test_selection_split_per_task_and_its_mean_by_epoch(tmp_path):
  out = str(tmp_path / "run")
  assert cli.main([*ARGS, "--mode", "vanilla", "--epochs", "2", "--max-train-samples", "16",
                   "--selection-samples", "8", "--selection-only", "--no-save-model",
                   "--output-dir", out]) == 0
  res = _results(out)
  assert set(res["metrics"]) == {"rte/selection", "mrpc/selection"} and res["score"] is None
  main = (res["metrics"]["rte/selection"]["accuracy"] + res["metrics"]["mrpc/selection"]["f1"]) / 2
  assert res["selection_score"] == pytest.approx(main)
  assert len(res["selection_by_epoch"]) == 2 and res["selection_by_epoch"][1] == pytest.approx(main)
  assert res["selection_by_epoch"][0] is not None


@pytest.mark.parametrize("option", [["--every", "5"],
                                    ["--train-file", "t.csv"], ["--eval-task", "sick"]])
def test_options_multitask_does_not_take_are_not_offered(tmp_path, capsys, option):
  with pytest.raises(SystemExit) as e:
    cli.main([*ARGS, "--mode", "vanilla", *option, "--output-dir", str(tmp_path / "run")])
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert f"unrecognized arguments: {' '.join(option)}" in err and err.count("\n") == 1
  assert not (tmp_path / "run").exists()
