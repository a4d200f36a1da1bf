"""Child-Tuning a CLIP model, offline, on real images: scikit-learn's handwritten digits.

No PyPI package ships CLIP weights that this project can use (checked: ``cinemaclip`` 32 KB,
``imgsearch`` 1.4 MB, ``all-clip`` 12 KB, ``open_clip_torch``: code only, the weights come
from a hub at run time; ``mobileclip`` is not on the index), so the example first trains a
small CLIP from scratch on part of the data, as its "pretrained" model: 8x8 digit images
paired with captions from a few templates ("a handwritten seven", ...), deliberately briefly
(50 steps), so that its zero-shot accuracy leaves room to fine-tune. Then, as one
fine-tunes a real CLIP, it turns the model into a classifier with text prompts (the logits
are the image's similarity to each class's prompt), measures it zero-shot, and fine-tunes
both towers on a small labelled split with vanilla AdamW, Child-Tuning_F (a fresh random
network of each tower's layers every step) and Child-Tuning_D (each tower's own top-p by the
per-pair contrastive Fisher, ``childtune_jax.clip``). Each method's learning rate is chosen
on a selection split; the test split is scored once per seed.

Data (1,797 images, 10 classes), split once: 1,000 to pretrain on, 200 to fine-tune on, 200
to select on, 397 to test on. The model: the library's CLIP
(:class:`childtune_jax.models.ClipModel`) at a tiny size: two 2-layer pre-LN transformers
(width 64, 4 heads, quick-GELU; images as 4 patches of 4x4 pixels plus a class token;
captions word by word, causal, pooled at the end token), projections to 32 dimensions and a
learned temperature, named as transformers' ``FlaxCLIPModel`` names its parameters, so
``childtune_jax.clip``'s predicates apply.

  python examples/clip_child_tuning.py --out results/clip [--seeds 5] [--smoke]

A real CLIP instead (no pretraining here; the 1,000 pretraining images go unused):
``--model DIR``, a local Hugging Face CLIP folder (``config.json``, ``model.safetensors``,
``tokenizer.json``), e.g. ``openai/clip-vit-base-patch32`` downloaded once where a hub is
reachable (``huggingface-cli download openai/clip-vit-base-patch32 --local-dir DIR``). It
loads into :class:`childtune_jax.models.clip.ClipModel` (no torch, any transformers), the
digits are upsampled (bicubic) to the model's image size, three channels, normalised as
CLIP's processor does, and the prompts tokenised by its ``tokenizer.json``. That path is
tested here on a tiny random CLIP folder, not run on real weights (no hub).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from childtune_jax import child_tuning_adamw, clip, default_weight_decay_mask, kept_fraction
from childtune_jax._tree import leaf_paths
from childtune_jax.app import files
from childtune_jax.models.clip import (
    ClipConfig,
    ClipModel,
    TowerConfig,
    clip_from_pretrained,
    normalise_images,
)

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = ("a photo of the digit {}", "a handwritten {}", "the number {}",
             "an image of a {}", "a drawing of the numeral {}")
PROMPT = "a photo of the digit {}"  # the classifier's prompt per class
VOCAB = ["<pad>", "<eos>"] + sorted({w for t in TEMPLATES for w in t.format("").split()}
                                     | set(NAMES))
MAX_WORDS = 8
SPLITS = {"pretrain": 1000, "train": 200, "selection": 200}  # the rest: test
LEARNING_RATES = (1e-4, 3e-4, 1e-3, 3e-3)
METHODS = ("vanilla", "F", "D")
P = {"vision": 0.3, "text": 0.3}  # each tower's child network


# ---------------------------------------------------------------------------- the model
# The library's CLIP (childtune_jax.models.ClipModel) at a tiny size: 8x8 grey images as 4
# patches of 4x4 plus a class token, captions a word a token, two 2-layer towers of width 64.
TINY = ClipConfig(
    text=TowerConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, vocab_size=len(VOCAB),
                     max_position_embeddings=MAX_WORDS, eos_token_id=VOCAB.index("<eos>")),
    vision=TowerConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, image_size=8, patch_size=4, num_channels=1),
    projection_dim=32)


def build(seed: int = 0) -> tuple[Any, Any]:
  """The tiny model's graph and its parameters (a plain pytree, named as FlaxCLIPModel's)."""
  graphdef, state = nnx.split(ClipModel(TINY, rngs=nnx.Rngs(seed)))
  return graphdef, nnx.to_pure_dict(state)


class Backbone(NamedTuple):
  """A CLIP to fine-tune: its graph, how it reads the digits and the prompts."""

  graphdef: Any
  pixels: Callable[[jax.Array], jax.Array]  # (n, 8, 8) in [0, 1] -> the model's images
  tokenize: Callable[[list[str]], tuple[np.ndarray, np.ndarray]]  # -> (ids, attention mask)
  name: str

  def embed(self, params: Any, batch: dict) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(image_embeds, text_embeds, logit_scale)`` of a batch of image-caption pairs."""
    return nnx.merge(self.graphdef, params)(batch["input_ids"], self.pixels(batch["images"]),
                                            batch["attention_mask"])


