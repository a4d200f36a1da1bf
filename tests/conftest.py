"""Fixtures shared by the test modules."""

import contextlib

import pytest


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
