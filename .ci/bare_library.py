"""The bare library, installed alone (``pip install childtune-jax``, no extras), works.

Run by ``.ci/bare_install`` in a fresh venv holding only the wheel or sdist and its core
dependencies; each check is against an independent NumPy computation. Usage::

  python .ci/bare_library.py FIXTURES   # FIXTURES: the repository's tests/fixtures
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

# The command line's dependencies, absent here. orbax-checkpoint (flax's own dependency) and
# scipy (jax's) are installed by those packages, so the library must only never import orbax.
ABSENT = ("transformers", "datasets", "tokenizers", "sklearn", "tqdm")


def main(fixtures: str) -> None:
  present = [m for m in ABSENT if importlib.util.find_spec(m) is not None]
  assert not present, f"not a bare install: {present} present"

  import childtune_jax
  from childtune_jax import child_tuning_d, child_tuning_f, fisher_information, fisher_mask
  from childtune_jax.models import from_pretrained

  assert childtune_jax.__version__ != "0.0.0"
  params = {"w": jnp.arange(1.0, 4097.0).reshape(64, 64), "b": jnp.ones(64)}
  ones = jax.tree_util.tree_map(jnp.ones_like, params)

  # F: every kept scalar is 1/p, every other 0, and about p of them are kept.
  tx = child_tuning_f(0.5, key=0)
  out, _ = tx.update(ones, tx.init(params))
  w = np.asarray(out["w"])
  assert set(np.unique(w)) <= {0.0, 2.0} and 0.45 < (w == 2.0).mean() < 0.55

  # The Fisher of a linear least-squares loss, against NumPy's per-example squared gradients.
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(8, 5)).astype(np.float32), rng.normal(size=8).astype(np.float32)
  theta = {"v": jnp.asarray(rng.normal(size=5), jnp.float32)}

  def loss(p, batch):
    return 0.5 * jnp.mean((batch["x"] @ p["v"] - batch["y"]) ** 2)

  fisher = fisher_information(loss, theta, [{"x": x, "y": y}])
  grads = (x @ np.asarray(theta["v"]) - y)[:, None] * x  # one example's gradient, a row
  np.testing.assert_allclose(np.asarray(fisher["v"]), (grads ** 2).mean(0), rtol=1e-5)

  # D: the top 40% of the Fisher (np.percentile's set), and only they pass.
  keep = fisher_mask(fisher, 0.4)
  want = np.asarray(fisher["v"]) >= np.percentile(np.asarray(fisher["v"]), 60)
  np.testing.assert_array_equal(np.asarray(keep["v"]), want)
  tx = child_tuning_d(keep)
  out, _ = tx.update({"v": jnp.ones(5)}, tx.init(theta))
  np.testing.assert_array_equal(np.asarray(out["v"]), want.astype(np.float32))
  optax.chain(child_tuning_d(keep), optax.adamw(1e-3)).init(theta)

  # A BERT from its safetensors folder, against transformers' golden logits.
  folder = os.path.join(fixtures, "nnx", "bert")
  model, initialised = from_pretrained(folder, num_labels=3)
  with np.load(os.path.join(folder, "golden.npz")) as g:
    logits = model(jnp.asarray(g["input_ids"]), jnp.asarray(g["attention_mask"]),
                   jnp.asarray(g["token_type_ids"]))
    np.testing.assert_allclose(np.asarray(logits), g["logits"], atol=1e-5, rtol=0)
  assert initialised == []

  # The package data and the typing marker came with the install.
  root = importlib.resources.files("childtune_jax")
  assert (root / "py.typed").is_file()
  assert any(p.name.endswith(".tsv") for p in (root / "app" / "demo_data" / "SST-2").iterdir())

  # The command line names its missing extra in one line.
  run = subprocess.run([sys.executable, "-m", "childtune_jax", "demo"], capture_output=True,
                       text=True)
  assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1, run.stderr
  assert "childtune-jax[cli]" in run.stderr, run.stderr
  assert not [m for m in sys.modules if m.split(".")[0] in (*ABSENT, "orbax")]
  print(f"bare library {childtune_jax.__version__}: ok ({sys.argv[0]})")


if __name__ == "__main__":
  main(sys.argv[1])
