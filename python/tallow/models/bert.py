"""BERT encoder (Devlin et al. 2019) on tallow's kernels.

Attention runs through ``tallow.ops.attention`` (key padding mask for padded
batches); the Q, K and V projections are fused into one GEMM at load time;
every linear runs fp32 or INT8 (``quantize="int8"``). Heads: sentence
embeddings (mean or CLS pooling, optional L2 normalisation — the
sentence-transformers convention) and sequence classification.

Checkpoints: a Hugging Face ``BertModel`` / ``BertForSequenceClassification``
directory (config.json, model.safetensors or pytorch_model.bin, tokenizer.json).

A classifier's pooling is read from config.json's ``tallow`` field
(``{"pooling": "pooler" | "mean" | "cls", "normalize": bool}``; without it,
Hugging Face's CLS + pooler + tanh). A head trained by ``tallow train`` on
a frozen encoder may hold only ``classifier.*`` and name its encoder
(``"base_model"``: a path relative to the directory, an absolute path or a
``tallow:`` name, with ``"base_sha256"`` of its weights, checked on load).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..ops import attention
from ._checkpoint import CheckpointError, check_state_dict, read_config, read_state_dict, strip_prefix
from .bert_native import NativeEncoder, native_encoder_wanted
from .layers import Dense, count_parameters, quantize_model
from .tokenizer import Tokenizer

_HIDDEN_ACT = {"gelu": "gelu_erf", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}


@dataclass
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    id2label: dict[int, str] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> "BertConfig":
        if d.get("model_type", "bert") != "bert":
            raise CheckpointError(f"config.json model_type is {d.get('model_type')!r}, expected 'bert'")
        if d.get("position_embedding_type", "absolute") != "absolute":
            raise CheckpointError("only absolute position embeddings are supported, got "
                                  f"{d.get('position_embedding_type')!r}")
        if d.get("hidden_act", "gelu") not in _HIDDEN_ACT:
            raise CheckpointError(f"unsupported hidden_act {d.get('hidden_act')!r}; supported: {sorted(_HIDDEN_ACT)}")
        try:
            cfg = cls(
                vocab_size=int(d["vocab_size"]),
                hidden_size=int(d["hidden_size"]),
                num_hidden_layers=int(d["num_hidden_layers"]),
                num_attention_heads=int(d["num_attention_heads"]),
                intermediate_size=int(d["intermediate_size"]),
                hidden_act=d.get("hidden_act", "gelu"),
                max_position_embeddings=int(d.get("max_position_embeddings", 512)),
                type_vocab_size=int(d.get("type_vocab_size", 2)),
                layer_norm_eps=float(d.get("layer_norm_eps", 1e-12)),
                pad_token_id=int(d.get("pad_token_id") or 0),
                id2label={int(k): str(v) for k, v in (d.get("id2label") or {}).items()},
            )
        except KeyError as exc:
            raise CheckpointError(f"config.json lacks required field {exc.args[0]!r}") from exc
        if cfg.hidden_size % cfg.num_attention_heads:
            raise CheckpointError(f"hidden_size {cfg.hidden_size} is not divisible by "
                                  f"num_attention_heads {cfg.num_attention_heads}")
        return cfg

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def expected_shapes(self, *, pooler: bool) -> dict[str, tuple[int, ...]]:
        h, f = self.hidden_size, self.intermediate_size
        shapes: dict[str, tuple[int, ...]] = {
            "embeddings.word_embeddings.weight": (self.vocab_size, h),
            "embeddings.position_embeddings.weight": (self.max_position_embeddings, h),
            "embeddings.token_type_embeddings.weight": (self.type_vocab_size, h),
            "embeddings.LayerNorm.weight": (h,),
            "embeddings.LayerNorm.bias": (h,),
        }
        for i in range(self.num_hidden_layers):
            p = f"encoder.layer.{i}."
            for name in ("attention.self.query", "attention.self.key", "attention.self.value",
                         "attention.output.dense"):
                shapes[p + name + ".weight"] = (h, h)
                shapes[p + name + ".bias"] = (h,)
            shapes[p + "attention.output.LayerNorm.weight"] = (h,)
            shapes[p + "attention.output.LayerNorm.bias"] = (h,)
            shapes[p + "intermediate.dense.weight"] = (f, h)
            shapes[p + "intermediate.dense.bias"] = (f,)
            shapes[p + "output.dense.weight"] = (h, f)
            shapes[p + "output.dense.bias"] = (h,)
            shapes[p + "output.LayerNorm.weight"] = (h,)
            shapes[p + "output.LayerNorm.bias"] = (h,)
        if pooler:
            shapes["pooler.dense.weight"] = (h, h)
            shapes["pooler.dense.bias"] = (h,)
        return shapes


class BertLayer(torch.nn.Module):
    def __init__(self, cfg: BertConfig, sd: dict[str, torch.Tensor], prefix: str):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.head_dim
        self.eps = cfg.layer_norm_eps

        def w(name: str) -> torch.Tensor:
            return sd[prefix + name]

        # Q, K and V as one [3H, H] GEMM; rows ordered q | k | v.
        self.qkv = Dense(
            torch.cat([w("attention.self.query.weight"), w("attention.self.key.weight"),
                       w("attention.self.value.weight")]),
            torch.cat([w("attention.self.query.bias"), w("attention.self.key.bias"),
                       w("attention.self.value.bias")]),
        )
        self.attn_out = Dense(w("attention.output.dense.weight"), w("attention.output.dense.bias"))
        self.attn_norm = torch.nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn_norm.load_state_dict({"weight": w("attention.output.LayerNorm.weight"),
                                        "bias": w("attention.output.LayerNorm.bias")})
        self.intermediate = Dense(w("intermediate.dense.weight"), w("intermediate.dense.bias"),
                                  activation=_HIDDEN_ACT[cfg.hidden_act])
        self.out = Dense(w("output.dense.weight"), w("output.dense.bias"))
        self.out_norm = torch.nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.out_norm.load_state_dict({"weight": w("output.LayerNorm.weight"), "bias": w("output.LayerNorm.bias")})

    def forward(self, x: torch.Tensor, padding: Optional[torch.Tensor]) -> torch.Tensor:
        b, l, h = x.shape
        qkv = self.qkv(x).view(b, l, 3, self.num_heads, self.head_dim)
        qkv = qkv.permute(2, 0, 3, 1, 4)  # [3, B, heads, L, d]: strided views, no copy
        ctx = attention(qkv[0], qkv[1], qkv[2], key_padding_mask=padding)  # [B, heads, L, d]
        ctx = ctx.transpose(1, 2).reshape(b, l, h)
        x = self.attn_norm(x + self.attn_out(ctx))
        return self.out_norm(x + self.out(self.intermediate(x)))


class BertModel(torch.nn.Module):
    """The encoder: token ids → hidden states [B, L, H] (and the pooler)."""

    def __init__(self, cfg: BertConfig, sd: dict[str, torch.Tensor], *, pooler: bool):
        super().__init__()
        self.config = cfg
        self.word_embeddings = torch.nn.Embedding.from_pretrained(sd["embeddings.word_embeddings.weight"].float())
        self.position_embeddings = torch.nn.Embedding.from_pretrained(
            sd["embeddings.position_embeddings.weight"].float())
        self.token_type_embeddings = torch.nn.Embedding.from_pretrained(
            sd["embeddings.token_type_embeddings.weight"].float())
        self.embed_norm = torch.nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.embed_norm.load_state_dict({"weight": sd["embeddings.LayerNorm.weight"],
                                         "bias": sd["embeddings.LayerNorm.bias"]})
        self.layers = torch.nn.ModuleList(
            [BertLayer(cfg, sd, f"encoder.layer.{i}.") for i in range(cfg.num_hidden_layers)])
        self.pooler = Dense(sd["pooler.dense.weight"], sd["pooler.dense.bias"]) if pooler else None
        self.requires_grad_(False)
        # The whole forward as one native call (bert_native.py), chosen once
        # here; None keeps the per-op path below (its reference).
        self.native = NativeEncoder(self) if native_encoder_wanted() else None

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, l = input_ids.shape
        if l > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {l} exceeds the model's limit of "
                             f"{self.config.max_position_embeddings} positions")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        positions = torch.arange(l, device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids) \
            + self.position_embeddings(positions)[None]
        x = self.embed_norm(x)
        # True = padding, the attention op's convention; None when nothing is padded.
        padding = None if attention_mask is None or bool(attention_mask.all()) else attention_mask == 0
        for layer in self.layers:
            x = layer(x, padding)
        return x

    def pooled(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.pooled_cls(hidden[:, 0])

    def pooled_cls(self, cls: torch.Tensor) -> torch.Tensor:
        """The pooler (dense + tanh) on CLS hidden states [B, H]."""
        if self.pooler is None:
            raise ValueError("this checkpoint has no pooler (pooler.dense.*)")
        return torch.tanh(self.pooler(cls))


def _pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    if pooling == "mean":
        m = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
    if pooling == "cls":
        return hidden[:, 0]
    raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")


# Inputs sorted by length are split into micro-batches that minimise
#   sum over micro-batches of (FORWARD_COST_TOKENS + rows x longest row),
# i.e. padded tokens plus a fixed price per forward pass (Python dispatch of
# ~100 ops, kernel launches), found exactly by dynamic programming over the
# sorted lengths. One batch pads short inputs to the longest; one batch per
# length pays the fixed price many times. Measured on 32 MiniLM sentences of
# 7-47 tokens: a single batch spent half its rows' compute on padding; cutting
# by padding alone made 4-5 forward passes whose Python overhead (held under
# the GIL, shared with the server's event loop) cost as much as the padding.
FORWARD_COST_TOKENS = 96


def _micro_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Partition of ``range(len(lengths))`` (by ascending length) into runs of
    at most ``batch_size`` that minimises the cost above."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    n = len(order)
    best = [0.0] + [float("inf")] * n  # best[i]: cost of the first i sorted inputs
    cut = [0] * (n + 1)
    for i in range(1, n + 1):
        longest = lengths[order[i - 1]]
        for j in range(max(0, i - batch_size), i):
            cost = best[j] + FORWARD_COST_TOKENS + (i - j) * longest
            if cost < best[i]:
                best[i], cut[i] = cost, j
    groups, i = [], n
    while i > 0:
        groups.append(order[cut[i]:i])
        i = cut[i]
    return groups[::-1]


def _check_lengths(ids: Sequence[Sequence[int]], cfg: BertConfig) -> None:
    """The per-op path's errors for the native one: an empty input or one
    longer than the model's positions."""
    for i, x in enumerate(ids):
        if len(x) == 0:
            raise ValueError(f"input {i} has no tokens")
        if len(x) > cfg.max_position_embeddings:
            raise ValueError(f"sequence length {len(x)} exceeds the model's limit of "
                             f"{cfg.max_position_embeddings} positions")


