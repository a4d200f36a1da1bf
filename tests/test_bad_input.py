"""Bad input never loses or mislabels a finished run: a one-line error and the right exit code.

Exit codes: 0 done, 1 a run that failed (diverged, disk), 2 bad input or options, 130
interrupted. A finished run stays byte-identical through every failure.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import BASE, GLUE, HERE, TINY, snapshot

from childtune_jax import child_tuning_f
from childtune_jax.app import classifier, cli, data


@pytest.fixture
def fin(finished, tmp_path):
  """A private copy of the finished vanilla run, with a user's files beside its seeds."""
  out = tmp_path / "FIN"
  shutil.copytree(finished / "vanilla", out)
  (out / "seed-42-backup").mkdir()
  (out / "seed-42-backup" / "notes.txt").write_text("mine")
  (out / "seed-notes.txt").write_text("mine too")
  return str(out)


def _fails(capsys, argv, status, message):
  got = cli.main(argv)
  err = capsys.readouterr().err.strip()
  assert got == status, err
  lines = err.splitlines()
  assert len(lines) == 1 and lines[0].startswith("childtune: error:") and message in err, err
  assert "Traceback" not in err


def _model_copy(tmp_path, name="model"):
  path = tmp_path / name
  shutil.copytree(TINY, path)
  return path


