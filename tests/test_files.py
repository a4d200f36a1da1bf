"""Atomic writes: the old file survives a failed write, and no temporary file is left behind."""

import json

import numpy as np
import pytest

from childtune_jax.app import files


def test_write_json_and_text_write_what_they_are_given(tmp_path):
  obj = {"b": [1, 2.5], "a": {"c": None}}
  files.write_json(str(tmp_path / "r.json"), obj)
  with open(tmp_path / "r.json") as f:
    assert json.load(f) == obj
  files.write_text(str(tmp_path / "s.md"), "| a |\n")
  assert (tmp_path / "s.md").read_text() == "| a |\n"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "s.md"]


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
  path = tmp_path / "results.json"
  files.write_json(str(path), {"score": 1})
  with pytest.raises(TypeError):
    files.write_json(str(path), {"score": object()})  # fails halfway through json.dump
  with open(path) as f:
    assert json.load(f) == {"score": 1}
  assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_replacing_keeps_the_extension_for_writers_that_choose_a_format_by_it(tmp_path):
  path = str(tmp_path / "keep.npz")
  with files.replacing(path) as tmp:
    assert tmp.endswith(".npz") and tmp != path
    np.savez_compressed(tmp, x=np.arange(3))  # would append ".npz" to any other name
  with np.load(path) as f:
    np.testing.assert_array_equal(f["x"], np.arange(3))
  assert [p.name for p in tmp_path.iterdir()] == ["keep.npz"]


def test_save_figure_writes_the_format_of_the_extension(tmp_path):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots()
  ax.plot([0, 1], [1, 0])
  files.save_figure(fig, str(tmp_path / "a.png"), dpi=20)
  files.save_figure(fig, str(tmp_path / "a.svg"))
  plt.close(fig)
  assert (tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert b"<svg" in (tmp_path / "a.svg").read_bytes()[:1000]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "a.svg"]
