"""GGUF files (llama.cpp's format) read into Hugging Face names, with their tokenizer.

:func:`read` dequantizes every tensor to float32 with the ``gguf`` package
(``gguf.quants.dequantize``), renames it to the Hugging Face key :mod:`.params` maps, and
undoes llama.cpp's permutation of the query and key weights of the ``llama`` architecture
(its converter interleaves each head's two rotary halves for its own RoPE kernel). Left
permuted, a model still answers plausibly but its perplexity doubles: greedy output alone
is no check. The architecture comes from the file's ``llama.*`` / ``qwen2.*`` fields, the
tokenizer (byte-level BPE) and the chat template from its ``tokenizer.*`` fields.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from childtune_jax.models.tokenizer import TextTokenizer, TokenizerError

# GGUF tensor name -> Hugging Face key ({i}: the layer).
NAMES: tuple[tuple[str, str], ...] = (
    (r"token_embd\.weight", "model.embed_tokens.weight"),
    (r"output_norm\.weight", "model.norm.weight"),
    (r"output\.weight", "lm_head.weight"),
    (r"blk\.{i}\.attn_norm\.weight", "model.layers.{i}.input_layernorm.weight"),
    (r"blk\.{i}\.ffn_norm\.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    (r"blk\.{i}\.attn_q\.(weight|bias)", "model.layers.{i}.self_attn.q_proj.{0}"),
    (r"blk\.{i}\.attn_k\.(weight|bias)", "model.layers.{i}.self_attn.k_proj.{0}"),
    (r"blk\.{i}\.attn_v\.(weight|bias)", "model.layers.{i}.self_attn.v_proj.{0}"),
    (r"blk\.{i}\.attn_output\.weight", "model.layers.{i}.self_attn.o_proj.weight"),
    (r"blk\.{i}\.ffn_gate\.weight", "model.layers.{i}.mlp.gate_proj.weight"),
    (r"blk\.{i}\.ffn_up\.weight", "model.layers.{i}.mlp.up_proj.weight"),
    (r"blk\.{i}\.ffn_down\.weight", "model.layers.{i}.mlp.down_proj.weight"),
)
_COMPILED = [(re.compile(p.replace("{i}", r"(?P<i>\d+)") + "$"), hf) for p, hf in NAMES]
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}  # GGUF architecture -> model_type


def hf_name(name: str) -> str:
  """The Hugging Face key of a GGUF tensor name."""
  for pattern, hf in _COMPILED:
    m = pattern.match(name)
    if m:
      at = pattern.groupindex.get("i")
      rest = [g for k, g in enumerate(m.groups(), start=1) if k != at]
      return hf.replace("{i}", m.group("i") if at else "").format(*rest)
  raise TokenizerError(f"GGUF tensor {name!r} has no Hugging Face name here")


def unpermute(w: np.ndarray, heads: int) -> np.ndarray:
  """Undoes llama.cpp's ``permute`` of a query or key weight (``(heads * head_dim, d_in)``)
  or bias: each head's rows back from interleaved rotary pairs to the two halves that
  transformers' ``rotate_half`` reads. llama.cpp's converter writes
  ``w.reshape(heads, 2, head_dim // 2, ...).swapaxes(1, 2)``; this is its inverse."""
  rows, rest = w.shape[0], w.shape[1:]
  return w.reshape(heads, rows // heads // 2, 2, *rest).swapaxes(1, 2).reshape(rows, *rest)


def _field(reader: Any, key: str, default: Any = None) -> Any:
  field = reader.fields.get(key)
  if field is None:
    return default
  return field.contents()


def config_of(reader: Any) -> dict:
  """The Hugging Face ``config.json`` of a GGUF file's decoder."""
  arch = _field(reader, "general.architecture")
  if arch not in ARCHITECTURES:
    raise TokenizerError(f"GGUF architecture {arch!r} is not supported "
                         f"({', '.join(ARCHITECTURES)} are)")

  def get(name: str, default: Any = None) -> Any:
    return _field(reader, f"{arch}.{name}", default)

  tokens = _field(reader, "tokenizer.ggml.tokens") or []
  names = {t.name for t in reader.tensors}
  heads = get("attention.head_count")
  hidden = get("embedding_length")
  config = {
      "model_type": ARCHITECTURES[arch], "vocab_size": get("vocab_size", len(tokens)),
      "hidden_size": hidden, "intermediate_size": get("feed_forward_length"),
      "num_hidden_layers": get("block_count"), "num_attention_heads": heads,
      "num_key_value_heads": get("attention.head_count_kv", heads),
      "head_dim": get("attention.key_length", hidden // heads),
      "rope_theta": float(get("rope.freq_base", 10_000.0)),
      "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
      "max_position_embeddings": get("context_length", 2048),
      "tie_word_embeddings": "output.weight" not in names,
      "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
      "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
      "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
  }
  if get("rope.scaling.type") not in (None, "none"):
    raise TokenizerError(f"GGUF rope scaling {get('rope.scaling.type')!r} is not supported")
  return {k: v for k, v in config.items() if v is not None}


# How each GGUF pre-tokenizer splits text before byte-level BPE (llama.cpp's llama-vocab.cpp).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _pre_tokenizer(kind: str | None) -> Any:
  from tokenizers import Regex, pre_tokenizers

  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if kind in (None, "default", "gpt2", "gpt-2"):
    return byte_level
  if kind == "smollm":  # digits one by one, then GPT-2's split
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
  split = {"llama3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT,
           "qwen2": _QWEN2_SPLIT}.get(kind)
  if split is None:
    raise TokenizerError(f"GGUF pre-tokenizer {kind!r} is not supported (gpt2, smollm, llama3, "
                         "qwen2 are); convert the model with transformers and pass its folder")
  return pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(split), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def tokenizer_of(reader: Any) -> TextTokenizer:
  """The byte-level BPE tokenizer and chat template a GGUF file's metadata describes."""
  from tokenizers import AddedToken, Tokenizer, decoders, models

  kind = _field(reader, "tokenizer.ggml.model")
  if kind != "gpt2":
    raise TokenizerError(f"GGUF tokenizer {kind!r} is not supported (byte-level BPE, 'gpt2', "
                         "is); convert the model with transformers and pass its folder")
  tokens = list(_field(reader, "tokenizer.ggml.tokens"))
  merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
  types = list(_field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens))
  backend = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                 fuse_unk=False))
  backend.pre_tokenizer = _pre_tokenizer(_field(reader, "tokenizer.ggml.pre"))
  backend.decoder = decoders.ByteLevel()
  backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                              for t, kind in zip(tokens, types) if kind == 3])  # CONTROL

  def token(key: str) -> str | None:
    i = _field(reader, f"tokenizer.ggml.{key}")
    return None if i is None else tokens[i]

  return TextTokenizer(backend, bos=token("bos_token_id"), eos=token("eos_token_id"),
                       pad=token("padding_token_id"),
                       add_bos=bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
                       chat_template=_field(reader, "tokenizer.chat_template"))


def read(path: str) -> tuple[dict, dict[str, np.ndarray], TextTokenizer]:
  """``(config, tensors, tokenizer)`` of a GGUF file: the Hugging Face config, float32
  tensors under Hugging Face's names and layout, and the tokenizer."""
  try:
    import gguf
  except ImportError:
    raise TokenizerError("reading a GGUF file needs the gguf package: pip install gguf") from None
  try:
    reader = gguf.GGUFReader(path)
  except Exception as e:  # noqa: BLE001 - a damaged file fails in many ways
    raise TokenizerError(f"cannot read {path} as GGUF: {type(e).__name__}: {e}") from None
  config = config_of(reader)
  permuted = config["model_type"] == "llama"
  tensors = {}
  for t in reader.tensors:
    key = hf_name(t.name)
    value = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
    value = value.reshape([int(n) for n in reversed(t.shape)])  # GGUF lists the fast axis first
    if permuted and ".q_proj." in key:
      value = unpermute(value, config["num_attention_heads"])
    elif permuted and ".k_proj." in key:
      value = unpermute(value, config["num_key_value_heads"])
    tensors[key] = value
  return config, tensors, tokenizer_of(reader)
