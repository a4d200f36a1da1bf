"""The mode registry: what each ``--mode`` is, in one entry.

An entry (:class:`Mode`) holds everything the application knows of a mode: which commands
offer it, whose of the authors' per-task p it takes, the options only it takes and their
checks, how it builds its optimizer (:attr:`Mode.optimizer`) and a fixed child network
(:attr:`Mode.network`), and what it records while it trains (:attr:`Mode.tracker`).
``train``, ``multitask`` and the command line read :data:`MODES`; a new mode is one entry
here and its tests.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

import jax
import jax.numpy as jnp
import optax

from childtune_jax import _tree, baselines
from childtune_jax.app import config
from childtune_jax.app.errors import UsageError
from childtune_jax.dynamic import (
    ChildTuningDynamicState,
    DynamicAdamState,
    child_tuning_dynamic,
    child_tuning_dynamic_adamw,
)
from childtune_jax.masks import jaccard
from childtune_jax.transform import child_tuning_adamw, default_weight_decay_mask

if TYPE_CHECKING:
  from childtune_jax.app.steps import Plan, Run, TrainState

logger = logging.getLogger("childtune")


@dataclasses.dataclass(frozen=True)
class Optimizing:
  """What a mode's optimizer is built from.

  Attributes:
    run: the seed's run (its config, and the results a mode may record into).
    plan: the run's steps.
    schedule: the learning rate schedule (warmup, then linear decay).
    adamw: AdamW's arguments (``b1``, ``b2``, ``eps``, ``weight_decay``).
    keep: the fixed child network, for a mode with a :attr:`Mode.network`.
    params: the parameters (their shapes and paths).
  """

  run: Run
  plan: Plan
  schedule: optax.Schedule
  adamw: dict[str, Any]
  keep: Any
  params: Any


@dataclasses.dataclass(frozen=True)
class Adapter:
  """A mode that trains other parameters than the model's own (LoRA's adapters).

  Attributes:
    init: ``init(params) -> trainable``, the run's tree of parameters from the model's.
    merge: ``merge(trainable) -> params``, the model's parameters again (traceable: inside
      the loss, every step).
  """

  init: Callable[[Any], Any]
  merge: Callable[[Any], Any]


@dataclasses.dataclass(frozen=True)
class Mode:
  """One ``--mode``.

  Attributes:
    name: as ``--mode`` spells it.
    help: what it is, in a few words (``--help`` lists them).
    commands: the commands that offer it.
    p_of: whose of the authors' per-task p it takes (``"F"`` or ``"D"``; ``None``: it
      has no child network, and ``reserve_p`` is not part of its experiment).
    options: the config fields only this mode takes (given with another mode, refused).
    optimizer: ``optimizer(Optimizing) -> GradientTransformation``, AdamW with the mode's
      masking (global-norm clipping and accumulation are put around it for every mode).
    network: ``network(run, source) -> (keep, reserve_p)`` for a mode that trains a fixed
      child network: built from the :class:`NetworkSource` of the command (a Fisher pass,
      a random draw); ``reserve_p`` is the fraction saved with it (``None``: sized
      otherwise). A resumed run's own file or ``--child-mask`` stand in for it.
    check: ``check(args)``: its options' checks, before anything is written.
    check_steps: ``check_steps(args, optimizer_steps)``: the checks that need the run's
      length.
    tracker: ``tracker(run, state) -> after_step(step)``: what it records while it trains
      (in ``state.history``), and ``finish_record(run, state)`` closes it in the results.
    adapter: ``adapter(run) -> Adapter`` for a mode that trains parameters of its own.
    step_metrics: ``step_metrics(run) -> measure``; ``measure(state, new_state, grads)``
      (inside the jitted step) gives what the mode streams of each step (its
      ``kept_fraction``).
  """

  name: str
  help: str
  commands: tuple[str, ...]
  p_of: Literal["F", "D"] | None
  optimizer: Callable[[Optimizing], optax.GradientTransformation]
  options: tuple[str, ...] = ()
  network: Callable[[Run, Any], tuple[Any, float | None]] | None = None
  check: Callable[[argparse.Namespace], None] | None = None
  check_steps: Callable[[argparse.Namespace, int], None] | None = None
  tracker: Callable[[Run, TrainState], Callable[[int], None]] | None = None
  finish_record: Callable[[Run, TrainState], None] | None = None
  adapter: Callable[[Run], Adapter] | None = None
  step_metrics: Callable[[Run], Callable[[Any, Any, Any], dict]] | None = None


# -- optimizers -----------------------------------------------------------------------------


def _vanilla(o: Optimizing) -> optax.GradientTransformation:
  return optax.adamw(o.schedule, mask=default_weight_decay_mask, **o.adamw)


def _f(o: Optimizing) -> optax.GradientTransformation:
  from childtune_jax.app.steps import stream_key

  cfg = o.run.cfg
  return child_tuning_adamw(o.schedule, mode="F", reserve_p=cfg.reserve_p,
                            key=stream_key(cfg.seed, "child"), sampler=cfg.sampler,
                            freeze_non_child=cfg.freeze_non_child, **o.adamw)


def _fixed(o: Optimizing) -> optax.GradientTransformation:
  return child_tuning_adamw(o.schedule, mode="D", keep=o.keep, packing="uint8",
                            freeze_non_child=o.run.cfg.freeze_non_child, **o.adamw)


def dynamic_schedule(cfg: Any, optimizer_steps: int) -> tuple[int, int]:
  """``(every, full_stage)`` of a dynamic run: by default DPS's 5% of the steps, both."""
  every = cfg.every or max(1, round(0.05 * optimizer_steps))
  return every, every if cfg.full_stage is None else cfg.full_stage