def test_overwrite_that_fails_keeps_the_finished_run_byte_identical(fin, tmp_path, capsys):
  before = snapshot(fin)
  over = [*BASE, "--output-dir", fin, "--overwrite"]
  broken = _model_copy(tmp_path, "not-json")
  (broken / "config.json").write_text("{not json")
  _fails(capsys, [*over, "--mode", "vanilla", "--model", str(broken)], 2, "config.json")
  no_tok = _model_copy(tmp_path, "no-tokenizer")
  os.remove(no_tok / "vocab.txt")
  os.remove(no_tok / "tokenizer_config.json")
  _fails(capsys, [*over, "--mode", "vanilla", "--model", str(no_tok)], 2, "tokenizer")
  gpt2 = _model_copy(tmp_path, "gpt2")
  (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
  _fails(capsys, [*over, "--mode", "vanilla", "--model", str(gpt2)], 2, "'gpt2'")
  listed = _model_copy(tmp_path, "list")
  (listed / "config.json").write_text("[1, 2]")
  _fails(capsys, [*over, "--mode", "vanilla", "--model", str(listed)], 2, "not a JSON object")
  corrupt = _model_copy(tmp_path, "corrupt")
  (corrupt / "flax_model.msgpack").write_bytes(b"\x00garbage" * 50)
  _fails(capsys, [*over, "--mode", "vanilla", "--model", str(corrupt)], 2, "cannot load")
  bin_only = _model_copy(tmp_path, "bin-only")
  (bin_only / "tf_model.h5").write_bytes(b"weights")
  _fails(capsys, [*over, "--mode", "vanilla", "--model", str(bin_only)], 2, "tf_model.h5")
  _fails(capsys, [*over, "--mode", "F", "--reserve-p", "0.001"], 2, "rounds to 0")
  garbage = tmp_path / "garbage.npz"
  garbage.write_bytes(b"PK\x03\x04 not a zip")
  _fails(capsys, [*over, "--mode", "random", "--random-like", str(garbage)], 2,
         "not an .npz archive")
  _fails(capsys, [*over, "--mode", "vanilla", "--max-seq-length", "129"], 2, "128 positions")
  assert snapshot(fin) == before


def test_overwrite_interrupted_or_diverged_keeps_the_finished_run(fin, capsys, monkeypatch):
  before = snapshot(fin)
  real = data.make_batch
  calls = {"n": 0}

  def interrupted(*a, **k):
    calls["n"] += 1
    if calls["n"] == 2:
      raise KeyboardInterrupt
    return real(*a, **k)

  monkeypatch.setattr(data, "make_batch", interrupted)
  _fails(capsys, [*BASE, "--mode", "vanilla", "--output-dir", fin, "--overwrite"], 130,
         "interrupted")
  monkeypatch.setattr(data, "make_batch", real)
  _fails(capsys, [*BASE, "--mode", "vanilla", "--output-dir", fin, "--overwrite",
                  "--learning-rate", "1e6"], 1, "diverged")
  assert snapshot(fin) == before


def test_overwrite_may_read_the_run_it_replaces_and_keeps_user_files(finished, fin, tmp_path):
  model_run = tmp_path / "with-model"
  assert cli.main([*BASE[:-1], "--mode", "vanilla", "--output-dir", str(model_run)]) == 0
  own_model = str(model_run / "seed-42" / "model")
  assert cli.main([*BASE, "--mode", "F", "--model", own_model, "--output-dir", str(model_run),
                   "--overwrite"]) == 0
  with open(model_run / "seed-42" / "results.json") as f:
    assert json.load(f)["config"]["model"] == own_model
  d_run = tmp_path / "D"
  shutil.copytree(finished / "D", d_run)
  mask = str(d_run / "seed-42" / "child_mask.npz")
  assert cli.main([*BASE, "--mode", "random", "--random-like", mask, "--output-dir",
                   str(d_run), "--overwrite"]) == 0
  with open(d_run / "seed-42" / "results.json") as f:
    assert json.load(f)["config"]["mode"] == "random"
  assert not any(n.startswith(".childtune") for n in os.listdir(d_run))
  assert cli.main([*BASE, "--mode", "F", "--output-dir", fin, "--overwrite"]) == 0
  assert (tmp_path / "FIN" / "seed-42-backup" / "notes.txt").read_text() == "mine"
  assert (tmp_path / "FIN" / "seed-notes.txt").read_text() == "mine too"


def test_resume_refuses_another_configuration_naming_the_fields(fin, capsys):
  before = snapshot(fin)
  again = [*BASE, "--output-dir", fin, "--resume"]
  _fails(capsys, [*again, "--mode", "F", "--reserve-p", "0.1"], 2,
         "mode='vanilla' (now 'F'), reserve_p=0.3 (now 0.1)")
  _fails(capsys, [*again, "--mode", "vanilla", "--weight-decay", "0.1"], 2, "weight_decay")
  _fails(capsys, [*again, "--mode", "F", "--seeds", "42", "52"], 2, "mode='vanilla'")
  _fails(capsys, [*again, "--mode", "vanilla", "--init-seed", "3"], 2, "init_seed")
  assert snapshot(fin) == before
  assert cli.main([*again, "--mode", "vanilla"]) == 0  # the same configuration resumes


def test_killed_d_run_resumed_with_another_p_or_as_random_is_refused(tmp_path, capsys,
                                                                     dies_at_batch):
  out = str(tmp_path / "killed")
  # Dies after the Fisher pass (4 batches) and the first train steps.
  with dies_at_batch(7, RuntimeError), pytest.raises(RuntimeError):
    cli.main([*BASE, "--mode", "D", "--save-every", "1", "--output-dir", out])
  shutil.rmtree(os.path.join(out, "seed-42", "checkpoints"))
  before = snapshot(out)
  _fails(capsys, [*BASE, "--mode", "D", "--reserve-p", "0.05", "--output-dir", out,
                  "--resume"], 2, "reserve_p=0.3 (now 0.05)")
  _fails(capsys, [*BASE, "--mode", "random", "--output-dir", out, "--resume"], 2,
         "mode='D' (now 'random')")
  _fails(capsys, [*BASE, "--mode", "D", "--output-dir", out], 2, "unfinished run of seed 42")
  assert snapshot(out) == before


def _write(path, text, encoding="utf-8"):
  path.write_bytes(text.encode(encoding))
  return str(path)


def test_bad_data_is_refused_with_file_and_place(tmp_path, capsys):
  stsb = tmp_path / "STS-B"
  stsb.mkdir()
  header = "\t".join(["index", "genre", "filename", "year", "old_index", "source1", "source2",
                       "sentence1", "sentence2", "score"]) + "\n"
  row = "0\tg\tf\ty\t0\ts\ts\ta cat sits\ta cat sat\t{}\n"
  _write(stsb / "dev.tsv", header + row.format(1.0) + row.format(2.0))
  base = ["train", "--task", "stsb", "--mode", "vanilla", "--model", TINY, "--data-dir",
          str(tmp_path), "--max-seq-length", "32", "--output-dir", str(tmp_path / "out")]
  for bad in ("nan", "inf", "-1e30"):
    _write(stsb / "train.tsv", header + row.format(1.0) + row.format(bad))
    _fails(capsys, base, 2, "train.tsv:3")
  _write(stsb / "train.tsv", header + row.format(1.0) + row.format(2.0))
  _write(stsb / "dev.tsv", header + row.format(1.0))
  _fails(capsys, base, 2, "at least 2 evaluation examples")
  own = ["train", "--task", "sst2", "--mode", "vanilla", "--model", TINY, "--text-columns",
         "text", "--label-column", "label", "--output-dir", str(tmp_path / "own")]
  good = _write(tmp_path / "good.csv", "text,label\nfine,1\nbad,0\n")
  for name, content, message in (
      ("short.csv", "text,label\nfine,1\n1\n", "record 2"),
      ("ints.json", "[1, 2, 3]", "record 1 is a int"),
      ("missing.json", '[{"text": "a", "label": 1}, {"label": 0}]', "record 2 has no value"),
      ("object.json", '[{"text": {"a": 1}, "label": 1}]', "a dict, not text"),
  ):
    path = _write(tmp_path / name, content)
    _fails(capsys, [*own, "--train-file", path, "--validation-file", good], 2, message)
  latin = _write(tmp_path / "latin.csv", "text,label\ncaf\u00e9,1\n", encoding="latin-1")
  _fails(capsys, [*own, "--train-file", latin, "--validation-file", good], 2, "not UTF-8")
  long_line = _write(tmp_path / "long.csv", "text,label\n" + "w " * 100_000 + ",1\n")
  assert cli.main([*own, "--train-file", long_line, "--validation-file", good,
                   "--max-seq-length", "16", "--epochs", "1"]) == 0
  assert not os.path.exists(tmp_path / "out")


def test_undefined_metric_is_null_and_json_stays_strict(tmp_path, caplog):
  stsb = tmp_path / "STS-B"
  shutil.copytree(os.path.join(GLUE, "STS-B"), stsb)
  lines = (stsb / "dev.tsv").read_text().splitlines()
  header = lines[0].split("\t")
  score = header.index("score")
  rows = [line.split("\t") for line in lines[1:]]
  for r in rows:
    r[score] = "2.5"  # a constant column: correlations are undefined
  (stsb / "dev.tsv").write_text("\n".join(["\t".join(header)] + ["\t".join(r) for r in rows]))
  out = tmp_path / "out"
  assert cli.main(["train", "--task", "stsb", "--mode", "vanilla", "--model", TINY,
                   "--data-dir", str(tmp_path), "--epochs", "1", "--max-seq-length", "32",
                   "--no-save-model", "--output-dir", str(out)]) == 0

  def strict(path):
    with open(path) as f:
      return json.load(f, parse_constant=lambda c: pytest.fail(f"{c} in {path}"))

  res = strict(out / "seed-42" / "results.json")
  assert res["metrics"]["dev"] == {"pearson": None, "spearman": None}
  assert res["score"] is None
  assert strict(out / "summary.json")["metrics"]["dev/pearson"]["mean"] is None
  assert "reported as null" in caplog.text


@pytest.mark.parametrize("argv,message", [
    (["--learning-rate", "inf"], "finite"),
    (["--weight-decay", "nan"], "finite"),
    (["--seeds", "18446744073709551616"], "2**32"),
])
def test_non_finite_and_huge_options_are_refused_by_the_parser(argv, message, capsys, tmp_path):
  with pytest.raises(SystemExit) as e:
    cli.main([*BASE, "--mode", "F", "--output-dir", str(tmp_path / "x"), *argv])
  assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--mode", "F", "--score", "adam"], "--score goes with --mode dynamic"),
    (["--mode", "D", "--score-decay", "0.9"], "--score-decay goes with --mode dynamic"),
    (["--mode", "dynamic", "--score", "adam", "--score-decay", "0.9"], "goes with --score ema"),
])
def test_dynamic_score_options_only_where_they_apply(argv, message, capsys, tmp_path):
  _fails(capsys, [*BASE, *argv, "--output-dir", str(tmp_path / "o")], 2, message)
  assert not os.path.exists(tmp_path / "o")


