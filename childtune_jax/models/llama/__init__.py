"""The Llama-style decoder family: Llama 2/3, SmolLM, Qwen2 (``modeling``, ``params``, ``gguf``)."""

from childtune_jax.models.llama.modeling import (
    FAMILIES,
    CausalLM,
    DecoderConfig,
    apply_rope,
    rope_frequencies,
)
from childtune_jax.models.llama.params import (
    from_folder,
    load_params,
    save_pretrained,
    to_pytorch_layout,
)

__all__ = ["FAMILIES", "CausalLM", "DecoderConfig", "apply_rope", "from_folder", "load_params",
           "rope_frequencies", "save_pretrained", "to_pytorch_layout"]
