"""The selection split: hyperparameters are chosen on data that neither trains nor tests."""

import hashlib
import json
import os
import types

import numpy as np
import pytest
from conftest import GLUE, TINY

from childtune_jax.app import cli, data, steps, tasks
from childtune_jax.app.errors import UsageError
from childtune_jax.app.maskfile import RESERVE_P_KEY


def _examples(n):
  return data.Examples([[f"text {i}" for i in range(n)]], np.arange(n) % 2, "mem")


def _ids(examples):
  return {int(t.split()[1]) for t in examples.texts[0]}


@pytest.mark.parametrize("seed", [0, 1, 42])
def test_selection_is_disjoint_and_training_subset_is_unchanged(seed):
  ex = _examples(100)
  train, sel = data.split_selection(ex, 30, 20, seed)
  assert len(_ids(train)) == 30 and len(_ids(sel)) == 20
  assert not _ids(train) & _ids(sel)
  assert _ids(train) == _ids(data.subsample(ex, 30, seed))  # the same subset as without it
  again = data.split_selection(ex, 30, 20, seed)
  assert _ids(again[1]) == _ids(sel)
  other = data.split_selection(ex, 30, 20, seed + 1)
  assert _ids(other[1]) != _ids(sel)


def test_selection_without_a_training_subset_trains_on_the_rest():
  ex = _examples(50)
  train, sel = data.split_selection(ex, None, 10, 3)
  assert len(sel) == 10 and _ids(train) | _ids(sel) == set(range(50))
  assert not _ids(train) & _ids(sel)
  # labels travel with their texts
  assert all(label == i % 2 for i, label in zip(sorted(_ids(sel)), sel.labels))


def test_selection_that_does_not_fit_is_a_data_error():
  with pytest.raises(data.DataError, match="selection split of 20"):
    data.split_selection(_examples(40), 30, 20, 0)
  with pytest.raises(data.DataError, match="selection split of 40"):
    data.split_selection(_examples(40), None, 40, 0)


def _run(tmp_path, name, mode, *extra):
  out = str(tmp_path / name)
  argv = ["train", "--task", "sst2", "--mode", mode, "--model", TINY, "--data-dir", GLUE,
          "--epochs", "2", "--batch-size", "8", "--max-seq-length", "32",
          "--max-train-samples", "16", "--selection-samples", "8", "--no-save-model",
          "--output-dir", out, *extra]
  assert cli.main(argv) == 0
  results = {}
  for seed_dir in sorted(os.listdir(out)):
    if seed_dir.startswith("seed-"):
      with open(os.path.join(out, seed_dir, "results.json")) as f:
        results[int(seed_dir[5:])] = json.load(f)
  return results


def test_cli_selection_only_never_scores_dev_and_pairs_methods(tmp_path):
  vanilla = _run(tmp_path, "v", "vanilla", "--selection-only", "--seeds", "1", "2")
  f = _run(tmp_path, "f", "F", "--selection-only", "--seeds", "1")
  full = _run(tmp_path, "full", "vanilla", "--seeds", "1")
  res = vanilla[1]
  assert set(res["metrics"]) == {"selection"} and res["score"] is None
  assert res["selection_score"] == res["metrics"]["selection"]["accuracy"]
  assert len(res["selection_by_epoch"]) == 2
  assert res["selection_by_epoch"][-1] == res["selection_score"]
  assert len(res["train_losses"]) == res["steps"] == 4
  assert res["train_loss_per_epoch"] == pytest.approx(
      [np.mean(res["train_losses"][:2]), np.mean(res["train_losses"][2:])])
  # The same seed gives every method the same training and selection data; another seed not.
  assert f[1]["data_sha256"] == res["data_sha256"]
  assert vanilla[2]["data_sha256"]["selection"] != res["data_sha256"]["selection"]
  # ... and it is the split computed independently from the file; dev is scored without it.
  train_file = data.read_glue_tsv(tasks.TASKS["sst2"], os.path.join(GLUE, "SST-2", "train.tsv"))
  train, sel = data.split_selection(train_file, 16, 8, 1)
  assert res["data_sha256"] == {"train": train.digest(), "selection": sel.digest()}
  dev = data.read_glue_tsv(tasks.TASKS["sst2"], os.path.join(GLUE, "SST-2", "dev.tsv"))
  assert full[1]["data_sha256"]["dev"] == dev.digest()
  assert set(full[1]["metrics"]) == {"dev", "selection"}
  assert full[1]["score"] == full[1]["metrics"]["dev"]["accuracy"]
  # The same training run: a selection-only run differs from a full one in scoring only.
  assert full[1]["selection_by_epoch"] == res["selection_by_epoch"]
  assert full[1]["train_losses"] == res["train_losses"]


