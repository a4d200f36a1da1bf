"""Child-Tuning inside Tunix's ``PeftTrainer`` (``examples/tunix_sft.py``), on a tiny random
Tunix ``Llama3``; skipped where ``google-tunix`` is not installed (CI installs it for this
file alone: ``.ci/run``).

Tunix's model is checked against ours on the same weights (its RoPE theta bound by the
example's workaround: without it, the logits differ), and F and D are checked as the
optimizer of ``PeftTrainer``: D trains its network only, and the step compiles once.
"""

import functools
import importlib.util
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import ROOT
from flax import nnx

pytest.importorskip("tunix")

sys.path.insert(0, os.path.join(ROOT, "examples"))
import tunix_sft  # noqa: E402

from childtune_jax import child_tuning_d, child_tuning_f, fisher_mask  # noqa: E402
from childtune_jax.models import llama  # noqa: E402

PAD = 0


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """A tiny random Llama (no rope scaling, tied, theta 1e5) in Hugging Face's layout."""
  cfg = llama.DecoderConfig(model_type="llama", vocab_size=64, hidden_size=32,
                            intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=8, rope_theta=1e5,
                            rms_norm_eps=1e-5, tie_word_embeddings=True,
                            max_position_embeddings=64)
  path = tmp_path_factory.mktemp("tiny") / "model"
  model = llama.CausalLM(cfg, rngs=nnx.Rngs(0))
  for proj in (model.layers.self_attn.q_proj, model.layers.self_attn.k_proj):
    proj.kernel[...] = proj.kernel[...] * 30  # sharp attention: the rotation shows
  llama.save_pretrained(model, str(path))
  return str(path)


def _batches(n=4, rows=2, length=12):
  rng = np.random.default_rng(0)
  out = []
  for _ in range(n):
    ids = rng.integers(1, 64, size=(rows, length)).astype(np.int32)
    ids[1, 9:] = PAD
    mask = np.zeros_like(ids)
    mask[:, 5:8] = 1
    out.append({"input_tokens": ids, "input_mask": mask})
  return out


def _tunix_logits(model, ids):
  from tunix.sft import utils

  real = ids != PAD
  logits, _ = model(jnp.asarray(ids), utils.build_positions_from_mask(real), None,
                    utils.make_causal_attn_mask(real))
  return np.asarray(logits)


def test_tunix_llama_equals_ours_once_its_rope_theta_is_bound(folder):
  ours = llama.from_folder(folder)
  tunix_model, cfg = tunix_sft.load_tunix(folder)
  ids = _batches()[0]["input_tokens"][:1]  # a row without padding
  want = np.asarray(ours(jnp.asarray(ids)))
  with tunix_sft.rope_theta(cfg.rope_theta):
    np.testing.assert_allclose(_tunix_logits(tunix_model, ids), want, atol=2e-5, rtol=1e-4)
  assert not np.allclose(_tunix_logits(tunix_model, ids), want, atol=1e-3)  # theta 1e6


@pytest.mark.parametrize("mode", ["F", "D"])
def test_child_tuning_is_the_optimizer_of_peft_trainer(folder, mode):
  model, cfg = tunix_sft.load_tunix(folder)
  start = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  batches = _batches()
  with tunix_sft.rope_theta(cfg.rope_theta):
    if mode == "F":
      tx = optax.chain(child_tuning_f(0.3, key=0), optax.adamw(1e-2, weight_decay=0.0))
      keep = None
    else:
      from childtune_jax import decoder

      nll = functools.partial(tunix_sft.response_nll, pad_id=PAD)
      fisher = decoder.nnx_fisher_information(model, nll, batches[:2], microbatch_size=1)
      keep = fisher_mask(fisher, 0.3)
      tx = optax.chain(child_tuning_d(keep), optax.adamw(1e-2, weight_decay=0.0))
    before = float(tunix_sft.response_nll(model, batches[0], PAD))
    trainer = tunix_sft.train(model, tx, batches, 4, PAD)
    after = float(tunix_sft.response_nll(model, batches[0], PAD))
  assert after < before
  assert trainer._jitted_train_step_fn.func.jitted_fn._cache_size() == 1  # compiled once
  end = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  moved = [np.asarray(a) != np.asarray(b) for a, b in
           zip(jax.tree_util.tree_leaves(end), jax.tree_util.tree_leaves(start))]
  assert any(m.any() for m in moved)
  if keep is not None:  # only D's network moves (no weight decay, masked before Adam)
    kept = jax.tree_util.tree_leaves(nnx.to_pure_dict(keep))
    assert all(not np.any(m & ~np.asarray(k)) for m, k in zip(moved, kept))
  assert importlib.util.find_spec("tunix") is not None
