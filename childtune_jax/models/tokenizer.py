"""A decoder's tokenizer and chat template, on the ``tokenizers`` library alone.

:class:`TextTokenizer` reads a Hugging Face folder's ``tokenizer.json`` and
``tokenizer_config.json`` (its special tokens, ``add_bos_token`` and ``chat_template``),
or is built from a GGUF file's metadata (:func:`childtune_jax.models.llama.gguf.read`), and
writes both files back, so that a saved model folder loads in transformers too. The chat
template is rendered with jinja2, as transformers renders it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any


class TokenizerError(ValueError):
  """A tokenizer that cannot be read or built, named in one line."""


class TextTokenizer:
  """Text to token ids and back, with the model's special tokens and chat template.

  Attributes:
    backend: the ``tokenizers.Tokenizer``.
    bos_id, eos_id, pad_id: special token ids (``None`` where the model has none; the pad
      id falls back to the end-of-sequence id).
    add_bos: whether :meth:`encode` starts a text with the beginning-of-sequence token.
    chat_template: the model's jinja2 chat template, or ``None``.
  """

  def __init__(self, backend: Any, *, bos: str | None = None, eos: str | None = None,
               pad: str | None = None, add_bos: bool = False,
               chat_template: str | None = None, extra_config: dict | None = None):
    self.backend = backend
    self.bos, self.eos, self.pad = bos, eos, pad
    self.add_bos = add_bos
    self.chat_template = chat_template
    self.extra_config = dict(extra_config or {})
    for name in (bos, eos, pad):
      if name is not None and backend.token_to_id(name) is None:
        raise TokenizerError(f"the special token {name!r} is not in the vocabulary")

  @property
  def bos_id(self) -> int | None:
    return None if self.bos is None else self.backend.token_to_id(self.bos)

  @property
  def eos_id(self) -> int | None:
    return None if self.eos is None else self.backend.token_to_id(self.eos)

  @property
  def pad_id(self) -> int:
    for name in (self.pad, self.eos):
      if name is not None:
        return self.backend.token_to_id(name)
    return 0

  @property
  def vocab_size(self) -> int:
    return self.backend.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
    """The ids of ``text``; special tokens written in it (``<|im_start|>``) stay whole."""
    ids = self.backend.encode(text, add_special_tokens=False).ids
    if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
      ids = [self.bos_id, *ids]
    return ids

  def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
    return self.backend.decode(list(ids), skip_special_tokens=skip_special)

  def render_chat(self, messages: list[dict[str, str]], *, add_generation_prompt: bool) -> str:
    """``messages`` as the model's chat template writes them (transformers' rendering)."""
    if self.chat_template is None:
      raise TokenizerError("the model has no chat template")
    try:
      import jinja2
      from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
      raise TokenizerError("rendering a chat template needs jinja2: pip install jinja2") from None

    def raise_exception(message: str) -> None:
      raise TokenizerError(f"the chat template refused the messages: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    try:
      template = env.from_string(self.chat_template)
    except jinja2.TemplateError as e:
      raise TokenizerError(f"the chat template does not parse: {e}") from None
    return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                           bos_token=self.bos or "", eos_token=self.eos or "")

  # -- files -------------------------------------------------------------------------------

  @classmethod
  def from_folder(cls, folder: str) -> TextTokenizer:
    """The tokenizer of a Hugging Face folder (``tokenizer.json`` is required)."""
    from tokenizers import Tokenizer

    path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(path):
      raise TokenizerError(f"{folder} has no tokenizer.json (a decoder's tokenizer is read "
                           "with the tokenizers library; save one with transformers' "
                           "tokenizer.save_pretrained)")
    try:
      backend = Tokenizer.from_file(path)
    except Exception as e:  # noqa: BLE001 - a damaged file fails in many ways
      raise TokenizerError(f"cannot read {path}: {str(e).splitlines()[0] if str(e) else e}"
                           ) from None
    config: dict = {}
    config_path = os.path.join(folder, "tokenizer_config.json")
    if os.path.isfile(config_path):
      with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    template = config.get("chat_template")
    template_file = os.path.join(folder, "chat_template.jinja")
    if template is None and os.path.isfile(template_file):
      with open(template_file, encoding="utf-8") as f:
        template = f.read()
    if isinstance(template, list):  # several named templates: the default one
      template = next((t["template"] for t in template if t.get("name") == "default"), None)

    def token(name: str) -> str | None:
      value = config.get(name)
      return value.get("content") if isinstance(value, dict) else value

    known = {"bos_token", "eos_token", "pad_token", "add_bos_token", "chat_template"}
    return cls(backend, bos=token("bos_token"), eos=token("eos_token"), pad=token("pad_token"),
               add_bos=bool(config.get("add_bos_token", False)), chat_template=template,
               extra_config={k: v for k, v in config.items() if k not in known})

  def save(self, folder: str) -> None:
    """Writes ``tokenizer.json`` and ``tokenizer_config.json`` (transformers reads both)."""
    os.makedirs(folder, exist_ok=True)
    self.backend.save(os.path.join(folder, "tokenizer.json"))
    config = {**self.extra_config, "bos_token": self.bos, "eos_token": self.eos,
              "pad_token": self.pad, "add_bos_token": self.add_bos,
              "tokenizer_class": self.extra_config.get("tokenizer_class",
                                                       "PreTrainedTokenizerFast")}
    if self.chat_template is not None:
      config["chat_template"] = self.chat_template
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
      json.dump({k: v for k, v in config.items() if v is not None}, f, indent=2, sort_keys=True)
