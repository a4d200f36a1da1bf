"""childtune-jax: Child-Tuning for JAX, as optax gradient transformations.

Xu et al, "Raise a Child in Large Language Model: Towards Effective and Generalizable
Fine-tuning", EMNLP 2021 (https://arxiv.org/abs/2109.05687).
"""

from importlib import metadata as _metadata

from childtune_jax.dynamic import (
    ChildTuningDynamicState,
    DynamicAdamState,
    child_tuning_dynamic,
    child_tuning_dynamic_adamw,
    current_keep,
    dps,
    scale_by_dynamic_adam,
)
from childtune_jax.fisher import fisher_information
from childtune_jax.masks import (
    fisher_mask,
    is_encoder_layer,
    jaccard,
    kept_fraction,
    random_keep,
    shared_fisher_mask,
)
from childtune_jax.packing import pack_keep, unpack_keep
from childtune_jax.transform import (
    SAMPLERS,
    ChildTuningDState,
    ChildTuningFState,
    child_tuning_adamw,
    child_tuning_d,
    child_tuning_f,
    default_weight_decay_mask,
)

try:
  __version__ = _metadata.version("childtune-jax")
except _metadata.PackageNotFoundError:  # a checkout that is not installed
  __version__ = "0.2.0"

__all__ = [
    "SAMPLERS",
    "ChildTuningDynamicState",
    "ChildTuningDState",
    "ChildTuningFState",
    "DynamicAdamState",
    "child_tuning_adamw",
    "child_tuning_d",
    "child_tuning_dynamic",
    "child_tuning_dynamic_adamw",
    "current_keep",
    "child_tuning_f",
    "default_weight_decay_mask",
    "dps",
    "fisher_information",
    "fisher_mask",
    "is_encoder_layer",
    "jaccard",
    "kept_fraction",
    "pack_keep",
    "random_keep",
    "scale_by_dynamic_adam",
    "shared_fisher_mask",
    "unpack_keep",
]