def _length_sorted_batches(ids: Sequence[Sequence[int]], batch_size: int, pad_id: int):
    """Yields (positions in ``ids``, input_ids [b, L], attention_mask [b, L]) for
    the micro-batches of ``_micro_batches``."""
    groups = _micro_batches([len(x) for x in ids], batch_size)
    for idx in groups:
        longest = max(len(ids[i]) for i in idx)
        input_ids = torch.full((len(idx), longest), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), longest), dtype=torch.long)
        for row, i in enumerate(idx):
            input_ids[row, : len(ids[i])] = torch.tensor(ids[i])
            mask[row, : len(ids[i])] = 1
        yield idx, input_ids, mask


class _BertBase(torch.nn.Module):
    architecture = "bert"

    def __init__(self, cfg: BertConfig, bert: BertModel, tokenizer: Optional[Tokenizer], quantize: Optional[str]):
        super().__init__()
        self.config = cfg
        self.bert = bert
        self.tokenizer = tokenizer
        self.quantization = quantize_model(self, quantize)

    def _tokenize(self, texts: Sequence[str], truncation: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if self.tokenizer is None:
            raise ValueError("this model was loaded without tokenizer.json; pass token ids to forward()")
        return self.tokenizer.batch(texts, truncation=truncation)

    @property
    def _pad_id(self) -> int:
        return self.tokenizer.pad_id if self.tokenizer is not None else 0

    def num_parameters(self) -> int:
        return count_parameters(self)

    def extra_repr(self) -> str:
        c = self.config
        return (f"architecture={type(self).__name__}, layers={c.num_hidden_layers}, hidden={c.hidden_size}, "
                f"heads={c.num_attention_heads}, dtype=float32, quantization={self.quantization or 'none'}, "
                f"parameters={self.num_parameters():,}")

    def __repr__(self) -> str:  # a one-liner: the module tree is long and says less
        return f"{type(self).__name__}({self.extra_repr()})"


class BertEmbedder(_BertBase):
    """Sentence embeddings from a BERT encoder (e.g. all-MiniLM-L6-v2)."""

    def __init__(self, cfg, bert, tokenizer, quantize=None, *, pooling: str = "mean", normalize: bool = True):
        super().__init__(cfg, bert, tokenizer, quantize)
        self.pooling = pooling
        self.normalize = normalize

    @torch.inference_mode()
    def embed(self, texts: Sequence[str], *, batch_size: int = 32, truncation: bool = False,
              pooling: Optional[str] = None, normalize: Optional[bool] = None) -> torch.Tensor:
        """[N, hidden] float32 embeddings of ``texts``, batched by ``batch_size``.

        Texts are sorted by length inside the call so each batch pads little;
        the output keeps the input order."""
        if isinstance(texts, str):
            texts = [texts]
        if len(texts) == 0:
            return torch.empty(0, self.config.hidden_size)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        pooling = self.pooling if pooling is None else pooling
        normalize = self.normalize if normalize is None else normalize
        if self.tokenizer is None:
            raise ValueError("this model was loaded without tokenizer.json")
        ids = self.tokenizer.encode_ids(texts, truncation=truncation)
        return self.embed_ids(ids, batch_size=batch_size, pooling=pooling, normalize=normalize)

    @torch.inference_mode()
    def embed_ids(self, ids: Sequence[Sequence[int]], *, batch_size: int = 32, pooling: Optional[str] = None,
                  normalize: Optional[bool] = None) -> torch.Tensor:
        """``embed`` on already tokenized inputs (the server tokenizes on arrival
        to count tokens for its batch budget, then runs many requests' ids at once)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        pooling = self.pooling if pooling is None else pooling
        normalize = self.normalize if normalize is None else normalize
        if len(ids) == 0:
            return torch.empty(0, self.config.hidden_size)
        out = torch.empty(len(ids), self.config.hidden_size)
        if self.bert.native is not None:
            _check_lengths(ids, self.config)
            for start in range(0, len(ids), batch_size):  # packed: no padding, no sorting needed
                chunk = ids[start:start + batch_size]
                if pooling == "pooler":
                    emb = self.bert.pooled_cls(self.bert.native.run(chunk, "pooler"))
                    out[start:start + len(chunk)] = F.normalize(emb, p=2, dim=1) if normalize else emb
                else:
                    out[start:start + len(chunk)] = self.bert.native.run(chunk, pooling, normalize)
            return out
        for idx, input_ids, mask in _length_sorted_batches(ids, batch_size, self._pad_id):
            hidden = self.bert(input_ids, mask)
            emb = self.bert.pooled(hidden) if pooling == "pooler" else _pool(hidden, mask, pooling)
            if normalize:
                emb = F.normalize(emb, p=2, dim=1)
            out[idx] = emb
        return out

    forward = embed


POOLINGS = ("pooler", "mean", "cls")


class BertClassifier(_BertBase):
    """Sequence classification: logits, softmax probabilities, labels from id2label.

    ``pooling``: "pooler" (CLS through the pooler's dense + tanh, Hugging
    Face's BertForSequenceClassification), "mean" (mean of the unpadded
    tokens) or "cls" (the CLS hidden state); ``normalize`` L2-normalizes the
    pooled vector before the classifier (sentence-transformers heads)."""

    def __init__(self, cfg, bert, tokenizer, classifier_weight, classifier_bias, quantize=None, *,
                 pooling: str = "pooler", normalize: bool = False):
        super().__init__(cfg, bert, tokenizer, None)
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        self.pooling = pooling
        self.normalize = normalize
        self.classifier = Dense(classifier_weight, classifier_bias)
        self.num_labels = classifier_weight.shape[0]
        self.quantization = quantize_model(self, quantize)

    def pool(self, hidden: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
        if self.pooling == "pooler":
            pooled = self.bert.pooled(hidden)
        else:
            if attention_mask is None:
                attention_mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
            pooled = _pool(hidden, attention_mask, self.pooling)
        return F.normalize(pooled, p=2, dim=1) if self.normalize else pooled

    def label(self, i: int) -> str:
        return self.config.id2label.get(i, f"LABEL_{i}")

    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        hidden = self.bert(input_ids, attention_mask)
        return self.classifier(self.pool(hidden, attention_mask))

    @torch.inference_mode()
    def classify(self, texts: Sequence[str], *, truncation: bool = False) -> list[dict]:
        """Per text: {'label', 'score', 'probabilities': {label: p}}."""
        if isinstance(texts, str):
            texts = [texts]
        if len(texts) == 0:
            return []
        if self.tokenizer is None:
            raise ValueError("this model was loaded without tokenizer.json; pass token ids to forward()")
        return self.classify_ids(self.tokenizer.encode_ids(texts, truncation=truncation))

    @torch.inference_mode()
    def classify_ids(self, ids: Sequence[Sequence[int]], *, batch_size: int = 32) -> list[dict]:
        """``classify`` on already tokenized inputs, batched by ``batch_size``
        after sorting by length (little padding)."""
        if len(ids) == 0:
            return []
        probs = torch.empty(len(ids), self.num_labels)
        if self.bert.native is not None:
            _check_lengths(ids, self.config)
            for start in range(0, len(ids), batch_size):
                chunk = ids[start:start + batch_size]
                if self.pooling == "pooler":
                    pooled = self.bert.pooled_cls(self.bert.native.run(chunk, "pooler"))
                    pooled = F.normalize(pooled, p=2, dim=1) if self.normalize else pooled
                else:
                    pooled = self.bert.native.run(chunk, self.pooling, self.normalize)
                probs[start:start + len(chunk)] = torch.softmax(self.classifier(pooled), dim=-1)
        else:
            for idx, input_ids, mask in _length_sorted_batches(ids, batch_size, self._pad_id):
                probs[idx] = torch.softmax(self.logits(input_ids, mask), dim=-1)
        results = []
        for row in probs:
            best = int(torch.argmax(row))
            results.append({"label": self.label(best), "score": float(row[best]),
                            "probabilities": {self.label(j): float(p) for j, p in enumerate(row)}})
        return results

    forward = logits


def _sentence_transformers_pooling(path: Path) -> tuple[str, bool]:
    """Pooling and normalisation declared by a sentence-transformers directory."""
    pooling, normalize = "mean", False
    pool_cfg = path / "1_Pooling" / "config.json"
    if pool_cfg.is_file():
        c = json.loads(pool_cfg.read_text())
        pooling = "cls" if c.get("pooling_mode_cls_token") else "mean"
    modules = path / "modules.json"
    if modules.is_file():
        normalize = any(m.get("type", "").endswith("Normalize") for m in json.loads(modules.read_text()))
    return pooling, normalize


def _classifier_options(raw: dict, path: Path) -> dict:
    """config.json's ``tallow`` field (pooling, normalize, base_model, base_sha256), checked."""
    opts = raw.get("tallow") or {}
    if not isinstance(opts, dict):
        raise CheckpointError(f"{str(path)!r}: config.json field 'tallow' must be an object, got {opts!r}")
    pooling = opts.get("pooling", "pooler")
    if pooling not in POOLINGS:
        raise CheckpointError(f"{str(path)!r}: config.json tallow.pooling must be one of "
                              f"{', '.join(POOLINGS)}, got {pooling!r}")
    return {"pooling": pooling, "normalize": bool(opts.get("normalize", False)),
            "base_model": opts.get("base_model"), "base_sha256": opts.get("base_sha256")}


_BASE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "max_position_embeddings", "type_vocab_size")


