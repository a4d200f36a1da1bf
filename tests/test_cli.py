"""The ``childtune`` command line end to end, on real GLUE fixtures and a tiny BERT."""

import ctypes.util
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import GLUE, HERE, TINY

from childtune_jax.app import (
  classifier,
  cli,
  data,
  experiment,
  files,
  modes,
  provenance,
  steps,
  stream,
  summary,
  tasks,
  train,
)

FAST = ["--model", TINY, "--data-dir", GLUE, "--epochs", "1", "--batch-size", "8",
        "--max-seq-length", "32", "--learning-rate", "1e-3"]


def _results(out, seed=42):
  with open(os.path.join(out, f"seed-{seed}", "results.json")) as f:
    return json.load(f)


def test_train_sst2_saves_a_loadable_model_and_true_accuracy(tmp_path):
  out = str(tmp_path / "run")
  assert cli.main(["train", "--task", "sst2", "--mode", "F", *FAST, "--output-dir", out]) == 0
  res = _results(out)
  assert res["config"]["mode"] == "F" and res["steps"] == 4  # 32 examples / 8
  assert set(res["versions"]) >= {"jax", "optax", "flax", "transformers"}
  assert res["device"]["malloc"] == provenance.malloc_library()
  # Reload the saved folder and score the dev set one sentence at a time, independently of
  # the CLI's batched, padded loop.
  from transformers import AutoTokenizer

  from childtune_jax.models import from_pretrained

  model_dir = os.path.join(out, "seed-42", "model")
  model, initialised = from_pretrained(model_dir, num_labels=2)
  assert initialised == []
  tok = AutoTokenizer.from_pretrained(model_dir)
  dev = data.read_glue_tsv(tasks.TASKS["sst2"], os.path.join(GLUE, "SST-2", "dev.tsv"))
  correct = 0
  for text, label in zip(dev.texts[0], dev.labels):
    enc = tok([text], truncation=True, max_length=32, return_tensors="np")
    logits = model(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
    correct += int(np.argmax(logits[0]) == label)
  assert res["metrics"]["dev"]["accuracy"] == pytest.approx(correct / len(dev))
  with open(os.path.join(out, "summary.json")) as f:
    summary = json.load(f)
  assert summary["metrics"]["dev/accuracy"]["mean"] == pytest.approx(correct / len(dev))


def test_d_mask_cola_and_regression_stsb(tmp_path):
  out = str(tmp_path / "d")
  assert cli.main(["train", "--task", "cola", "--mode", "D", "--reserve-p", "0.2", *FAST,
                   "--no-save-model", "--output-dir", out]) == 0
  with np.load(os.path.join(out, "seed-42", "child_mask.npz")) as f:
    masks = dict(f)
  layer = np.concatenate([v.ravel() for k, v in masks.items() if "layer" in k])
  assert abs(layer.mean() - 0.2) < 0.01  # ties are rare for real gradients
  assert all(v.all() for k, v in masks.items() if "layer" not in k)
  res = _results(out)
  assert res["child_network"]["fraction"] == pytest.approx(layer.mean())
  assert set(res["metrics"]["dev"]) == {"matthews"}
  out2 = str(tmp_path / "stsb")
  assert cli.main(["train", "--task", "stsb", "--mode", "D", "--fisher", "per-batch", *FAST,
                   "--no-save-model", "--output-dir", out2]) == 0
  metrics = _results(out2)["metrics"]["dev"]
  assert set(metrics) == {"pearson", "spearman"} and all(np.isfinite(list(metrics.values())))


def test_own_csv_files_and_overlap(tmp_path, capsys):
  rte = data.read_glue_tsv(tasks.TASKS["rte"], os.path.join(GLUE, "RTE", "train.tsv"))
  path = tmp_path / "mine.csv"
  import csv

  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["premise", "claim", "gold"])
    for a, b, y in zip(*rte.texts, rte.labels):
      w.writerow([a, b, tasks.TASKS["rte"].labels[y]])
  outs = []
  for seed in (1, 2):
    out = str(tmp_path / f"own{seed}")
    outs.append(out)
    argv = ["train", "--task", "rte", "--mode", "D", "--model", TINY, "--train-file", str(path),
            "--validation-file", str(path), "--text-columns", "premise,claim",
            "--label-column", "gold", "--epochs", "1", "--batch-size", "16",
            "--max-seq-length", "32", "--max-train-samples", "20", "--seeds", str(seed),
            "--no-save-model", "--output-dir", out]
    assert cli.main(argv) == 0
    assert _results(out, seed)["train_examples"] == 20
  files = [os.path.join(o, f"seed-{s}", "child_mask.npz") for o, s in zip(outs, (1, 2))]
  out_dir = tmp_path / "not" / "yet"  # made by the command
  result_json = str(out_dir / "overlap.json")
  plot = out_dir / "overlap.png"
  assert cli.main(["overlap", *files, "--names", "a", "b", "--json", result_json,
                   "--plot", str(plot)]) == 0
  assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert sorted(os.listdir(out_dir)) == ["overlap.json", "overlap.png"]  # no temporary files
  a, b = (dict(np.load(f)) for f in files)
  inter = sum(int((a[k] & b[k]).sum()) for k in a if "layer" in k)
  union = sum(int((a[k] | b[k]).sum()) for k in a if "layer" in k)
  size_a, size_b = (sum(int(m[k].sum()) for k in m if "layer" in k) for m in (a, b))
  total = sum(a[k].size for k in a if "layer" in k)
  with open(result_json) as f:
    result = json.load(f)
  assert result["jaccard"][0][1] == pytest.approx(inter / union)
  assert result["overlap"][0][1] == pytest.approx(inter / min(size_a, size_b))
  assert result["kept_fraction"] == pytest.approx([size_a / total, size_b / total])
  fa, fb = size_a / total, size_b / total
  assert result["random_jaccard"][0][1] == pytest.approx(fa * fb / (fa + fb - fa * fb))
  assert result["jaccard"][0][0] == result["overlap"][1][1] == 1.0


