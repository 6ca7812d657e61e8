"""Frozen-encoder features for head-only training: the base BERT's pooled
hidden states, computed with tallow's inference kernels (the very path that
serves the trained head) and cached on disk per text (SHA-1 of the text), so
any subset or re-split of a corpus reuses them."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..models._checkpoint import weights_sha256  # noqa: F401  (re-exported)


def text_key(t: str) -> bytes:
    return hashlib.sha1(t.encode("utf-8", errors="surrogatepass")).digest()


def _cache_file(cache_dir, base_sha: str, pooling: str, normalize: bool) -> Path:
    tag = hashlib.sha256(f"{base_sha}|{pooling}|{normalize}".encode()).hexdigest()[:24]
    return Path(cache_dir) / f"features-{tag}.safetensors"


def pooled_features(embedder, texts: Sequence[str], *, pooling: str, normalize: bool,
                    cache_dir: Optional[str | Path] = None, base_sha: str = "", batch_size: int = 64,
                    log=print) -> torch.Tensor:
    """[N, hidden] pooled features of ``texts`` (truncated to the tokenizer's max_length)."""
    from safetensors.torch import load_file, save_file

    keys = [text_key(t) for t in texts]
    known: dict[bytes, int] = {}
    store_keys = torch.empty(0, 20, dtype=torch.uint8)
    store = torch.empty(0, embedder.config.hidden_size)
    path = _cache_file(cache_dir, base_sha, pooling, normalize) if cache_dir is not None else None
    if path is not None and path.is_file():
        st = load_file(str(path))
        store_keys, store = st["keys"], st["features"]
        known = {bytes(k.tolist()): i for i, k in enumerate(store_keys)}
    missing = list(dict.fromkeys(k for k in keys if k not in known))
    if missing:
        todo: dict[bytes, str] = {}
        missing_set = set(missing)
        for t, k in zip(texts, keys):
            if k in missing_set and k not in todo:
                todo[k] = t
        miss_texts = [todo[k] for k in missing]
        t0 = time.perf_counter()
        out = []
        step = 2048
        for i in range(0, len(miss_texts), step):
            out.append(embedder.embed(miss_texts[i:i + step], batch_size=batch_size, truncation=True,
                                      pooling=pooling, normalize=normalize))
            if len(miss_texts) > step:
                log(f"features: {min(i + step, len(miss_texts))}/{len(miss_texts)} texts "
                    f"({time.perf_counter() - t0:.0f} s)")
        new = torch.cat(out)
        new_keys = torch.tensor([list(k) for k in missing], dtype=torch.uint8)
        base = len(known)
        for j, k in enumerate(missing):
            known[k] = base + j
        store_keys = torch.cat([store_keys, new_keys])
        store = torch.cat([store, new])
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")  # torchrun: every rank may write it
            save_file({"keys": store_keys.contiguous(), "features": store.contiguous()}, str(tmp))
            tmp.replace(path)
    return store[torch.tensor([known[k] for k in keys], dtype=torch.long)] if keys else store[:0]