def _base_encoder(path: Path, raw: dict, base_model: str, base_sha256: Optional[str]) -> tuple[dict, Path]:
    """The encoder weights of a head-only classifier, from its base model."""
    from ._checkpoint import resolve_model_path

    try:
        base = resolve_model_path(base_model, relative_to=path)
        base_raw = read_config(base)
    except CheckpointError as exc:
        raise CheckpointError(f"{str(path)!r} is a head trained on {base_model!r}, which cannot be found: "
                              f"{exc}") from exc
    diff = [f"{k}: head {raw.get(k)!r}, base {base_raw.get(k)!r}" for k in _BASE_FIELDS
            if raw.get(k) != base_raw.get(k)]
    if diff:
        raise CheckpointError(f"{str(path)!r}: its base model {str(base)!r} has another shape ({'; '.join(diff)})")
    if base_sha256:
        from ._checkpoint import weights_sha256

        got = weights_sha256(base)
        if got != base_sha256:
            raise CheckpointError(f"{str(path)!r} was trained on base weights with sha256 {base_sha256[:16]}…, "
                                  f"but {str(base)!r} has {got[:16]}…: not the same encoder")
    return strip_prefix(read_state_dict(base), "bert."), base


def load_bert(path: str | Path, quantize: Optional[str] = None, *, task: Optional[str] = None) -> _BertBase:
    """Loads a BERT directory. ``task`` 'embed' or 'classify' (default: from
    config.json's architectures — *ForSequenceClassification → classify)."""
    raw = read_config(path)
    cfg = BertConfig.from_dict(raw)
    path = Path(path)
    # float16 / bfloat16 checkpoints (the shipped sentiment model is stored in float16) run in float32
    sd = {k: v.float() if v.is_floating_point() and v.dtype != torch.float32 else v
          for k, v in strip_prefix(read_state_dict(path), "bert.").items()}
    archs = raw.get("architectures") or []
    if task is None:
        task = "classify" if any(a.endswith("ForSequenceClassification") for a in archs) else "embed"
    opts = _classifier_options(raw, path) if task == "classify" else {"pooling": "pooler", "base_model": None}
    tok_dir = path
    if opts.get("base_model") and "embeddings.word_embeddings.weight" not in sd:
        base_sd, tok_dir = _base_encoder(path, raw, opts["base_model"], opts.get("base_sha256"))
        base_sd.pop("classifier.weight", None)
        base_sd.pop("classifier.bias", None)
        sd = {**base_sd, **sd}
        if (path / "tokenizer.json").is_file():
            tok_dir = path
    has_pooler = "pooler.dense.weight" in sd
    expected = cfg.expected_shapes(pooler=has_pooler or (task == "classify" and opts["pooling"] == "pooler"))
    ignorable = ("position_ids",)
    if task == "classify":
        if "classifier.weight" not in sd:
            raise CheckpointError(f"{str(path)!r}: a classification checkpoint needs classifier.weight")
        num_labels = sd["classifier.weight"].shape[0]
        expected["classifier.weight"] = (num_labels, cfg.hidden_size)
        expected["classifier.bias"] = (num_labels,)
    elif task != "embed":
        raise ValueError(f"task must be 'embed' or 'classify', got {task!r}")
    else:
        ignorable += ("classifier.weight", "classifier.bias")
    check_state_dict(sd, expected, ignorable=ignorable, source=str(path))
    tokenizer = (Tokenizer(tok_dir, max_length=cfg.max_position_embeddings)
                 if (tok_dir / "tokenizer.json").is_file() else None)
    if task == "classify":
        bert = BertModel(cfg, sd, pooler=has_pooler or opts["pooling"] == "pooler")
        return BertClassifier(cfg, bert, tokenizer, sd["classifier.weight"], sd["classifier.bias"], quantize,
                              pooling=opts["pooling"], normalize=opts["normalize"])
    bert = BertModel(cfg, sd, pooler=has_pooler)
    pooling, normalize = _sentence_transformers_pooling(path)
    return BertEmbedder(cfg, bert, tokenizer, quantize, pooling=pooling, normalize=normalize)


