"""The tokenizer a GGUF file describes in its metadata, as a ``tokenizers.Tokenizer``.

GGUF (llama.cpp's format) has no tokenizer.json: it stores the vocabulary
(``tokenizer.ggml.tokens``, in id order), the BPE merges
(``tokenizer.ggml.merges``, "left right" strings), each token's type
(``tokenizer.ggml.token_type``: 1 normal, 2 unknown, 3 control, 4
user-defined, 5 unused, 6 byte), the special ids and the name of the
pre-tokenizer (``tokenizer.ggml.pre``) the merges were learnt with. This
module rebuilds that tokenizer with the Hugging Face ``tokenizers`` library
(Rust: fast, and exact by construction: the same BPE, the same split regex)
for byte-level BPE vocabularies (``tokenizer.ggml.model == "gpt2"``: GPT-2,
SmolLM, Llama 3, Qwen2). SentencePiece vocabularies (``"llama"``: Llama 2,
Mistral v0.1) are refused with a clear error.

The split regexes are llama.cpp's (llama-vocab.cpp) for each ``pre`` name,
which are those of the models' own tokenizer.json files:

- ``gpt2``: GPT-2's regex (``ByteLevel(use_regex=True)``);
- ``smollm``: every digit on its own, then GPT-2's regex (SmolLM's
  tokenizer.json: ``Digits(individual_digits=True)`` + ByteLevel);
- ``llama-bpe`` (Llama 3): the cl100k-style regex, numbers in runs of 1-3
  digits, and ``ignore_merges`` (a word that is a token is not split);
- ``qwen2``: the same regex with single digits, NFC normalization first.

Tokens of type control (3) are special (kept whole, skipped by
``decode(skip_special_tokens=True)``); user-defined ones (4) are kept whole
but decoded (llama.cpp matches both whole in the text).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from ._checkpoint import CheckpointError
from .tokenizer import Tokenizer

_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# pre name -> (split regex or None for GPT-2's built-in one, split digits first, NFC, ignore_merges)
PRE_TOKENIZERS: dict[str, tuple[Optional[str], bool, bool, bool]] = {
    "gpt2": (None, False, False, False),
    "gpt-2": (None, False, False, False),  # the name convert_hf_to_gguf writes (llama.cpp refuses "gpt2")
    "smollm": (None, True, False, False),
    "llama-bpe": (_LLAMA3_SPLIT, False, False, True),
    "llama3": (_LLAMA3_SPLIT, False, False, True),
    "qwen2": (_QWEN2_SPLIT, False, True, False),
}

CONTROL, USER_DEFINED = 3, 4


def build_tokenizer(meta: Mapping[str, Any]):
    """A ``tokenizers.Tokenizer`` from GGUF metadata (the ``tokenizer.ggml.*``
    keys, values as Python lists/str/int). Raises CheckpointError naming the
    key that is missing or not supported."""
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers import Tokenizer as HFTokenizer

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise CheckpointError(f"tokenizer.ggml.model is {kind!r}: tallow builds byte-level BPE tokenizers ('gpt2') "
                              "only (SentencePiece 'llama' vocabularies are not supported)")
    pre = meta.get("tokenizer.ggml.pre", "gpt-2")
    if pre not in PRE_TOKENIZERS:
        raise CheckpointError(f"tokenizer.ggml.pre is {pre!r}, which tallow does not know the split regex of "
                              f"(supported: {sorted(PRE_TOKENIZERS)})")
    tokens = meta.get("tokenizer.ggml.tokens")
    merges = meta.get("tokenizer.ggml.merges")
    if not tokens:
        raise CheckpointError("the GGUF metadata has no tokenizer.ggml.tokens")
    if merges is None:
        raise CheckpointError("the GGUF metadata has no tokenizer.ggml.merges (a BPE vocabulary needs them)")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if len(types) != len(tokens):
        raise CheckpointError(f"tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = []
    for i, m in enumerate(merges):
        left, sep, right = m.partition(" ")
        if not sep or not left or not right:
            raise CheckpointError(f"tokenizer.ggml.merges[{i}] is {m!r}, expected 'left right'")
        pairs.append((left, right))
    regex, digits, nfc, ignore_merges = PRE_TOKENIZERS[pre]
    tok = HFTokenizer(models.BPE(vocab, pairs, fuse_unk=False, byte_fallback=False, ignore_merges=ignore_merges))
    if nfc:
        tok.normalizer = normalizers.NFC()
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=regex is None)
    steps = [pre_tokenizers.Split(Regex(regex), behavior="isolated")] if regex is not None else []
    if digits:
        steps.insert(0, pre_tokenizers.Digits(individual_digits=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps + [byte_level]) if steps else byte_level
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == CONTROL])
    user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == USER_DEFINED]
    if user:
        tok.add_tokens(user)
    bos, eos = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
    add_bos, add_eos = bool(meta.get("tokenizer.ggml.add_bos_token", False)), bool(
        meta.get("tokenizer.ggml.add_eos_token", False))
    if (add_bos and bos is not None) or (add_eos and eos is not None):
        single, special = "$A", []
        if add_bos and bos is not None:
            single, special = f"{tokens[bos]} {single}", special + [(tokens[bos], int(bos))]
        if add_eos and eos is not None:
            single, special = f"{single} {tokens[eos]}", special + [(tokens[eos], int(eos))]
        tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=special)
    return tok


class GGUFTokenizer(Tokenizer):
    """tallow's :class:`~tallow.models.Tokenizer` interface (encode_ids,
    encode_unbounded, decode, ``_tok``) over the tokenizer built from GGUF
    metadata. Also carries what chat templates read: ``chat_template``,
    ``bos_token`` and ``eos_token`` (strings), ``bos_token_id``, ``eos_token_id``."""

    def __init__(self, meta: Mapping[str, Any], *, max_length: int):
        # Tokenizer.__init__ reads a tokenizer.json from a directory; here there is none.
        self._tok = build_tokenizer(meta)
        self.max_length = int(max_length)
        # BOS (and EOS) as the file asks (tokenizer.ggml.add_bos_token), through the post-processor
        self.add_special_tokens = True
        tokens = meta["tokenizer.ggml.tokens"]

        def token(key: str) -> Optional[str]:
            i = meta.get(key)
            return tokens[i] if i is not None and 0 <= i < len(tokens) else None

        self.bos_token_id = meta.get("tokenizer.ggml.bos_token_id")
        self.eos_token_id = meta.get("tokenizer.ggml.eos_token_id")
        self.bos_token = token("tokenizer.ggml.bos_token_id")
        self.eos_token = token("tokenizer.ggml.eos_token_id")
        self.pad_token = token("tokenizer.ggml.padding_token_id")
        pad = meta.get("tokenizer.ggml.padding_token_id")
        self.pad_id = int(pad) if pad is not None else 0
        self.chat_template = meta.get("tokenizer.chat_template")
