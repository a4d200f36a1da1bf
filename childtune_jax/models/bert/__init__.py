"""The BERT family (BERT, RoBERTa, ELECTRA): ``modeling`` (the NNX classifier) and ``params``
(its Hugging Face key table, load and save)."""

from childtune_jax.models.bert.modeling import (
    FAMILIES,
    EncoderConfig,
    SequenceClassifier,
)
from childtune_jax.models.bert.params import (
    from_pretrained,
    load_params,
    read_checkpoint,
    save_pretrained,
    to_pytorch_layout,
)

__all__ = ["FAMILIES", "EncoderConfig", "SequenceClassifier", "from_pretrained", "load_params",
           "read_checkpoint", "save_pretrained", "to_pytorch_layout"]