def test_output_and_cache_under_a_file_and_a_file_as_model(tmp_path, capsys):
  afile = tmp_path / "file"
  afile.write_text("x")
  _fails(capsys, [*BASE, "--mode", "F", "--output-dir", str(afile / "out")], 2, "is a file")
  _fails(capsys, [*BASE, "--mode", "F", "--output-dir", str(tmp_path / "o"),
                  "--compilation-cache", str(afile / "cache")], 2, "--compilation-cache")
  _fails(capsys, [*BASE, "--mode", "F", "--output-dir", str(tmp_path / "o"),
                  "--model", str(afile)], 2, "is a file")
  _fails(capsys, ["overlap", str(afile)], 2, "not an .npz archive")
  floats = tmp_path / "floats.npz"
  np.savez(floats, w=np.zeros(3))
  _fails(capsys, ["overlap", str(floats)], 2, "not bool")
  assert not os.path.exists(tmp_path / "o")


def test_corrupt_results_of_another_seed_is_left_out_of_the_summary(fin, capsys, caplog):
  with open(os.path.join(fin, "seed-42", "results.json"), "rb") as f:
    good = f.read()
  os.makedirs(os.path.join(fin, "seed-7"))
  with open(os.path.join(fin, "seed-7", "results.json"), "w") as f:
    f.write("{truncated")
  assert cli.main([*BASE, "--mode", "vanilla", "--output-dir", fin, "--resume"]) == 0
  with open(os.path.join(fin, "summary.json")) as f:
    assert json.load(f)["seeds"] == [42]
  with open(os.path.join(fin, "seed-42", "results.json"), "rb") as f:
    assert f.read() == good
  assert "not a readable results.json" in caplog.text


