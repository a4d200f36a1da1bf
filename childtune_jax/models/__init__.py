"""Flax NNX BERT, RoBERTa and ELECTRA classifiers, a CLIP, and their Hugging Face checkpoints."""

from childtune_jax.models.bert import (
    FAMILIES,
    ConfigError,
    EncoderConfig,
    SequenceClassifier,
)
from childtune_jax.models.clip import ClipConfig, ClipModel, clip_from_pretrained, save_clip
from childtune_jax.models.loading import (
    CheckpointKeyError,
    from_pretrained,
    load_params,
    read_safetensors,
    save_pretrained,
    to_pytorch_layout,
)

__all__ = [
    "FAMILIES",
    "CheckpointKeyError",
    "ClipConfig",
    "ClipModel",
    "ConfigError",
    "EncoderConfig",
    "SequenceClassifier",
    "clip_from_pretrained",
    "from_pretrained",
    "load_params",
    "read_safetensors",
    "save_clip",
    "save_pretrained",
    "to_pytorch_layout",
]
