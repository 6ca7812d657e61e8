"""A trainable BERT for full fine-tuning, in plain torch (autograd through
``F.scaled_dot_product_attention``). Its modules carry the Hugging Face
checkpoint names, so ``state_dict()`` is a BertForSequenceClassification
checkpoint that ``tallow.models.load`` serves on tallow's inference kernels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..models.bert import _HIDDEN_ACT, BertConfig


class _Embeddings(nn.Module):
    def __init__(self, c: BertConfig, dropout: float):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size, padding_idx=c.pad_token_id)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, ids):
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.word_embeddings(ids) + self.position_embeddings(pos)[None] + \
            self.token_type_embeddings(torch.zeros_like(ids))
        return self.dropout(self.LayerNorm(x))


class _SelfAttention(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.query = nn.Linear(c.hidden_size, c.hidden_size)
        self.key = nn.Linear(c.hidden_size, c.hidden_size)
        self.value = nn.Linear(c.hidden_size, c.hidden_size)


class _Output(nn.Module):
    def __init__(self, n_in: int, c: BertConfig):
        super().__init__()
        self.dense = nn.Linear(n_in, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)


class _Attention(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        setattr(self, "self", _SelfAttention(c))
        self.output = _Output(c.hidden_size, c)


class _Intermediate(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.intermediate_size)


class _Layer(nn.Module):
    def __init__(self, c: BertConfig, dropout: float):
        super().__init__()
        self.attention = _Attention(c)
        self.intermediate = _Intermediate(c)
        self.output = _Output(c.intermediate_size, c)
        self.heads, self.drop = c.num_attention_heads, dropout
        self.act = _HIDDEN_ACT[c.hidden_act]

    def forward(self, x, bias):
        b, l, h = x.shape
        sa = getattr(self.attention, "self")

        def split(t):  # [B, L, H] -> [B, heads, L, d]
            return t.view(b, l, self.heads, h // self.heads).transpose(1, 2)

        ctx = F.scaled_dot_product_attention(split(sa.query(x)), split(sa.key(x)), split(sa.value(x)),
                                             attn_mask=bias, dropout_p=self.drop if self.training else 0.0)
        ctx = ctx.transpose(1, 2).reshape(b, l, h)
        o = self.attention.output
        x = o.LayerNorm(x + F.dropout(o.dense(ctx), self.drop, self.training))
        y = self.intermediate.dense(x)
        y = F.relu(y) if self.act == "relu" else F.gelu(y, approximate="tanh" if self.act == "gelu_tanh" else "none")
        return self.output.LayerNorm(x + F.dropout(self.output.dense(y), self.drop, self.training))


class _Encoder(nn.Module):
    def __init__(self, c: BertConfig, dropout: float):
        super().__init__()
        self.layer = nn.ModuleList([_Layer(c, dropout) for _ in range(c.num_hidden_layers)])


class _Pooler(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.hidden_size)


class TrainableBert(nn.Module):
    def __init__(self, c: BertConfig, dropout: float = 0.1):
        super().__init__()
        self.config = c
        self.embeddings = _Embeddings(c, dropout)
        self.encoder = _Encoder(c, dropout)
        self.pooler = _Pooler(c)
        self.frozen_layers = -1  # -1: nothing frozen; k >= 0: the embeddings and layers [0, k) are

    def freeze_below(self, k: int) -> None:
        """Freezes the embeddings and the lowest ``k`` layers: they run without
        gradients and without dropout (eval mode), so only the top layers learn
        and a step costs their backward alone."""
        if not 0 <= k <= len(self.encoder.layer):
            raise ValueError(f"can freeze 0..{len(self.encoder.layer)} layers, not {k}")
        self.frozen_layers = k
        for m in [self.embeddings, *self.encoder.layer[:k]]:
            m.requires_grad_(False)
        self.train(self.training)

    def frozen_modules(self) -> list:
        return [self.embeddings, *self.encoder.layer[:self.frozen_layers]] if self.frozen_layers >= 0 else []

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self.frozen_modules():
            m.eval()
        return self

    def forward(self, input_ids, attention_mask):
        k = max(self.frozen_layers, 0)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.frozen_layers < 0):
            x = self.embeddings(input_ids)
            # additive mask: 0 for tokens, -inf-like for padding (broadcast over heads and queries)
            bias = (attention_mask[:, None, None, :] == 0).to(x.dtype) * torch.finfo(x.dtype).min
            for layer in self.encoder.layer[:k]:
                x = layer(x, bias)
        for layer in self.encoder.layer[k:]:
            x = layer(x, bias)
        return x


class BertForClassificationTrain(nn.Module):
    """Encoder + pooling + linear head; ``state_dict()`` keys are HF's
    (``bert.*``, ``classifier.*``)."""

    def __init__(self, c: BertConfig, num_labels: int, *, pooling: str = "mean", normalize: bool = False,
                 dropout: float = 0.1):
        super().__init__()
        self.bert = TrainableBert(c, dropout)
        self.classifier = nn.Linear(c.hidden_size, num_labels)
        self.pooling, self.normalize = pooling, normalize
        self.head_dropout = nn.Dropout(dropout)

    def forward(self, input_ids, attention_mask):
        h = self.bert(input_ids, attention_mask)
        if self.pooling == "pooler":
            p = torch.tanh(self.bert.pooler.dense(h[:, 0]))
        elif self.pooling == "cls":
            p = h[:, 0]
        else:
            m = attention_mask.to(h.dtype).unsqueeze(-1)
            p = (h * m).sum(1) / m.sum(1).clamp_min(1e-9)
        if self.normalize:
            p = F.normalize(p, p=2, dim=1)
        return self.classifier(self.head_dropout(p))

    def load_encoder(self, sd: dict) -> None:
        """Encoder weights from a BERT checkpoint (keys with or without 'bert.')."""
        enc = {k[5:] if k.startswith("bert.") else k: v for k, v in sd.items()}
        enc = {k: v for k, v in enc.items() if not k.startswith("classifier.") and not k.endswith("position_ids")}
        own = self.bert.state_dict()
        if "pooler.dense.weight" not in enc:  # a checkpoint without pooler: keep the random init
            enc["pooler.dense.weight"], enc["pooler.dense.bias"] = own["pooler.dense.weight"], own["pooler.dense.bias"]
        missing = sorted(set(own) - set(enc))
        if missing:
            raise ValueError(f"the base checkpoint lacks encoder tensors: {', '.join(missing[:5])}")
        self.bert.load_state_dict({k: enc[k] for k in own})