def tiny_backbone() -> Backbone:
  def tokenize(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    ids = np.stack([tokenize_words(t) for t in texts])
    return ids, (ids != 0).astype(np.int32)
  return Backbone(build()[0], lambda x: x[:, None], tokenize, "a small CLIP trained here")


def hf_backbone(folder: str) -> tuple[Backbone, Any]:
  """A local Hugging Face CLIP folder: the backbone and its parameters."""
  from tokenizers import Tokenizer

  model = clip_from_pretrained(folder)
  tokenizer = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
  tokenizer.no_padding()  # each caption as long as it is; truncated below
  tokenizer.no_truncation()
  size, length = model.config.vision.image_size, model.config.text.max_position_embeddings

  def tokenize(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    encoded = [e.ids[:length] for e in tokenizer.encode_batch(texts)]
    width = max(map(len, encoded))
    ids = np.zeros((len(texts), width), np.int32)
    for row, e in enumerate(encoded):
      ids[row, :len(e)] = e
    return ids, (np.arange(width) < np.array([len(e) for e in encoded])[:, None]).astype(np.int32)

  graphdef, state = nnx.split(model)
  return (Backbone(graphdef, lambda x: normalise_images(x, size), tokenize, folder),
          nnx.to_pure_dict(state))


# ---------------------------------------------------------------------------- the data
def tokenize_words(text: str) -> np.ndarray:
  """The tiny model's tokens: a word each, then <eos>, padded with <pad> (0)."""
  ids = [VOCAB.index(w) for w in text.split()] + [VOCAB.index("<eos>")]
  return np.array(ids + [0] * (MAX_WORDS - len(ids)), np.int32)


def load_digits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """scikit-learn's digits (real scans, bundled with the package), split once (seed 0)."""
  from sklearn.datasets import load_digits as sk_digits

  digits = sk_digits()
  images = (digits.images / 16.0).astype(np.float32)
  order = np.random.default_rng(0).permutation(len(images))
  out, start = {}, 0
  for name, n in [*SPLITS.items(), ("test", len(images) - sum(SPLITS.values()))]:
    index = order[start:start + n]
    out[name] = (images[index], digits.target[index].astype(np.int32))
    start += n
  return out


def prompts(m: Backbone) -> dict:
  """Each class's prompt, tokenised."""
  ids, mask = m.tokenize([PROMPT.format(n) for n in NAMES])
  return {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask)}


def class_logits(m: Backbone, params: Any, images: jax.Array) -> jax.Array:
  """The prompt classifier: each image's scaled cosine similarity to each class's prompt."""
  img, txt, scale = m.embed(params, {"images": images, **prompts(m)})
  img = img / jnp.linalg.norm(img, axis=-1, keepdims=True)
  txt = txt / jnp.linalg.norm(txt, axis=-1, keepdims=True)
  return jnp.exp(scale) * img @ txt.T


_class_logits = jax.jit(class_logits, static_argnums=0)


def accuracy(m: Backbone, params: Any, split: tuple[np.ndarray, np.ndarray],
             batch: int = 128) -> float:
  preds = np.concatenate([np.asarray(_class_logits(m, params, jnp.asarray(split[0][i:i + batch])))
                          .argmax(-1) for i in range(0, len(split[1]), batch)])
  return float(np.mean(preds == split[1]))


# ---------------------------------------------------------------------------- training
def pretrain(m: Backbone, data: dict, steps: int, batch: int = 64) -> Any:
  """The stand-in for a pretrained CLIP: contrastive training on captioned images."""
  _, params = build(0)
  tx = optax.adamw(1e-3, weight_decay=0.01)
  state = tx.init(params)
  images, labels = data["pretrain"]
  rng = np.random.default_rng(0)

  @jax.jit
  def step(params, state, b):
    loss, g = jax.value_and_grad(lambda p: clip.contrastive_loss(*m.embed(p, b)))(params)
    u, state = tx.update(g, state, params)
    return optax.apply_updates(params, u), state, loss

  for _ in range(steps):
    index = rng.choice(len(images), batch, replace=False)
    captions = [rng.choice(TEMPLATES).format(NAMES[y]) for y in labels[index]]
    ids, mask = m.tokenize(captions)
    b = {"images": jnp.asarray(images[index]), "input_ids": jnp.asarray(ids),
         "attention_mask": jnp.asarray(mask)}
    params, state, _ = step(params, state, b)
  return params


def d_network(m: Backbone, params: Any, data: dict) -> Any:
  """Each tower's top-p by the per-pair contrastive Fisher on the fine-tuning pairs.

  The pairs are each training image and its class's prompt, in batches of one image per
  class (the k-th of each), so that no batch holds the same caption twice.
  """
  images, labels = data["train"]
  by_class = [np.flatnonzero(labels == c) for c in range(len(NAMES))]
  batches = []
  for k in range(min(map(len, by_class))):
    index = np.array([rows[k] for rows in by_class])
    text = prompts(m)
    batches.append({"images": jnp.asarray(images[index]),
                    **{k: v[labels[index]] for k, v in text.items()}})
  return clip.tower_fisher_mask(clip.contrastive_fisher(m.embed, params, batches), P)


_STEPS: dict[tuple, Callable] = {}


def _train_step(m: Backbone, method: str, lr: float, tx: optax.GradientTransformation
                ) -> Callable:
  """The jitted step of a method at a learning rate, compiled once for all its runs: what
  differs between seeds (F's key, D's network) lives in the optimizer state."""
  if (m, method, lr) not in _STEPS:
    @jax.jit
    def step(params, state, x, y):
      def loss(p):
        return optax.softmax_cross_entropy_with_integer_labels(class_logits(m, p, x), y).mean()
      g = jax.grad(loss)(params)
      u, state = tx.update(g, state, params)
      return optax.apply_updates(params, u), state
    _STEPS[m, method, lr] = step
  return _STEPS[m, method, lr]


def finetune(m: Backbone, params: Any, data: dict, method: str, lr: float, seed: int,
             epochs: int, keep: Any = None, batch: int = 16) -> Any:
  """Cross-entropy of the prompt classifier on the labelled split, both towers trained."""
  kwargs = dict(b1=0.9, b2=0.999, eps=1e-6, weight_decay=0.01)
  if method == "vanilla":
    tx = optax.adamw(lr, mask=default_weight_decay_mask, **kwargs)
  elif method == "F":
    tx = child_tuning_adamw(lr, mode="F", reserve_p=P["vision"], key=seed,
                            where=clip.encoder_layers(), **kwargs)
  else:
    tx = child_tuning_adamw(lr, mode="D", keep=keep, **kwargs)
  tx = optax.chain(optax.clip_by_global_norm(1.0), tx)
  state = tx.init(params)
  images, labels = data["train"]
  step = _train_step(m, method, lr, tx)
  for epoch in range(epochs):
    order = np.random.default_rng([seed, epoch]).permutation(len(images))
    for i in range(0, len(order) - batch + 1, batch):
      index = order[i:i + batch]
      params, state = step(params, state, jnp.asarray(images[index]), jnp.asarray(labels[index]))
  return params


def anatomy(keep: Any) -> dict:
  """A D network's kept fraction per tower and per layer type."""
  def kind(path: str) -> str:
    for name in ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2", "layer_norm"):
      if f"/{name}" in path:
        return name
    return "other"

  out: dict[str, dict[str, list[int]]] = {}
  for path, x in zip(leaf_paths(keep), jax.tree_util.tree_leaves(keep)):
    if clip.encoder_layers()(path):
      tower = "vision" if clip.vision_tower(path) else "text"
      cell = out.setdefault(tower, {}).setdefault(kind(path), [0, 0])
      cell[0] += int(np.sum(np.asarray(x)))
      cell[1] += int(np.size(x))
  return {t: {k: v[0] / v[1] for k, v in kinds.items()} for t, kinds in out.items()}


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="results/clip")
  parser.add_argument("--seeds", type=int, default=5)
  parser.add_argument("--pretrain-steps", type=int, default=50,
                      help="deliberately few (default 50): a zero-shot model that leaves room "
                           "to fine-tune (about 86%% on the selection split)")
  parser.add_argument("--epochs", type=int, default=10)
  parser.add_argument("--model", metavar="DIR",
                      help="a local Hugging Face CLIP folder to fine-tune instead of "
                           "pretraining a small one here")
  parser.add_argument("--smoke", action="store_true", help="a few steps: checks it runs")
  args = parser.parse_args(argv)
  if args.smoke:
    args.seeds, args.pretrain_steps, args.epochs = 1, 20, 1
  data = load_digits()
  if args.model:
    m, base = hf_backbone(args.model)
    args.pretrain_steps = 0
  else:
    m = tiny_backbone()
    base = pretrain(m, data, args.pretrain_steps)
  keep = d_network(m, base, data)
  kept, total = kept_fraction(keep, where=clip.encoder_layers())
  report: dict[str, Any] = {
      "model": m.name, "data": {k: len(v[1]) for k, v in data.items()},
      "pretrain_steps": args.pretrain_steps, "epochs": args.epochs, "reserve_p": P,
      "zero_shot": {"selection": accuracy(m, base, data["selection"]),
                    "test": accuracy(m, base, data["test"])},
      "d_network": {"kept": kept, "total": total, "anatomy": anatomy(keep)},
      "methods": {}}
  grid = LEARNING_RATES[:1] if args.smoke else LEARNING_RATES
  for method in METHODS:  # the learning rate: chosen on the selection split, seed 1
    scores = {lr: accuracy(m, finetune(m, base, data, method, lr, 1, args.epochs, keep),
                           data["selection"]) for lr in grid}
    lr = max(sorted(scores), key=lambda x: scores[x])
    tests = {seed: accuracy(m, finetune(m, base, data, method, lr, seed, args.epochs, keep),
                            data["test"]) for seed in range(101, 101 + args.seeds)}
    report["methods"][method] = {"selection": {f"{k:g}": v for k, v in scores.items()},
                                 "learning_rate": lr, "test": tests}
    print(method, f"lr {lr:g}", {s: round(a, 4) for s, a in tests.items()}, flush=True)
  os.makedirs(args.out, exist_ok=True)
  files.write_json(os.path.join(args.out, "results.json"), report)
  files.write_text(os.path.join(args.out, "summary.md"), summary(report))
  plot(report, os.path.join(args.out, "anatomy.png"))
  print(summary(report))
  return report