def test_resume_equals_uninterrupted(tmp_path, capsys, dies_at_batch):
  args = ["train", "--task", "mrpc", "--mode", "F", *FAST, "--epochs", "2", "--save-every", "3",
          "--report-to", "tensorboard"]
  full = str(tmp_path / "full")
  assert cli.main(args + ["--output-dir", full]) == 0

  part = str(tmp_path / "part")
  # Dies in the last step, after the checkpoint of step 6 (epoch 2).
  with dies_at_batch(8, RuntimeError), pytest.raises(RuntimeError):
    cli.main(args + ["--output-dir", part])
  assert os.path.isdir(os.path.join(part, "seed-42", "checkpoints", "6"))
  other = ["train", "--task", "mrpc", "--mode", "vanilla", *FAST, "--epochs", "2"]
  assert cli.main(other + ["--output-dir", part, "--resume"]) == 2  # another configuration
  assert "was run with another configuration: mode='F' (now 'vanilla')" in capsys.readouterr().err
  os.remove(os.path.join(part, "seed-42", "run.json"))  # a folder of an older version:
  assert cli.main(other + ["--output-dir", part, "--resume"]) == 2  # the checkpoint refuses
  assert "does not fit this run's state" in capsys.readouterr().err
  assert cli.main(args + ["--output-dir", part, "--resume"]) == 0
  assert _results(part)["metrics"] == _results(full)["metrics"]
  assert _results(part)["train_loss_last_epoch"] == _results(full)["train_loss_last_epoch"]
  from childtune_jax.models import read_safetensors

  a, b = (read_safetensors(os.path.join(d, "seed-42", "model")) for d in (full, part))
  assert sorted(a) == sorted(b)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
  # The metrics stream continued where the checkpoint was: the steps after it, written by
  # the killed run, were dropped and trained again; no step twice, in both of its forms.
  from test_stream import tensorboard_scalars

  streams = [stream.read(os.path.join(d, "seed-42", "metrics.jsonl")) for d in (full, part)]
  assert streams[0] == streams[1]
  steps = [r["step"] for r in streams[0] if "train/loss" in r]
  assert steps == list(range(1, 9))
  boards = [tensorboard_scalars(os.path.join(d, "seed-42", "tensorboard")) for d in (full, part)]
  assert boards[0] == boards[1]
  assert [s for s, _ in boards[0]["train/loss"]] == steps
  np.testing.assert_allclose([v for _, v in boards[0]["train/loss"]],
                             [r["train/loss"] for r in streams[0] if "train/loss" in r],
                             rtol=1e-7)  # TensorBoard keeps float32
  assert any(k.startswith("eval/dev/") for k in boards[0])


def _bad(tmp_path, capsys, argv, message):
  out = str(tmp_path / "never")
  status = cli.main(argv + ["--output-dir", out] if argv[0] == "train" else argv)
  err = capsys.readouterr().err.strip()
  assert status == 2
  assert len(err.splitlines()) == 1 and message in err, err
  assert not os.path.exists(out)