def _dynamic(o: Optimizing) -> optax.GradientTransformation:
  cfg = o.run.cfg
  every, full_stage = dynamic_schedule(cfg, o.plan.optimizer_steps)
  o.run.results["child_network"] = {
      "every": every, "full_stage": full_stage, "reserve_p": cfg.reserve_p,
      "score": cfg.dynamic_score,
      "score_decay": cfg.score_decay if cfg.dynamic_score == "ema" else o.adamw["b2"],
      "total": sum(x.size for x, take in zip(jax.tree_util.tree_leaves(o.params),
                                             _tree.resolve_where(o.run.scope, o.params))
                   if take)}
  if cfg.dynamic_score == "adam":
    return child_tuning_dynamic_adamw(o.schedule, cfg.reserve_p, every=every,
                                      full_stage=full_stage, mask=default_weight_decay_mask,
                                      where=o.run.scope, **o.adamw)
  return optax.chain(
      child_tuning_dynamic(cfg.reserve_p, every=every, full_stage=full_stage,
                           decay=cfg.score_decay, where=o.run.scope),
      optax.adamw(o.schedule, mask=default_weight_decay_mask, **o.adamw))


def _lora(o: Optimizing) -> optax.GradientTransformation:
  """AdamW on the adapters; the pretrained parameters, frozen, keep no optimizer state."""
  def labels(params: Any) -> Any:
    return {"base": jax.tree_util.tree_map(lambda _: "frozen", params["base"]),
            "lora": jax.tree_util.tree_map(lambda _: "adapters", params["lora"])}

  adamw = optax.adamw(o.schedule, mask=default_weight_decay_mask, **o.adamw)
  return optax.multi_transform({"adapters": adamw, "frozen": optax.set_to_zero()}, labels)


def _lora_adapter(r: Run) -> Adapter:
  from childtune_jax.app.steps import stream_key

  cfg = r.cfg
  alpha = cfg.lora_alpha or 2.0 * cfg.lora_rank
  key = stream_key(cfg.seed, "child")

  def init(params: Any) -> Any:
    adapters = baselines.lora_adapters(key, params, cfg.lora_rank)
    r.results["lora"] = {"rank": cfg.lora_rank, "alpha": alpha, "matrices": len(adapters),
                         "trainable": sum(x.size for x in jax.tree_util.tree_leaves(adapters))}
    return {"base": params, "lora": adapters}

  return Adapter(init, lambda tree: baselines.apply_lora(tree["base"], tree["lora"],
                                                         alpha / cfg.lora_rank))


