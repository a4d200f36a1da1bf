"""Flax NNX models that read and write Hugging Face checkpoints, one folder per family.

- :mod:`~childtune_jax.models.bert`: BERT, RoBERTa and ELECTRA sequence classifiers.
- :mod:`~childtune_jax.models.clip`: CLIP (a ViT image tower, a causal text tower).
- :mod:`~childtune_jax.models.llama`: decoder LMs of the Llama kind (Llama 2/3, SmolLM,
  Qwen2), from safetensors folders or GGUF files.

Each folder keeps the module (``modeling.py``) apart from its checkpoint key table
(``params.py``); :mod:`~childtune_jax.models.checkpoint` holds what they share.
"""

from childtune_jax.models.bert import (
    FAMILIES,
    EncoderConfig,
    SequenceClassifier,
    from_pretrained,
    load_params,
    save_pretrained,
    to_pytorch_layout,
)
from childtune_jax.models.checkpoint import CheckpointKeyError, ConfigError, read_safetensors
from childtune_jax.models.clip import ClipConfig, ClipModel, clip_from_pretrained, save_clip

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