def test_bad_input_one_line_exit_2_nothing_written(tmp_path, capsys):
  base = ["train", "--task", "sst2", "--mode", "F", "--model", TINY]
  _bad(tmp_path, capsys, base + ["--data-dir", str(tmp_path / "nope")], "does not exist")
  (tmp_path / "SST-2").mkdir()
  (tmp_path / "SST-2" / "train.tsv").write_text("sentence\tlabel\n")
  (tmp_path / "SST-2" / "dev.tsv").write_text("sentence\tlabel\nfine\t1\n")
  _bad(tmp_path, capsys, base + ["--data-dir", str(tmp_path)], "no examples")
  (tmp_path / "SST-2" / "train.tsv").write_text("text\tlabel\nfine\t1\n")
  _bad(tmp_path, capsys, base + ["--data-dir", str(tmp_path)], "missing column(s) ['sentence']")
  (tmp_path / "SST-2" / "train.tsv").write_text("sentence\tlabel\nfine\t1\nbad\t7\n")
  _bad(tmp_path, capsys, base + ["--data-dir", str(tmp_path)], "label '7' is outside")
  _bad(tmp_path, capsys, ["train", "--task", "sst2", "--mode", "F", "--data-dir", GLUE,
                          "--model", str(tmp_path / "no-model")], "does not exist")
  _bad(tmp_path, capsys, base + ["--train-file", str(tmp_path / "x.csv"),
                                 "--validation-file", str(tmp_path / "x.csv"),
                                 "--text-columns", "a", "--label-column", "b"], "cannot read")
  _bad(tmp_path, capsys, ["overlap", str(tmp_path / "missing.npz")], "does not exist")
  _bad(tmp_path, capsys, [*base, "--data-dir", GLUE, "--compilation-cache",
                          str(tmp_path / "SST-2" / "train.tsv")], "--compilation-cache")


@pytest.mark.parametrize("argv", [
    ["--task", "nope", "--mode", "F"],
    ["--task", "sst2", "--mode", "F", "--reserve-p", "1.5"],
    ["--task", "sst2", "--mode", "F", "--reserve-p", "0"],
    ["--task", "sst2", "--mode", "Z"],
])
def test_bad_arguments_exit_2(tmp_path, capsys, argv):
  with pytest.raises(SystemExit) as e:
    cli.main(["train", *argv, "--output-dir", str(tmp_path / "x")])
  assert e.value.code == 2
  assert not os.path.exists(tmp_path / "x")


def test_refuses_finished_output_and_hub_without_network(tmp_path, capsys, monkeypatch):
  out = tmp_path / "done"
  (out / "seed-42").mkdir(parents=True)
  (out / "seed-42" / "results.json").write_text("{}")
  status = cli.main(["train", "--task", "sst2", "--mode", "F", *FAST, "--output-dir", str(out)])
  assert status == 2 and "already holds a finished run" in capsys.readouterr().err
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  status = cli.main(["train", "--task", "sst2", "--mode", "F", "--data-dir", GLUE, "--model",
                     "someone/no-such-model", "--output-dir", str(tmp_path / "hub")])
  err = capsys.readouterr().err
  assert status == 2 and "--model DIR" in err and not (tmp_path / "hub").exists()


def test_dynamic_padding_buckets():
  enc = data.Encoded([[1] * 5, [1] * 17, [1] * 40], [[0] * 5, [0] * 17, [0] * 40],
                     np.array([0, 1, 0], np.int32))
  assert data.make_batch(enc, [0], 128, 0)["input_ids"].shape == (1, 16)
  assert data.make_batch(enc, [0, 1], 128, 0)["input_ids"].shape == (2, 32)
  b = data.make_batch(enc, [2, 0], 32, 0, rows=4)
  assert b["input_ids"].shape == (4, 32)
  np.testing.assert_array_equal(b["weights"], [1, 1, 0, 0])
  np.testing.assert_array_equal(b["attention_mask"][1], [1] * 5 + [0] * 27)


def test_schedule_is_hf_linear_with_warmup():
  s = steps.linear_warmup_decay(1.0, total=100, warmup_ratio=0.1)
  for step in (0, 5, 10, 55, 100):
    want = step / 10 if step < 10 else (100 - step) / 90
    assert float(s(step)) == pytest.approx(want, abs=1e-6)