def _hft(o: Optimizing) -> optax.GradientTransformation:
  """AdamW between two copies of the same half-freezing mask: the frozen half gets neither
  a gradient nor an update (not even weight decay), the other half trains."""
  from childtune_jax.app.steps import stream_key

  cfg = o.run.cfg
  every = cfg.hft_every or max(1, o.plan.steps_per_epoch // cfg.grad_accum)
  o.run.results["hft"] = {"every": every, "stages": -(-o.plan.optimizer_steps // every)}

  def freeze() -> optax.GradientTransformation:
    return baselines.half_fine_tuning(stream_key(cfg.seed, "child"), every=every)

  return optax.chain(freeze(), optax.adamw(o.schedule, mask=default_weight_decay_mask,
                                           **o.adamw), freeze())


def _f_kept(r: Run) -> Callable[[Any, Any, Any], dict]:
  """The fraction of the scalars F's mask kept at a step: its mask redrawn from its state
  (a pure function of the key and the step) and counted."""
  from childtune_jax.app.steps import stream_key
  from childtune_jax.transform import ChildTuningFState, child_tuning_f

  cfg = r.cfg
  f = child_tuning_f(cfg.reserve_p, stream_key(cfg.seed, "child"), sampler=cfg.sampler)

  def measure(state: Any, new_state: Any, grads: Any) -> dict:
    del new_state
    found = [x for x in jax.tree_util.tree_leaves(
        state, is_leaf=lambda x: isinstance(x, ChildTuningFState))
        if isinstance(x, ChildTuningFState)]
    ones = jax.tree_util.tree_map(jnp.ones_like, grads)
    masked, _ = f.update(ones, found[0])
    leaves = jax.tree_util.tree_leaves(masked)
    kept = sum(jnp.sum(x != 0, dtype=jnp.float32) for x in leaves)
    return {"kept_fraction": kept / sum(x.size for x in leaves)}

  return measure


def _dynamic_kept(r: Run) -> Callable[[Any, Any, Any], dict]:
  """The fraction of the selected scalars in the dynamic network after the step."""
  def measure(state: Any, new_state: Any, grads: Any) -> dict:
    del state
    keep = dynamic_state(new_state).keep
    flags = _tree.resolve_where(r.scope, grads)
    words = jax.tree_util.tree_leaves(keep, is_leaf=lambda x: isinstance(x, optax.MaskedNode))
    total = sum(g.size for g, take in zip(jax.tree_util.tree_leaves(grads), flags) if take)
    kept = sum(jnp.sum(jax.lax.population_count(k).astype(jnp.float32)) for k in words
               if not isinstance(k, optax.MaskedNode))
    return {"kept_fraction": kept / total}

  return measure


# -- fixed networks -------------------------------------------------------------------------


class NetworkSource:
  """Where a command's fixed child networks come from: its Fisher passes and random draws.

  ``train`` and ``multitask`` each provide one: the Fisher information of the training
  data (pooled over the tasks in a multi-task run), each task's own, and a random network.
  """

  def fisher_mask(self, reserve_p: float) -> Any:
    """The top ``reserve_p`` of the training data's Fisher information (D)."""
    raise NotImplementedError

  def shared_mask(self, reserve_p: float, combine: str) -> Any:
    """One network from each task's Fisher information (shared-D)."""
    raise UsageError("shared-D needs several tasks: use childtune multitask")

  def random_mask(self, reserve_p: float, like_d: str | None) -> tuple[Any, float | None]:
    """A uniformly random network: ``reserve_p`` of the scalars, or as many as the D mask
    file ``like_d`` keeps; and the fraction it records (``None`` for a count)."""
    raise NotImplementedError


def _d_network(r: Run, source: NetworkSource) -> tuple[Any, float | None]:
  return source.fisher_mask(r.cfg.reserve_p), r.cfg.reserve_p


def _shared_network(r: Run, source: NetworkSource) -> tuple[Any, float | None]:
  return source.shared_mask(r.cfg.reserve_p, r.cfg.combine), r.cfg.reserve_p


def _random_network(r: Run, source: NetworkSource) -> tuple[Any, float | None]:
  from childtune_jax.app import files

  return source.random_mask(r.cfg.reserve_p, files.for_seed(r.cfg.random_like, r.cfg.seed))


# -- checks ---------------------------------------------------------------------------------


def _check_f(args: argparse.Namespace) -> None:
  sampler = args.sampler or "hash8"
  if sampler != "bernoulli":
    levels = 2**16 if sampler == "uint16" else 2**8
    if round(args.reserve_p * levels) < 1:
      raise UsageError(f"--reserve-p {args.reserve_p} rounds to 0 with --sampler {sampler} "
                       f"(at least {1 / levels:g}); use --sampler bernoulli")


def _check_dynamic(args: argparse.Namespace) -> None:
  if args.score == "adam" and args.score_decay is not None:
    raise UsageError("--score-decay goes with --score ema (--score adam ranks by AdamW's "
                     "second moment, whose decay is 0.999)")


def _check_dynamic_steps(args: argparse.Namespace, steps: int) -> None:
  _, full_stage = dynamic_schedule(args, steps)
  if full_stage >= steps:
    given = ("--full-stage" if args.full_stage is not None
             else "--every (the default --full-stage)")
    raise UsageError(f"{given} {full_stage} is not shorter than the run's {steps} optimizer "
                     "steps: the network would never be selected (a vanilla run)")


# -- what the dynamic network records -------------------------------------------------------


def dynamic_state(opt_state: Any) -> ChildTuningDynamicState | DynamicAdamState:
  """The dynamic child network's state inside an optimizer state."""
  kinds = (ChildTuningDynamicState, DynamicAdamState)
  found = [x for x in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, kinds))
           if isinstance(x, kinds)]
  if len(found) != 1:
    raise ValueError(f"expected one dynamic child network in the optimizer state, got {len(found)}")
  return found[0]


def _network_change(network: dict, opt_state: Any, step: int) -> dict:
  """The size of the dynamic network just selected, and its Jaccard with the one before."""
  keep = dynamic_state(opt_state).keep
  words = jax.tree_util.tree_leaves(keep)
  kept = sum(int(jnp.sum(jax.lax.population_count(w).astype(jnp.uint32))) for w in words)
  previous, network["previous"] = network["previous"], jax.tree_util.tree_map(jnp.copy, keep)
  return {"step": step, "kept": kept, "jaccard_previous": jaccard(keep, previous)}


def _dynamic_tracker(r: Run, state: TrainState) -> Callable[[int], None]:
  """After each optimizer step that selected a network, its size and its change."""
  from childtune_jax.app.steps import write_history

  info = r.results["child_network"]
  network = {"every": info["every"], "full_stage": info["full_stage"],
             "previous": jax.tree_util.tree_map(jnp.copy, dynamic_state(state.opt_state).keep)}
  accum = r.cfg.grad_accum

  def after_step(step: int) -> None:
    t_opt = step // accum - 1  # the optimizer step just taken, if any
    if step % accum == 0 and t_opt >= network["full_stage"] \
        and (t_opt - network["full_stage"]) % network["every"] == 0:
      state.history["networks"].append(_network_change(network, state.opt_state, t_opt))
      write_history(r, state)

  return after_step


def _dynamic_finish(r: Run, state: TrainState) -> None:
  r.results["child_network"]["selections"] = state.history["networks"]


# -- the registry ---------------------------------------------------------------------------

_FIXED_OPTIONS = ("freeze_non_child",)
MODES: dict[str, Mode] = {m.name: m for m in (
    Mode("vanilla", "vanilla AdamW", ("train", "multitask", "sft"), None, _vanilla),
    Mode("F", "Child-Tuning_F: a fresh Bernoulli(p) mask every step",
         ("train", "multitask", "sft"), "F", _f, options=("sampler", "freeze_non_child"),
         check=_check_f, step_metrics=_f_kept),
    Mode("D", "Child-Tuning_D: the top p by Fisher information, fixed",
         ("train", "multitask", "sft"), "D", _fixed,
         options=("fisher", "fisher_microbatch", "fisher_samples", "child_mask",
                  *_FIXED_OPTIONS), network=_d_network),
    Mode("random", "D's size with a random child network (the paper's control)", ("train",),
         "D", _fixed, options=("random_like", *_FIXED_OPTIONS), network=_random_network),
    Mode("dynamic", "a dynamic child network, re-selected during training", ("train", "sft"),
         "D", _dynamic, options=("every", "full_stage", "dynamic_score", "score_decay"),
         check=_check_dynamic, check_steps=_check_dynamic_steps, tracker=_dynamic_tracker,
         finish_record=_dynamic_finish, step_metrics=_dynamic_kept),
    Mode("lora", "LoRA: low-rank adapters on the attention and MLP matrices, the rest frozen",
         ("sft",), None, _lora, options=("lora_rank", "lora_alpha"), adapter=_lora_adapter),
    Mode("hft", "Half Fine-Tuning: a random half of the matrices frozen, re-drawn each stage",
         ("sft",), None, _hft, options=("hft_every",)),
    Mode("shared-D", "one child network from each task's Fisher, combined by --combine",
         ("multitask",), "D", _fixed,
         options=("fisher", "fisher_microbatch", "child_mask", "combine", *_FIXED_OPTIONS),
         network=_shared_network),
)}


def for_command(command: str) -> dict[str, Mode]:
  """The modes ``command`` offers, in registry order."""
  return {name: m for name, m in MODES.items() if command in m.commands}


def owners(option: str, command: str) -> list[str]:
  """The modes of ``command`` that take ``option`` (a config field); ``[]``: every mode."""
  return [m.name for m in for_command(command).values() if option in m.options]


def check_options(args: argparse.Namespace, cls: type, command: str) -> None:
  """Refuses an option given with a mode that does not take it."""
  wrong: dict[tuple[str, ...], list[str]] = {}
  for f, fl in config.flags(cls):
    takers = owners(f.name, command)
    if takers and args.mode not in takers and config.given(args, fl):
      wrong.setdefault(tuple(takers), []).append(fl.name)
  for takers, names in wrong.items():
    listed = " or ".join([", ".join(takers[:-1]), takers[-1]] if len(takers) > 1 else takers)
    raise UsageError(f"{', '.join(names)} {'go' if len(names) > 1 else 'goes'} with --mode "
                     f"{listed}")


def check_mode(args: argparse.Namespace) -> None:
  """The mode's own checks of its options (once the presets have filled the defaults)."""
  mode = MODES[args.mode]
  if mode.check:
    mode.check(args)


def check_steps(args: argparse.Namespace, batches_per_epoch: int) -> None:
  """The checks that need the run's length: accumulation, and the mode's own."""
  micro_steps = batches_per_epoch * args.epochs
  if micro_steps < args.grad_accum:
    raise UsageError(f"--grad-accum {args.grad_accum} is more than the run's {micro_steps} "
                     "batches: it would take no optimizer step")
  left = micro_steps % args.grad_accum
  if left:
    logger.warning("--grad-accum %d: the last %d of the run's %d batches make no optimizer "
                   "step", args.grad_accum, left, micro_steps)
  steps = micro_steps // args.grad_accum  # the optimizer steps that are taken
  mode = MODES[args.mode]
  if mode.check_steps:
    mode.check_steps(args, steps)


__all__ = ["MODES", "Mode", "NetworkSource", "Optimizing", "check_mode", "check_options",
           "check_steps",
           "dynamic_schedule", "dynamic_state", "for_command", "owners"]
