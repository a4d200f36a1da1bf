"""CLIP: ``modeling`` (the NNX model), ``params`` (its Hugging Face checkpoints), ``images``."""

from childtune_jax.models.clip.images import normalise_images
from childtune_jax.models.clip.modeling import ClipConfig, ClipModel, TowerConfig
from childtune_jax.models.clip.params import (
    clip_from_pretrained,
    clip_to_pytorch_layout,
    load_clip_params,
    save_clip,
)

__all__ = ["ClipConfig", "ClipModel", "TowerConfig", "clip_from_pretrained",
           "clip_to_pytorch_layout", "load_clip_params", "normalise_images", "save_clip"]