def test_summary_table_columns_in_the_task_order():
  task = tasks.TASKS["mrpc"]
  fresh = {"metrics": {"dev": {"f1": 0.8, "accuracy": 0.7}}, "score": 0.8}
  read_back = {"metrics": {"dev": {"accuracy": 0.6, "f1": 0.9}}, "score": 0.9}  # sorted keys
  for results in ({1: read_back, 2: fresh}, {1: fresh, 2: read_back}):
    summarized = summary.summarize(results, task)
    assert list(summarized["metrics"]) == ["dev/f1", "dev/accuracy", "score"]
    assert summarized["metrics"]["dev/f1"]["mean"] == pytest.approx(np.mean([0.8, 0.9]))
    assert summarized["metrics"]["dev/f1"]["std"] == pytest.approx(np.std([0.8, 0.9], ddof=1))
    assert summary.format_table([("F", summarized)]).splitlines()[0].split() == [
        "mode", "dev/f1", "dev/accuracy", "seeds"]


def test_results_record_the_source_commit(tmp_path, monkeypatch):
  import subprocess

  root = os.path.join(HERE, os.pardir)
  head = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True)
  if head.returncode:
    pytest.skip("not a git checkout")
  assert provenance.versions()["childtune-jax commit"].split("+")[0] == head.stdout.strip()
  # A copy that git does not track, inside a checkout or outside any, has no commit.
  copy = tmp_path / "provenance.py"
  copy.write_text("")
  (tmp_path / "__init__.py").write_text("")
  monkeypatch.setattr(provenance, "__file__", str(copy))
  assert provenance.source_commit() is None
  subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
  assert provenance.source_commit() is None
  assert "childtune-jax commit" not in provenance.versions()


def test_overlap_plot_without_matplotlib_fails_before_any_work(tmp_path, capsys, monkeypatch):
  import importlib.util

  find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "matplotlib" else find_spec(name, *a))
  plot = tmp_path / "o.png"
  assert cli.main(["overlap", "a.npz", "b.npz", "--plot", str(plot)]) == 2
  assert "pip install matplotlib" in capsys.readouterr().err
  assert not plot.exists()


def test_init_seed_sets_the_head_initialisation_apart_from_the_seed(tmp_path, monkeypatch):
  calls = []
  load_classifier = classifier.load_classifier

  def spy(name, num_labels, seed, *rest, **kwargs):
    calls.append(seed)
    return load_classifier(name, num_labels, seed, *rest, **kwargs)

  monkeypatch.setattr(classifier, "load_classifier", spy)
  out = str(tmp_path / "run")
  argv = ["train", "--task", "sst2", "--mode", "vanilla", *FAST, "--no-save-model",
          "--max-train-samples", "8"]
  assert cli.main([*argv, "--output-dir", out, "--seeds", "1", "2", "--init-seed", "5"]) == 0
  assert calls == [5, 5]
  assert [_results(out, s)["config"]["init_seed"] for s in (1, 2)] == [5, 5]
  # Each seed's curves.png and the folder's, across the two seeds.
  assert all(os.path.isfile(os.path.join(out, d, "curves.png")) for d in ("seed-1", "seed-2", ""))
  calls.clear()
  assert cli.main([*argv, "--output-dir", str(tmp_path / "default"), "--seeds", "3"]) == 0
  assert calls == [3]


def test_summary_covers_every_seed_of_the_same_experiment_in_the_folder(
    tmp_path, monkeypatch, caplog):
  import dataclasses

  def fake_run(cfg, train_set, evals, seed_dir, resume, **kwargs):
    res = {"config": dataclasses.asdict(cfg), "score": cfg.seed / 100,
           "metrics": {"dev": {"accuracy": cfg.seed / 100}}}
    os.makedirs(seed_dir)
    files.write_json(os.path.join(seed_dir, "results.json"), res)
    return res

  monkeypatch.setattr(train, "run", fake_run)
  out = str(tmp_path / "run")
  argv = ["train", "--task", "sst2", "--mode", "F", *FAST, "--output-dir", out]

  def run(*extra):
    return experiment.run_train(cli.parse([*argv, *extra]))

  assert run("--seeds", "5", "1")["seeds"] == [1, 5]
  summary = run("--resume", "--seeds", "3", "--save-every", "9")
  assert summary["seeds"] == [1, 3, 5]
  assert summary["metrics"]["dev/accuracy"]["values"] == [0.01, 0.03, 0.05]
  with open(os.path.join(out, "summary.json")) as f:
    assert json.load(f) == summary
  assert run("--resume", "--seeds", "1") == summary  # all finished: nothing runs
  summary = run("--resume", "--seeds", "7", "--learning-rate", "1e-4")
  assert summary["seeds"] == [7]
  assert sum("run with another config" in r.message for r in caplog.records) == 3


