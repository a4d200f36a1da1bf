"""What the test modules share: the fixtures' paths, and pytest fixtures.

Test modules import the paths with ``from conftest import GLUE, TINY``: this folder is put
on ``sys.path`` for that (the suite imports test modules in importlib mode).
"""

import contextlib
import hashlib
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "fixtures")
GLUE = os.path.join(FIXTURES, "glue")  # small real GLUE samples, in the GLUE TSV layout
NLI = os.path.join(FIXTURES, "nli")  # small real SNLI and SICK samples
TINY = os.path.join(FIXTURES, "tiny-bert")  # a tiny BERT config and vocabulary, no weights
ROOT = os.path.dirname(HERE)
if HERE not in sys.path:
  sys.path.insert(0, HERE)


@pytest.fixture
def dies_at_batch(monkeypatch):
  """``with dies_at_batch(n, error):`` the ``n``-th batch a run asks for raises ``error``.

  It stands for a run killed part-way (``KeyboardInterrupt``, the default, is what Ctrl-C
  raises); on leaving the block the data pipeline is whole again.
  """
  from childtune_jax.app import data

  @contextlib.contextmanager
  def patch(n: int, error: type[BaseException] = KeyboardInterrupt):
    real, calls = data.make_batch, [0]

    def dying(*args, **kwargs):
      calls[0] += 1
      if calls[0] == n:
        raise error
      return real(*args, **kwargs)

    monkeypatch.setattr(data, "make_batch", dying)
    try:
      yield
    finally:
      monkeypatch.setattr(data, "make_batch", real)

  return patch


# -- a finished run, for the bad-input tests (test_bad_input.py, test_fuzz.py) --

BASE = ["train", "--task", "rte", "--model", TINY, "--data-dir", GLUE, "--epochs", "1",
        "--batch-size", "8", "--max-seq-length", "32", "--learning-rate", "1e-3",
        "--no-save-model"]


def snapshot(folder):
  """Every file under ``folder`` (hidden ones too) with the SHA-256 of its bytes."""
  out = {}
  for root, dirs, names in os.walk(folder):
    dirs.sort()
    for name in names:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    for d in dirs:
      out.setdefault(os.path.relpath(os.path.join(root, d), folder) + "/", "dir")
  return out


@pytest.fixture(scope="session")
def finished(tmp_path_factory):
  """A finished vanilla RTE run and a finished D run (templates: tests copy them; made once a
  worker)."""
  from childtune_jax.app import cli

  root = tmp_path_factory.mktemp("finished")
  for mode in ("vanilla", "D"):
    assert cli.main([*BASE, "--mode", mode, "--output-dir", str(root / mode)]) == 0
  return root