# -- a classification head on an embedder's own encoder ---------------------------------------

def _weight_names(path: Path) -> Optional[set]:
    """The tensor names in a directory's model.safetensors (read from its header), or None."""
    from safetensors import safe_open

    st = path / "model.safetensors"
    if not st.is_file():
        return None
    with safe_open(str(st), framework="pt") as f:
        return {k.removeprefix("bert.") for k in f.keys()}


def _on_a_base(path: Path) -> Optional[dict]:
    """config.json's tallow options when ``path`` holds a classifier trained on
    the encoder named by ``base_model`` — a head alone, or a head with the top
    layers it fine-tuned (``head_only`` tells which; the embeddings always
    come from the base) — None for a full checkpoint."""
    raw = read_config(path)
    opts = _classifier_options(raw, path)
    if not opts.get("base_model"):
        return None
    names = _weight_names(path)
    if names is None or "classifier.weight" not in names or "embeddings.word_embeddings.weight" in names:
        return None
    return {**opts, "raw": raw, "head_only": all(k.startswith("classifier.") for k in names)}


def head_shares_encoder(head_path: str | Path, encoder_path: str | Path) -> bool:
    """Whether the classifier in ``head_path`` was trained on exactly the
    encoder in ``encoder_path`` (same shape, same weights by sha256, a pooler
    if the head pools through one) — a head alone, or a head with its top
    layers fine-tuned — so that the embedder's worker can serve both
    (``head_on`` then cannot refuse it)."""
    from ._checkpoint import resolve_model_path, weights_sha256

    head_path, encoder_path = Path(head_path), Path(encoder_path)
    try:
        opts = _on_a_base(head_path)
        if opts is None:
            return False
        enc_raw = read_config(encoder_path)
        if any(opts["raw"].get(k) != enc_raw.get(k) for k in _BASE_FIELDS):
            return False
        if opts["pooling"] == "pooler" and "pooler.dense.weight" not in (_weight_names(encoder_path) or ()):
            return False
        base = resolve_model_path(opts["base_model"], relative_to=head_path)
        if opts.get("base_sha256"):
            return weights_sha256(encoder_path) == opts["base_sha256"]
        return base.resolve() == encoder_path.resolve() or weights_sha256(encoder_path) == weights_sha256(base)
    except (CheckpointError, OSError, ValueError):
        return False  # whatever is wrong, loading the classifier on its own will say it