def test_compilation_cache_is_used_and_changes_no_number(tmp_path):
  from jax.experimental.compilation_cache import compilation_cache

  cache = tmp_path / "xla"
  argv = ["train", "--task", "sst2", "--mode", "F", *FAST, "--no-save-model",
          "--max-train-samples", "8"]
  hits = {"write": 0, "read": 0}
  name = "write"

  def count(event, **kwargs):
    if event == "/jax/compilation_cache/cache_hits":
      hits[name] += 1

  previous = jax.config.jax_persistent_cache_min_compile_time_secs
  session_cache = jax.config.jax_compilation_cache_dir  # the suite's own (conftest.py)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # tiny model: cache all
  jax.monitoring.register_event_listener(count)
  try:
    for name in ("write", "read"):
      jax.clear_caches()  # each run as a new process: only the persistent cache remembers
      argv_cached = [*argv, "--output-dir", str(tmp_path / name), "--compilation-cache", str(cache)]
      assert cli.main(argv_cached) == 0
      if name == "write":
        written = sorted(os.listdir(cache))
  finally:
    jax.monitoring.unregister_event_listener(count)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", previous)
  assert any(n.endswith("-cache") for n in written)
  assert sorted(os.listdir(cache)) == written  # the second run compiled nothing new
  assert hits["read"] >= len(written) > 0
  assert jax.config.jax_compilation_cache_dir == session_cache  # the setting is put back
  compilation_cache.reset_cache()
  # The "write" run compiled as any run does; the "read" run used the stored programs.
  write, read = (_results(str(tmp_path / n)) for n in ("write", "read"))
  assert read["metrics"] == write["metrics"]
  assert read["train_loss_last_epoch"] == write["train_loss_last_epoch"]


def test_compilation_cache_is_on_by_default_and_off_with_empty(tmp_path, monkeypatch):
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  previous = jax.config.jax_persistent_cache_min_compile_time_secs
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # tiny model: cache all
  try:
    argv = ["train", "--task", "sst2", "--mode", "vanilla", *FAST, "--no-save-model",
            "--max-train-samples", "8"]
    assert cli.main([*argv, "--output-dir", str(tmp_path / "a"), "--compilation-cache",
                     ""]) == 0
    assert not (tmp_path / "xdg").exists()
    assert cli.main([*argv, "--output-dir", str(tmp_path / "b")]) == 0
  finally:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", previous)
  cache = tmp_path / "xdg" / "childtune-jax" / "xla"
  assert any(n.endswith("-cache") for n in os.listdir(cache))


def test_dropout_and_child_tuning_f_draw_from_their_own_streams(tmp_path, monkeypatch):
  # Per step s, dropout uses fold_in(dropout, s) and F's mask fold_in(child, s): the bases
  # differ, so no step of one stream repeats a key of the other (checked over a long run).
  for seed in (0, 1, 42):
    bases = [steps.stream_key(seed, name) for name in steps.STREAMS]
    streams = [jax.random.key_data(jax.vmap(jax.random.fold_in, (None, 0))(k, np.arange(5000)))
               for k in bases]
    words = [{tuple(map(int, w)) for w in np.asarray(s)} for s in streams]
    assert len(words[0]) == len(words[1]) == 5000 and not words[0] & words[1]
  # ... and the run hands each consumer its own stream.
  asked, f_keys = [], []
  real_stream, real_f = steps.stream_key, modes.child_tuning_adamw
  monkeypatch.setattr(steps, "stream_key", lambda s, n: asked.append((s, n)) or real_stream(s, n))
  monkeypatch.setattr(modes, "child_tuning_adamw",
                      lambda *a, **k: f_keys.append(k["key"]) or real_f(*a, **k))
  out = str(tmp_path / "run")
  assert cli.main(["train", "--task", "sst2", "--mode", "F", *FAST, "--seeds", "7",
                   "--no-save-model", "--output-dir", out]) == 0
  assert set(asked) == {(7, "child"), (7, "dropout")}  # F's kept-fraction metric redraws "child"
  np.testing.assert_array_equal(jax.random.key_data(f_keys[0]),
                                jax.random.key_data(real_stream(7, "child")))


def test_malloc_library_names_a_preloaded_allocator():
  code = "from childtune_jax.app.provenance import malloc_library; print(malloc_library())"

  def run(preload):
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    if preload:
      env["LD_PRELOAD"] = preload
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, check=True).stdout.strip()

  assert run(None) == "default"
  lib = ctypes.util.find_library("tcmalloc_minimal")  # e.g. Debian's libtcmalloc-minimal4
  if lib is None:
    pytest.skip("tcmalloc is not installed")
  assert run(lib).startswith("libtcmalloc_minimal.so")