@pytest.mark.parametrize("sampler", ["hash8", "bernoulli"])
def test_traced_reserve_p_is_clipped_and_nan_poisons(sampler):
  tx = optax.inject_hyperparams(child_tuning_f, static_args=("key", "sampler"))(
      reserve_p=0.5, key=0, sampler=sampler)
  grads = {"w": jnp.linspace(-1.0, 1.0, 64)}
  state = tx.init(grads)
  update = jax.jit(tx.update)
  for p, want in ((0.0, "zero"), (-0.5, "zero"), (1.5, "identity"), (float("nan"), "nan")):
    state.hyperparams["reserve_p"] = jnp.asarray(p, jnp.float32)
    out, _ = update(grads, state)
    w = np.asarray(out["w"])
    if want == "zero":
      np.testing.assert_array_equal(w, 0.0)
    elif want == "identity":
      np.testing.assert_allclose(w, np.asarray(grads["w"]), rtol=1e-6)
    else:
      assert np.isnan(w).all()


def test_sharded_safetensors_load_like_one_file(tmp_path):
  from safetensors.numpy import save_file

  from childtune_jax.models import read_safetensors

  source = os.path.join(HERE, "fixtures", "nnx", "bert")
  tensors = read_safetensors(source)
  sharded = tmp_path / "sharded"
  shutil.copytree(source, sharded)
  os.remove(sharded / "model.safetensors")
  keys = sorted(tensors)
  shards = {"model-00001-of-00002.safetensors": keys[::2],
            "model-00002-of-00002.safetensors": keys[1::2]}
  for name, part in shards.items():
    save_file({k: tensors[k] for k in part}, str(sharded / name))
  (sharded / "model.safetensors.index.json").write_text(json.dumps(
      {"weight_map": {k: name for name, part in shards.items() for k in part}}))
  from childtune_jax.models import from_pretrained

  a, _ = from_pretrained(source, num_labels=3)
  b, _ = from_pretrained(str(sharded), num_labels=3)
  from flax import nnx

  for x, y in zip(jax.tree_util.tree_leaves(nnx.state(a)),
                  jax.tree_util.tree_leaves(nnx.state(b))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  (tmp_path / "bin-only").mkdir()
  shutil.copy(os.path.join(source, "config.json"), tmp_path / "bin-only")
  (tmp_path / "bin-only" / "pytorch_model.bin").write_bytes(b"torch pickle")
  with pytest.raises(classifier.ModelError, match="pytorch_model.bin"):
    classifier.load_classifier(str(tmp_path / "bin-only"), 2, 0)


def test_library_bad_input_is_refused_by_name():
  from childtune_jax import fisher_mask, pack_keep, random_keep, unpack_keep

  like = {"w": jnp.zeros((2, 5))}
  keep = {"w": jnp.array([[True, False, True, True, False]] * 2)}
  with pytest.raises(TypeError, match="already unpacked"):
    unpack_keep(keep, like)
  packed = pack_keep(keep)
  np.testing.assert_array_equal(np.asarray(unpack_keep(packed, like)["w"]), keep["w"])
  with pytest.raises(ValueError, match="bits set past the 3 entries"):
    unpack_keep(packed, {"w": jnp.zeros((2, 3))})  # same word count, shorter axis
  with pytest.raises(TypeError, match="floating-point"):
    fisher_mask({"w": jnp.array([1 + 2j, 3 + 0j])}, 0.5)
  with pytest.raises(TypeError, match="floating-point.*'count'"):  # a step count, not scores
    fisher_mask({"w": jnp.ones(4), "count": jnp.array([3], jnp.int32)}, 0.5)
  with pytest.raises(ValueError, match="no scalars"):
    fisher_mask({"w": jnp.zeros((0, 3))}, 0.5)
  for count, error in ((10.5, TypeError), ("5", TypeError), (True, TypeError), (99, ValueError)):
    with pytest.raises(error, match="count"):
      random_keep(0, like, count=count)
  with pytest.raises(ValueError, match="64 bits"):
    child_tuning_f(0.3, key=2**70)
  tx = child_tuning_f(0.5, key=0)  # a zero-size leaf passes through; the others are masked
  grads = {"empty": jnp.zeros((0, 4)), "w": jnp.ones((4, 4))}
  out, _ = jax.jit(tx.update)(grads, tx.init(grads))
  assert out["empty"].shape == (0, 4) and set(np.unique(np.asarray(out["w"]))) <= {0.0, 2.0}


def test_overlap_of_empty_networks_is_undefined(tmp_path, capsys):
  from childtune_jax import jaccard

  empty = tmp_path / "empty.npz"
  np.savez(empty, **{"bert/encoder/layer/0/w": np.zeros((3, 4), bool)})
  empty2 = tmp_path / "empty2.npz"
  np.savez(empty2, **{"bert/encoder/layer/0/w": np.zeros((3, 4), bool)})
  full = tmp_path / "full.npz"
  np.savez(full, **{"bert/encoder/layer/0/w": np.ones((3, 4), bool)})
  out = tmp_path / "o.json"
  capsys.readouterr()
  assert cli.main(["overlap", str(empty), str(empty2), str(full), "--json", str(out)]) == 0
  assert "undef." in capsys.readouterr().out
  result = json.loads(out.read_text())
  # 0/0 is no number: |A n B| / |A u B| of two empty networks, |A n B| / min of an empty one
  assert result["jaccard"][0][0] is None and result["jaccard"][0][1] is None
  assert result["overlap"][0][2] is None and result["overlap"][0][1] is None
  assert result["jaccard"][0][2] == 0.0 and result["jaccard"][2][2] == 1.0
  assert result["overlap"][2][2] == 1.0
  assert np.isnan(jaccard({"w": jnp.zeros(3, bool)}, {"w": jnp.zeros(3, bool)}))
  _fails(capsys, ["overlap", str(empty), str(full), "--plot", str(tmp_path / "p.weird")], 2,
         ".png")
  _fails(capsys, ["overlap", str(empty), str(full), "--json", str(tmp_path)], 2, "is a folder")


def test_a_damaged_checkpoint_is_one_line_and_exit_2(tmp_path, capsys, dies_at_batch):
  out = str(tmp_path / "damaged")
  argv = [*BASE, "--mode", "F", "--save-every", "2", "--output-dir", out]
  with dies_at_batch(4):
    assert cli.main(argv) == 130
  capsys.readouterr()
  for root, _, names in os.walk(os.path.join(out, "seed-42", "checkpoints")):
    for name in names:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"garbage")
  _fails(capsys, [*argv, "--resume"], 2, "delete it to start over")


