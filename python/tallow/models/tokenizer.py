"""Batched tokenization with the Hugging Face ``tokenizers`` library
(tokenizer.json), with explicit truncation."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from ..errors import InputError
from ._checkpoint import CheckpointError, model_dir


class InputTooLongError(InputError):
    """An input has more tokens than the model accepts and truncation is off."""

    def __init__(self, message: str = "", *, param: str | None = None, kind: str = "too_long"):
        super().__init__(message, param=param, kind=kind)


class Tokenizer:
    """Wraps ``tokenizers.Tokenizer`` loaded from ``<dir>/tokenizer.json``.

    Padding and truncation configured inside tokenizer.json are switched off
    (MiniLM's fixes both at 128); this class pads to the longest input of each
    batch and truncates only when asked to.
    """

    def __init__(self, path: str | Path, *, max_length: int, add_special_tokens: bool = True):
        from tokenizers import Tokenizer as HFTokenizer

        tok_path = model_dir(path) / "tokenizer.json"
        if not tok_path.is_file():
            raise CheckpointError(f"{str(tok_path)!r} is missing: the model directory needs tokenizer.json")
        try:
            self._tok = HFTokenizer.from_file(str(tok_path))
        except Exception as exc:
            raise CheckpointError(f"{str(tok_path)!r} could not be read: {exc}") from exc
        self._tok.no_padding()
        self._tok.no_truncation()
        self.max_length = int(max_length)
        self.add_special_tokens = add_special_tokens
        pad = self._tok.token_to_id("[PAD]")
        self.pad_id = 0 if pad is None else pad

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(int(token_id))

    def encode_ids(self, texts: Sequence[str], *, truncation: bool = False,
                   max_length: int | None = None) -> list[list[int]]:
        """Token ids per text, unpadded. Raises for empty or over-long input."""
        limit = self.max_length if max_length is None else min(int(max_length), self.max_length)
        encs = self.encode_unbounded(texts)
        ids = []
        for i, seq in enumerate(encs):
            if len(seq) > limit:
                if not truncation:
                    raise InputTooLongError(
                        f"input {i} has {len(seq)} tokens; the limit is {limit} (pass truncation=True to cut it)"
                    )
                seq = seq[: limit - 1] + seq[-1:] if self.add_special_tokens else seq[:limit]
            ids.append(seq)
        return ids

    def encode_unbounded(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids per text with no length limit (the caller decides what to
        cut: the server keeps the *end* of an over-long GPT-2 prompt)."""
        if isinstance(texts, str):
            raise TypeError("expected a list of strings, got a single str (wrap it in a list)")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"input {i} is {type(t).__name__}, expected str")
            if not t.strip():
                raise ValueError(f"input {i} is empty or only whitespace")
        return [list(e.ids) for e in self._tok.encode_batch(list(texts), add_special_tokens=self.add_special_tokens)]

    def batch(self, texts: Sequence[str], *, truncation: bool = False,
              max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids [B, L] int64, attention_mask [B, L] int64 with 1 = token),
        right-padded to the longest input."""
        ids = self.encode_ids(texts, truncation=truncation, max_length=max_length)
        longest = max(len(s) for s in ids)
        input_ids = torch.full((len(ids), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), longest), dtype=torch.long)
        for i, s in enumerate(ids):
            input_ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, : len(s)] = 1
        return input_ids, mask

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)


# The special tokens a chat template may name (transformers passes its tokenizer's
# ``special_tokens_map`` to the template as variables of these names).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def read_chat_config(path: str | Path) -> tuple[str | None, dict[str, str]]:
    """A Hugging Face model directory's chat template and special tokens, as
    transformers reads them: the template from ``chat_template.jinja`` when it
    exists, else the ``chat_template`` field of ``tokenizer_config.json`` (a
    string, or a list of named templates: the one named "default"); the
    special tokens (``bos_token``, ``eos_token``, ... as strings) from
    tokenizer_config.json, then special_tokens_map.json. (None, {}) when the
    directory has neither file."""
    import json

    d = Path(path)
    config: dict = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins, as in transformers
        f = d / name
        if f.is_file():
            try:
                data = json.loads(f.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise CheckpointError(f"{str(f)!r} is not valid JSON: {exc}") from exc
            if not isinstance(data, dict):
                raise CheckpointError(f"{str(f)!r} must hold a JSON object")
            config.update(data)
    special: dict[str, str] = {}
    for key in SPECIAL_TOKEN_NAMES:
        value = config.get(key)
        if isinstance(value, dict):  # a serialised AddedToken
            value = value.get("content")
        if isinstance(value, str) and value:
            special[key] = value
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if "default" not in named:
            raise CheckpointError(f"tokenizer_config.json in {str(d)!r} has named chat templates "
                                  f"{sorted(map(str, named))} but none named 'default'")
        template = named["default"]
    jinja = d / "chat_template.jinja"
    if jinja.is_file():
        template = jinja.read_text(encoding="utf-8")
    if template is not None and not isinstance(template, str):
        raise CheckpointError(f"the chat_template in {str(d)!r} must be a string, got {type(template).__name__}")
    return template or None, special
