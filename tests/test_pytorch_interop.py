"""Models fine-tuned here load in transformers' PyTorch classes and give the same outputs.

PyTorch's implementation is the independent reference. These tests need ``torch`` and
``transformers`` (any version; 5.x has no Flax classes), which the suite does not install:
they are skipped without torch. To run them::

  pip install -e '.[test]' torch 'transformers>=5' && pytest tests/test_pytorch_interop.py
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import GLUE, HERE, TINY
from flax import nnx

from childtune_jax.app import cli, data, tasks
from childtune_jax.models import from_pretrained, save_pretrained

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

NNX = os.path.join(HERE, "fixtures", "nnx")


def _loaded_whole(loaded):
  """A ``from_pretrained(..., output_loading_info=True)``'s model, every weight from the file:
  none missing, unexpected or resized."""
  model, info = loaded
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
  return model.eval()


def _torch_model(folder):
  return _loaded_whole(transformers.AutoModelForSequenceClassification.from_pretrained(
      folder, output_loading_info=True))


def _move_every_parameter(model, seed):
  """Moves every parameter off the checkpoint (as fine-tuning does), head included."""
  leaves, treedef = jax.tree_util.tree_flatten(nnx.state(model, nnx.Param))
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  nnx.update(model, jax.tree_util.tree_unflatten(
      treedef, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]))


def _torch_logits(model, ids, mask, types):
  with torch.no_grad():
    return model(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                 token_type_ids=torch.as_tensor(types)).logits.numpy()


@pytest.mark.parametrize("family", ("bert", "roberta", "electra"))
def test_a_saved_model_gives_pytorchs_logits(family, tmp_path):
  model, _ = from_pretrained(os.path.join(NNX, family), num_labels=3)
  _move_every_parameter(model, 0)
  save_pretrained(model, str(tmp_path))

  with np.load(os.path.join(NNX, family, "golden.npz")) as f:
    g = dict(f)
  ours = np.asarray(model(jnp.asarray(g["input_ids"]), jnp.asarray(g["attention_mask"]),
                          jnp.asarray(g["token_type_ids"])))
  theirs = _torch_logits(_torch_model(str(tmp_path)), g["input_ids"], g["attention_mask"],
                         g["token_type_ids"])
  np.testing.assert_allclose(theirs, ours, atol=1e-5, rtol=0)
  assert not np.allclose(ours, g["logits"], atol=1e-3)  # the perturbation did reach the logits


def test_the_clis_saved_model_serves_in_pytorch(tmp_path):
  out = str(tmp_path / "run")
  assert cli.main(["train", "--task", "sst2", "--mode", "D", "--model", TINY, "--data-dir", GLUE,
                   "--epochs", "1", "--batch-size", "8", "--max-seq-length", "32",
                   "--learning-rate", "1e-3", "--output-dir", out]) == 0
  folder = os.path.join(out, "seed-42", "model")
  torch_model = _torch_model(folder)
  tok = transformers.AutoTokenizer.from_pretrained(folder)
  dev = data.read_glue_tsv(tasks.TASKS["sst2"], os.path.join(GLUE, "SST-2", "dev.tsv"))
  # PyTorch, one sentence at a time, scores the dev set as the CLI reported it ...
  correct = 0
  for text, label in zip(dev.texts[0], dev.labels):
    enc = tok([text], truncation=True, max_length=32, return_tensors="np")
    logits = _torch_logits(torch_model, enc["input_ids"], enc["attention_mask"],
                           enc["token_type_ids"])
    correct += int(np.argmax(logits[0]) == label)
  with open(os.path.join(out, "seed-42", "results.json")) as f:
    assert json.load(f)["metrics"]["dev"]["accuracy"] == pytest.approx(correct / len(dev))
  # ... and its logits of a padded batch are ours.
  enc = tok(list(dev.texts[0]), truncation=True, max_length=32, padding=True, return_tensors="np")
  ours, _ = from_pretrained(folder, num_labels=2)
  expected = np.asarray(ours(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]))
  theirs = _torch_logits(torch_model, enc["input_ids"], enc["attention_mask"],
                         enc["token_type_ids"])
  np.testing.assert_allclose(theirs, expected, atol=1e-5, rtol=0)


def test_a_saved_clip_gives_pytorchs_features(tmp_path):
  from childtune_jax.models.clip import clip_from_pretrained, save_clip

  folder = os.path.join(HERE, "fixtures", "clip")
  model = clip_from_pretrained(folder)
  _move_every_parameter(model, 1)
  with open(os.path.join(folder, "config.json")) as f:
    save_clip(model, str(tmp_path), json.load(f))
  theirs = _loaded_whole(transformers.CLIPModel.from_pretrained(str(tmp_path),
                                                                 output_loading_info=True))
  with np.load(os.path.join(folder, "golden.npz")) as f:
    g = dict(f)
  image, text, scale = model(g["input_ids"], g["pixel_values"], g["attention_mask"])
  with torch.no_grad():
    t_image = theirs.get_image_features(pixel_values=torch.as_tensor(g["pixel_values"]))
    t_text = theirs.get_text_features(input_ids=torch.as_tensor(g["input_ids"]),
                                      attention_mask=torch.as_tensor(g["attention_mask"]))
  t_image, t_text = (getattr(x, "pooler_output", x).numpy() for x in (t_image, t_text))
  np.testing.assert_allclose(t_image, np.asarray(image), atol=1e-5, rtol=0)
  np.testing.assert_allclose(t_text, np.asarray(text), atol=1e-5, rtol=0)
  np.testing.assert_allclose(theirs.logit_scale.item(), float(scale), rtol=1e-6)
  assert not np.allclose(np.asarray(image), g["image_features"], atol=1e-3)  # it did move