# Round 2 of hostile input: what once exited 0 with a wrong or mislabelled run, lost a finished
# run, or said something misleading.


def test_two_commands_on_one_folder_the_second_is_refused(fin, capsys):
  """The lock: a second process holds it (our own lock, from another process)."""
  import subprocess
  import sys

  before = snapshot(fin)
  holder = subprocess.Popen(
      [sys.executable, "-c",
       "import sys, time; from childtune_jax.app import rundir\n"
       "with rundir.locked(sys.argv[1]):\n  print('held', flush=True); time.sleep(60)", fin],
      stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    for again in ("--overwrite", "--resume"):
      _fails(capsys, [*BASE, "--mode", "vanilla", "--output-dir", fin, again], 2,
             "in use by another childtune command")
    assert {k: v for k, v in snapshot(fin).items() if k != ".childtune.lock"} == before
  finally:
    holder.kill()  # killed holding it: the lock goes with the process, its file stays
    holder.wait()
  assert cli.main([*BASE, "--mode", "vanilla", "--output-dir", fin, "--resume"]) == 0
  assert ".childtune.lock" not in os.listdir(fin)


def test_overwrite_whose_replace_fails_half_way_restores_every_entry(finished, tmp_path, capsys,
                                                                    monkeypatch):
  out = tmp_path / "two"
  assert cli.main([*BASE, "--mode", "vanilla", "--seeds", "1", "2", "--output-dir",
                   str(out)]) == 0
  before = snapshot(out)
  real = os.replace

  def stuck(src, dst):  # the second old seed cannot move (EBUSY, EXDEV, ...)
    if src.endswith("seed-2") and ".childtune-overwrite" not in src:
      raise OSError(16, "Device or resource busy", src)
    return real(src, dst)

  monkeypatch.setattr(os, "replace", stuck)
  _fails(capsys, [*BASE, "--mode", "F", "--seeds", "1", "2", "--output-dir", str(out),
                  "--overwrite"], 1, "cannot replace the old run")
  monkeypatch.setattr(os, "replace", real)
  after = {k: v for k, v in snapshot(out).items() if not k.startswith(".childtune-overwrite")}
  assert after == before
  # The next --overwrite says it drops the staged new run, and replaces the old one whole.
  assert cli.main([*BASE, "--mode", "F", "--seeds", "1", "2", "--output-dir", str(out),
                   "--overwrite"]) == 0
  for seed in (1, 2):
    with open(out / f"seed-{seed}" / "results.json") as f:
      assert json.load(f)["config"]["mode"] == "F"
  assert sorted(os.listdir(out)) == ["curves.png", "seed-1", "seed-2", "summary.json"]


def test_a_replace_killed_half_way_is_undone_or_finished(finished, tmp_path):
  from childtune_jax.app import rundir

  def folder(name, mode):
    out = tmp_path / name
    shutil.copytree(finished / mode, out)
    return out

  # Killed after moving the old run aside and half the new one in: the old run comes back.
  out = folder("half", "vanilla")
  old, staged = out / rundir.OLD, out / rundir.STAGING
  before = snapshot(out)
  shutil.copytree(finished / "D", staged)
  old.mkdir()
  os.replace(out / "seed-42", old / "seed-42")
  os.replace(out / "summary.json", old / "summary.json")
  os.replace(staged / "seed-42", out / "seed-42")
  rundir.recover(str(out))
  assert {k: v for k, v in snapshot(out).items() if not k.startswith(rundir.STAGING)} == before
  assert (staged / "seed-42" / "child_mask.npz").exists()  # the new run, back where it was
  # Killed after the new run was wholly in place: the old one goes, the new one stays.
  out = folder("whole", "D")
  before = snapshot(out)
  (out / rundir.OLD).mkdir()
  shutil.copytree(finished / "vanilla" / "seed-42", out / rundir.OLD / "seed-42")
  (out / rundir.OLD / rundir.REPLACED).write_text("")
  rundir.recover(str(out))
  assert snapshot(out) == before


@pytest.mark.parametrize("argv,message", [
    (["--mode", "F", "--grad-accum", "100"], "would take no optimizer step"),
    (["--mode", "dynamic", "--every", "1000"], "never be selected"),
    (["--mode", "dynamic", "--full-stage", "1000"], "never be selected"),
    (["--mode", "vanilla", "--seeds", "1", "1"], "seed 1 more than once"),
])
def test_runs_that_would_do_nothing_they_say_are_refused(argv, message, tmp_path, capsys):
  out = tmp_path / "out"
  _fails(capsys, [*BASE, *argv, "--output-dir", str(out)], 2, message)
  assert not out.exists()


def test_child_mask_of_another_seed_is_refused(finished, tmp_path, capsys):
  mask = str(finished / "D" / "seed-42" / "child_mask.npz")
  with np.load(mask) as f:
    assert int(f["__seed__"]) == 42
  out = tmp_path / "other"
  _fails(capsys, [*BASE, "--mode", "D", "--child-mask", mask, "--seeds", "42", "43",
                  "--output-dir", str(out)], 2, "the child network of seed 42, not of seed 43")
  assert not out.exists()
  assert cli.main([*BASE, "--mode", "D", "--child-mask", mask, "--output-dir", str(out)]) == 0


def test_own_files_label_as_text_and_infinite_temperature_are_refused(tmp_path, capsys):
  own = _write(tmp_path / "own.csv", "text,label\nfine,1\nbad,0\ngood,1\nawful,0\n")
  base = ["train", "--task", "sst2", "--mode", "vanilla", "--model", TINY, "--train-file", own,
          "--validation-file", own, "--output-dir", str(tmp_path / "out")]
  _fails(capsys, [*base, "--text-columns", "label", "--label-column", "label"], 2,
         "fed to the model as text")
  _fails(capsys, [*base, "--text-columns", "text,label", "--label-column", "label"], 2,
         "fed to the model as text")
  with pytest.raises(SystemExit) as e:
    cli.main(["multitask", "--tasks", "rte", "mrpc", "--mode", "vanilla", "--temperature", "inf",
              "--model", TINY, "--data-dir", GLUE, "--output-dir", str(tmp_path / "m")])
  assert e.value.code == 2 and "positive and finite" in capsys.readouterr().err


def test_a_model_with_nan_weights_is_refused_by_train_and_evaluate(tmp_path, capsys):
  from childtune_jax import models

  folder = tmp_path / "nan-model"
  model = _tiny_model()
  models.save_pretrained(model, str(folder), labels=("not_entailment", "entailment"))
  shutil.copy(os.path.join(TINY, "vocab.txt"), folder)
  shutil.copy(os.path.join(TINY, "tokenizer_config.json"), folder)
  from safetensors.numpy import load_file, save_file

  tensors = load_file(str(folder / "model.safetensors"))
  key = sorted(k for k in tensors if k.endswith("query.weight"))[0]
  tensors[key][0, 0] = np.nan
  save_file(tensors, str(folder / "model.safetensors"))
  _fails(capsys, ["evaluate", "--model", str(folder), "--task", "rte", "--data-dir", GLUE,
                  "--max-seq-length", "32"], 2, "non-finite weights")
  _fails(capsys, [*BASE, "--mode", "vanilla", "--model", str(folder), "--output-dir",
                  str(tmp_path / "out")], 2, "non-finite weights")
  assert not (tmp_path / "out").exists()


def test_misleading_mask_files_get_the_right_message(tmp_path, capsys):
  text = tmp_path / "text.npz"
  text.write_text("not a mask")
  npy = tmp_path / "mask.npy"
  np.save(npy, np.ones(3, bool))
  pickled = tmp_path / "pickled.npz"
  np.savez(pickled, w=np.array([{"a": 1}], dtype=object))
  for path, message in ((text, "not an .npz archive"), (npy, "not an .npz archive"),
                        (tmp_path, "is a folder"), (pickled, "holds Python objects")):
    _fails(capsys, ["overlap", str(path), str(path)], 2, message)
    assert "allow_pickle" not in capsys.readouterr().err


def test_output_dir_a_dangling_link_and_a_truncated_model(tmp_path, capsys):
  link = tmp_path / "link"
  link.symlink_to(tmp_path / "nowhere")
  _fails(capsys, [*BASE, "--mode", "vanilla", "--output-dir", str(link)], 2,
         "symbolic link")
  from childtune_jax import models

  model = _tiny_model()
  folder = tmp_path / "truncated"
  models.save_pretrained(model, str(folder))
  shutil.copy(os.path.join(TINY, "vocab.txt"), folder)
  shutil.copy(os.path.join(TINY, "tokenizer_config.json"), folder)
  weights = folder / "model.safetensors"
  assert oct(os.stat(weights).st_mode & 0o777) == oct(0o666 & ~_umask())  # not 0600
  weights.write_bytes(weights.read_bytes()[:-100])
  out = tmp_path / "out"
  _fails(capsys, [*BASE, "--mode", "vanilla", "--model", str(folder), "--output-dir", str(out)],
         2, "truncated")
  assert not out.exists()  # no run.json: the next plain run is not refused as unfinished


def _tiny_model():
  from flax import nnx

  from childtune_jax import models

  cfg = models.EncoderConfig.from_file(os.path.join(TINY, "config.json"), num_labels=2)
  return models.SequenceClassifier(cfg, rngs=nnx.Rngs(0))


def _umask():
  mask = os.umask(0)
  os.umask(mask)
  return mask


def test_argument_errors_and_sigterm_read_as_every_other_error(tmp_path, capsys):
  import signal
  import subprocess
  import sys

  with pytest.raises(SystemExit) as e:
    cli.main(["train", "--task", "rte", "--mode", "nonsense", "--output-dir", "x"])
  assert e.value.code == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("childtune: error: argument --mode") and len(err.splitlines()) == 1
  out = tmp_path / "term"
  proc = subprocess.Popen(
      [sys.executable, "-m", "childtune_jax", *BASE, "--mode", "F", "--epochs", "10",
       "--save-every", "1", "--output-dir", str(out)],
      stderr=subprocess.PIPE, text=True)
  deadline = 120
  import time

  start = time.time()
  while not (out / "seed-42" / "checkpoints").exists() and time.time() - start < deadline:
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 130, err
  lines = [line for line in err.splitlines() if "childtune: error" in line or "Traceback" in line]
  assert lines == ["childtune: error: interrupted (SIGTERM); finished runs are untouched "
                   "(--resume continues)"], err
  assert "Traceback" not in err and "Event loop is closed" not in err
  assert cli.main([*BASE, "--mode", "F", "--epochs", "10", "--save-every", "1",
                   "--output-dir", str(out), "--resume"]) == 0


def test_a_full_disk_while_saving_the_model_is_one_line(tmp_path, capsys, monkeypatch):
  import safetensors.numpy
  from safetensors import SafetensorError

  def full(*args, **kwargs):
    raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: "
                          "StorageFull, message: \"No space left on device\" })")

  monkeypatch.setattr(safetensors.numpy, "save_file", full)
  out = tmp_path / "full"
  _fails(capsys, [*BASE[:-1], "--mode", "vanilla", "--output-dir", str(out)], 1,
         "No space left on device")
  assert not (out / "seed-42" / "results.json").exists()
  assert not (out / "seed-42" / "model.tmp").exists()