def test_cli_selection_options_are_checked(tmp_path, capsys):
  base = ["train", "--task", "sst2", "--model", TINY, "--data-dir", GLUE,
          "--output-dir", str(tmp_path / "x")]
  assert cli.main([*base, "--mode", "F", "--selection-only"]) == 2
  assert cli.main([*base, "--mode", "F", "--child-mask", "nope.npz"]) == 2
  assert cli.main([*base, "--mode", "D", "--child-mask", str(tmp_path / "nope.npz")]) == 2
  assert cli.main([*base, "--mode", "vanilla", "--max-train-samples", "30",
                   "--selection-samples", "8"]) == 2
  err = capsys.readouterr().err
  assert "--selection-only needs --selection-samples" in err
  assert "--child-mask goes with --mode D" in err and "does not exist" in err
  assert "selection split of 8" in err
  assert not os.path.exists(tmp_path / "x" / "seed-42")


def test_child_mask_per_seed_trains_each_seeds_network_as_one_experiment(tmp_path, capsys):
  d = _run(tmp_path, "d", "D", "--selection-only", "--seeds", "1", "2")
  masks = str(tmp_path / "d" / "seed-{seed}" / "child_mask.npz")
  again = _run(tmp_path, "again", "D", "--selection-only", "--seeds", "1", "2",
               "--child-mask", masks)
  for seed in (1, 2):
    given = masks.replace("{seed}", str(seed))
    with open(given, "rb") as f:
      assert again[seed]["child_mask_sha256"] == hashlib.sha256(f.read()).hexdigest()
    with np.load(given) as a, np.load(tmp_path / "again" / f"seed-{seed}" / "child_mask.npz") as b:
      assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
    # the seed's own network, as its Fisher pass made it: the same training, bit for bit
    assert again[seed]["train_losses"] == d[seed]["train_losses"]
  assert d[1]["train_losses"] != d[2]["train_losses"]
  with open(tmp_path / "again" / "summary.json") as f:
    assert json.load(f)["seeds"] == [1, 2]  # one experiment: the argument is the same
  # a seed without its file is refused before any seed trains
  capsys.readouterr()
  assert cli.main(["train", "--task", "sst2", "--mode", "D", "--model", TINY, "--data-dir", GLUE,
                   "--seeds", "1", "3", "--child-mask", masks,
                   "--output-dir", str(tmp_path / "missing")]) == 2
  assert f"mask file {masks.replace('{seed}', '3')} does not exist" in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "missing")


def test_child_mask_of_another_reserve_p_is_refused(tmp_path, capsys):
  _run(tmp_path, "d", "D", "--selection-only", "--seeds", "1", "--reserve-p", "0.2")
  given = tmp_path / "d" / "seed-1" / "child_mask.npz"
  with np.load(given) as f:
    assert f[RESERVE_P_KEY] == 0.2 and f[RESERVE_P_KEY].dtype == np.float64
    masks = {k: f[k] for k in f.files if k != RESERVE_P_KEY}
  base = ["train", "--task", "sst2", "--mode", "D", "--model", TINY, "--data-dir", GLUE,
          "--seeds", "1", "--output-dir", str(tmp_path / "other")]
  assert cli.main([*base, "--reserve-p", "0.3", "--child-mask", str(given)]) == 2
  assert (f"--child-mask {given} holds a child network of reserve_p 0.2, not --reserve-p 0.3"
          in capsys.readouterr().err)
  assert not os.path.exists(tmp_path / "other")
  # ... and by the library too, for a caller that skips the CLI's checks
  run = types.SimpleNamespace(cfg=types.SimpleNamespace(child_mask=str(given), seed=1,
                                                        reserve_p=0.3), results={})
  with pytest.raises(UsageError, match="reserve_p 0.2, not --reserve-p 0.3"):
    steps.given_network(run, None)
  # A file that records nothing (written before files did) is taken as it is, and its
  # copy in the new run records nothing either.
  old = tmp_path / "old.npz"
  np.savez_compressed(old, **masks)
  res = _run(tmp_path, "old", "D", "--selection-only", "--seeds", "1", "--reserve-p", "0.3",
             "--child-mask", str(old))
  with np.load(tmp_path / "old" / "seed-1" / "child_mask.npz") as f:
    assert RESERVE_P_KEY not in f.files and all(np.array_equal(f[k], masks[k]) for k in masks)
  assert res[1]["child_network"]["kept"] == sum(
      int(m.sum()) for k, m in masks.items() if "layer" in k)
  # A bad record is a one-line error, not a traceback.
  np.savez_compressed(old, **masks, **{RESERVE_P_KEY: np.array([0.3, 0.3])})
  assert cli.main([*base, "--reserve-p", "0.3", "--child-mask", str(old)]) == 2
  assert f"{RESERVE_P_KEY} is [0.3, 0.3], not a fraction" in capsys.readouterr().err
