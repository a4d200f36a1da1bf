"""Checks made before a command writes anything: the model, the output and cache folders,
the devices; and JAX's persistent compilation cache."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
from collections.abc import Iterator

import jax
from jax.experimental.compilation_cache import compilation_cache as jax_cache

from childtune_jax import parallel
from childtune_jax.app.classifier import (
    ModelError,
    load_tokenizer,
    looks_like_path,
    require_hf_flax,
    resolve_model_path,
)
from childtune_jax.app.errors import UsageError
from childtune_jax.models import FAMILIES
from childtune_jax.models.checkpoint import CheckpointKeyError, check_safetensors

logger = logging.getLogger("childtune")


def check_model(name: str, max_seq_length: int, backend: str = "nnx") -> None:
  """Fails early, before anything is written, on a model that cannot be found or used."""
  path = resolve_model_path(name)
  if os.path.isfile(path):
    raise ModelError(f"--model {path} is a file; pass the model's folder")
  if os.path.isdir(path):
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
      raise ModelError(f"model folder {path} has no config.json")
    try:
      with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ModelError(f"cannot read {config_path}: {e}") from None
    if not isinstance(config, dict):
      raise ModelError(f"{config_path} is not a JSON object")
    supported = FAMILIES
    if backend == "hf-flax":  # transformers < 5 only
      require_hf_flax()
      from transformers.models.auto.modeling_flax_auto import (
          FLAX_MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES as supported,
      )

    kind = config.get("model_type")
    if kind not in supported:
      raise ModelError(f"{config_path}: model_type {kind!r} has no Flax sequence classifier "
                       f"(supported: {', '.join(sorted(supported))})")
    positions = config.get("max_position_embeddings")
    if isinstance(positions, int):
      if kind in ("roberta", "xlm-roberta", "camembert"):  # position ids start after padding
        positions -= config.get("pad_token_id", 1) + 1
      if max_seq_length > positions:
        raise ModelError(f"--max-seq-length {max_seq_length} exceeds the {positions} positions "
                         f"of the model in {path}")
    try:
      check_safetensors(path)
    except CheckpointKeyError as e:
      raise ModelError(str(e)) from None
    try:
      load_tokenizer(path)
    except ModelError:
      raise
    except Exception as e:  # noqa: BLE001 - missing or broken tokenizer files
      first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise ModelError(f"cannot load the tokenizer in {path}: {first}") from None
    return
  if looks_like_path(path):
    raise ModelError(f"model path {path} does not exist")
  try:
    from huggingface_hub import hf_hub_download  # with a network only

    hf_hub_download(path, "config.json")
  except Exception:  # noqa: BLE001 - no network, or no such model
    raise ModelError(
        f"cannot reach the Hugging Face hub for {path!r} (no network?); "
        "pass a local model folder with --model DIR") from None


def writable(out: str, option: str = "--output-dir") -> None:
  """Fails early on an output folder that cannot be created or written."""
  parent = out
  while not os.path.exists(parent):
    parent = os.path.dirname(os.path.abspath(parent))
  if not os.path.isdir(parent):
    raise UsageError(f"{option} {out}: {parent} is a file")
  if not os.access(parent, os.W_OK | os.X_OK):
    raise UsageError(f"{option} {out}: {parent} is not writable")


def writable_file(path: str, option: str) -> None:
  """Fails early on an output file that is a folder, or whose folder cannot be written."""
  if os.path.isdir(path):
    raise UsageError(f"{option} {path} is a folder; give a file name")
  writable(os.path.dirname(os.path.abspath(path)), option)


def default_cache_dir() -> str:
  """``$JAX_COMPILATION_CACHE_DIR``, else ``childtune-jax/xla`` in the user's cache folder."""
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return os.environ["JAX_COMPILATION_CACHE_DIR"]
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "childtune-jax", "xla")


@contextlib.contextmanager
def compilation_cache(path: str | None) -> Iterator[None]:
  """JAX's persistent compilation cache in ``path`` while the block runs (``None``: as set)."""
  if path is None:
    yield
    return
  os.makedirs(path, exist_ok=True)
  previous = jax.config.jax_compilation_cache_dir
  jax_cache.reset_cache()  # JAX reads the setting once, at its first compile
  jax.config.update("jax_compilation_cache_dir", os.path.abspath(path))
  try:
    yield
  finally:
    jax.config.update("jax_compilation_cache_dir", previous)
    jax_cache.reset_cache()


def check_run_options(args: argparse.Namespace) -> str | None:
  """The checks every training command makes first (the selection split, the mesh and
  batch, the output folder, the seeds, the cache); returns the compilation cache to use."""
  if args.selection_only and not args.selection_samples:
    raise UsageError("--selection-only needs --selection-samples N")
  try:
    mesh = parallel.parse_mesh(args.mesh, jax.device_count())
    parallel.check_batch(mesh, args.batch_size, "--batch-size")
  except parallel.MeshError as e:
    raise UsageError(str(e)) from None
  out = args.output_dir
  if os.path.islink(out) and not os.path.exists(out):
    raise UsageError(f"--output-dir {out} is a symbolic link to {os.readlink(out)}, "
                     "which does not exist")
  if os.path.exists(out) and not os.path.isdir(out):
    raise UsageError(f"--output-dir {out} is a file")
  writable(out)
  if len(set(args.seeds)) != len(args.seeds):
    twice = sorted({s for s in args.seeds if args.seeds.count(s) > 1})
    raise UsageError(f"--seeds names seed {twice[0]} more than once")
  cache = getattr(args, "compilation_cache", None)
  if cache:
    writable(cache, "--compilation-cache")
  elif cache is None:  # on by default, where it can be written
    cache = default_cache_dir()
    try:
      writable(cache, "--compilation-cache")
    except UsageError:
      logger.info("no compilation cache: %s is not writable", cache)
      cache = None
  else:
    cache = None  # '': off
  return cache