def summary(report: dict) -> str:
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from analyze_tuned import mean_std, paired_columns

  zs = report["zero_shot"]
  lines = ["| method | lr (chosen on selection) | test accuracy mean ± std | seeds | "
           "Δ vs vanilla [95% CI] | above / below |", "|---|---:|---:|---:|---:|---:|",
           f"| zero-shot (prompts, no fine-tuning) | | {100 * zs['test']:.2f} | | | |"]
  base = report["methods"]["vanilla"]["test"]
  for method, m in report["methods"].items():
    diff, counts = paired_columns(m["test"], base) if method != "vanilla" else ("", "")
    lines.append(f"| {method} | {m['learning_rate']:g} | {mean_std(m['test'])} | "
                 f"{len(m['test'])} | {diff} | {counts} |")
  return "\n".join(lines) + "\n"


def plot(report: dict, path: str) -> None:
  try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return
  anat = report["d_network"]["anatomy"]
  kinds = sorted({k for t in anat.values() for k in t})
  fig, ax = plt.subplots(figsize=(6.5, 3.4))
  width = 0.38
  for i, tower in enumerate(sorted(anat)):
    ax.bar(np.arange(len(kinds)) + (i - 0.5) * width,
           [anat[tower].get(k, 0) for k in kinds], width, label=f"{tower} tower")
  ax.axhline(P["vision"], color="gray", lw=0.8, ls="--")
  ax.set_xticks(range(len(kinds)), kinds)
  ax.set_ylabel("kept fraction (D)")
  ax.set_title("CLIP's D child network, per tower and layer type", fontsize=10)
  ax.legend(fontsize=8)
  fig.tight_layout()
  files.save_figure(fig, path, dpi=110)
  plt.close(fig)


if __name__ == "__main__":
  main()