def head_on(embedder: "BertEmbedder", head_path: str | Path, quantize: Optional[str] = None) -> BertClassifier:
    """The classifier in ``head_path``, served beside ``embedder`` in one
    process. A head alone runs on the embedder's own encoder: the two share
    one ``BertModel`` (one copy of the weights, in memory and in the kernels'
    packed form). A head with fine-tuned top layers needs its own encoder
    (the base's lower layers + its own top ones), loaded here. Call only when
    ``head_shares_encoder`` said yes."""
    head_path = Path(head_path)
    opts = _on_a_base(head_path)
    if opts is None:
        raise CheckpointError(f"{str(head_path)!r} is not a classifier on a base encoder (classifier.* and "
                              "base_model)")
    if not opts["head_only"]:
        return load_bert(head_path, task="classify", quantize=quantize)
    if opts["pooling"] == "pooler" and embedder.bert.pooler is None:
        raise CheckpointError(f"{str(head_path)!r} pools through the pooler, which the embedder's encoder lacks")
    sd = read_state_dict(head_path)
    cfg = BertConfig.from_dict(opts["raw"])
    num_labels = sd["classifier.weight"].shape[0]
    check_state_dict(sd, {"classifier.weight": (num_labels, cfg.hidden_size), "classifier.bias": (num_labels,)},
                     source=str(head_path))
    head = BertClassifier(cfg, embedder.bert, embedder.tokenizer, sd["classifier.weight"], sd["classifier.bias"],
                          None, pooling=opts["pooling"], normalize=opts["normalize"])
    if quantize == "int8":  # as a classifier loaded on its own: every linear, the head's too
        head.classifier.quantize()
    head.quantization = embedder.quantization
    return head


class EmbedderWithHeads:
    """One encoder serving two model slots: ``embed``/``embed_ids`` run the
    embedder, ``classify``/``classify_ids`` a classification head trained on
    that same frozen encoder (``head_on``). The server uses it when the
    configured classifier is such a head (the shipped ``tallow:sentiment`` on
    MiniLM): one process and one copy of the weights instead of two."""

    def __init__(self, embedder: "BertEmbedder", classifier: BertClassifier):
        self.embedder = embedder
        self.classifier = classifier
        self.heads = {"classifier": classifier}

    def embed(self, *args, **kwargs):
        return self.embedder.embed(*args, **kwargs)

    def embed_ids(self, *args, **kwargs):
        return self.embedder.embed_ids(*args, **kwargs)

    def classify(self, *args, **kwargs):
        return self.classifier.classify(*args, **kwargs)

    def classify_ids(self, *args, **kwargs):
        return self.classifier.classify_ids(*args, **kwargs)

    def __repr__(self) -> str:
        return f"EmbedderWithHeads({self.embedder!r}, classifier={self.classifier!r})"
