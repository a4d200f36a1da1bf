"""The documentation's code runs as written, and says what it shows."""

from __future__ import annotations

import contextlib
import io
import os
import re

import numpy as np

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")


def _blocks(name: str) -> list[str]:
  with open(os.path.join(DOCS, name)) as f:
    return re.findall(r"^```python\n(.*?)^```", f.read(), flags=re.S | re.M)


def test_getting_started_runs_in_order_and_its_numbers_hold():
  blocks = _blocks("getting_started.md")
  assert len(blocks) == 3
  namespace: dict = {}
  printed = []
  for block in blocks:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      exec(compile(block, "getting_started.md", "exec"), namespace)  # noqa: S102
    printed.append(out.getvalue().split())
  # D keeps the top 30% of the kernel's scalars by their Fisher, computed here by NumPy:
  # the per-example gradient of softmax cross-entropy w.r.t. the kernel is x (p - onehot).
  params, batches = namespace["params"], namespace["batches"]
  kernel, bias = (np.asarray(params["layer"][k], np.float64) for k in ("kernel", "bias"))
  total = np.zeros_like(kernel)
  n = 0
  for b in batches:
    logits = b["x"] @ kernel + bias
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    err = p - np.eye(4)[b["y"]]
    total += np.einsum("bi,bj->ij", b["x"] ** 2, err ** 2)
    n += len(b["y"])
  fisher = total / n
  expected = fisher >= np.percentile(fisher, 70)
  np.testing.assert_array_equal(np.asarray(namespace["keep"]["layer"]["kernel"]), expected)
  assert printed[1] == [str(expected.sum()), str(expected.size)]
  # The NNX loop moved exactly the child network's scalars of the kernel.
  assert printed[2] == [f"{expected.mean():.2f}"]
  moved = np.asarray(namespace["model"].layer.kernel[...] != namespace["before"])
  np.testing.assert_array_equal(moved, expected)
