"""Flax NNX BERT, RoBERTa and ELECTRA classifiers and their Hugging Face checkpoints."""

from childtune_jax.models.bert import (
    FAMILIES,
    ConfigError,
    EncoderConfig,
    SequenceClassifier,
)
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
    "ConfigError",
    "EncoderConfig",
    "SequenceClassifier",
    "from_pretrained",
    "load_params",
    "read_safetensors",
    "save_pretrained",
    "to_pytorch_layout",
]
