"""Models from the Hugging Face Hub, by id (``namespace/name``), through
``huggingface_hub`` into its standard cache.

The rule (README "Models from the Hugging Face Hub"):

- A local path always wins: a string that names an existing file or
  directory is that path, and a ``pathlib.Path`` is always a path.
- Otherwise a valid Hub id (``openai-community/gpt2``, optionally
  ``ID@REVISION``) is a request for that model, as in ``transformers``:
  if a complete snapshot of that revision is in the cache it is used with
  no network access at all; if not, the files tallow reads are downloaded
  — unless ``download=False`` or ``HF_HUB_OFFLINE=1``, which make a cache
  miss an error that says to run ``tallow pull ID``.
- ``tallow pull ID [--revision R]`` (:func:`pull`) always asks the Hub and
  brings the cache up to date with that revision.
- Anything else (not a path, not a valid id) is an error naming the string.

Only the files tallow reads are fetched: config.json, tokenizer.json,
safetensors weights (single or sharded), and sentence-transformers'
modules.json and 1_Pooling/config.json. Pickled weights
(pytorch_model.bin) only with ``allow_pickle=True`` / ``--allow-pickle``.

Environment, read at each call: ``HF_ENDPOINT`` (default
https://huggingface.co), ``HF_HOME`` / ``HF_HUB_CACHE`` (the cache),
``HF_HUB_OFFLINE`` and ``HF_TOKEN`` (gated and private models).

Errors name the id: :class:`HubNotFoundError` (no such model, revision or
file), :class:`HubAccessError` (gated or private: 401/403),
:class:`HubOfflineError` (offline, unreachable or ``download=False``, and
not cached), all :class:`HubError` (a ``RuntimeError``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from .._extras import import_extra
from ._checkpoint import CheckpointError

FILES = ("config.json", "tokenizer.json", "modules.json", "1_Pooling/config.json",
         "model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors")
PICKLE_FILES = ("pytorch_model.bin",)

# Strings that are clearly meant as paths even when they do not exist.
_PATH_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".json", ".onnx", ".ckpt")


class HubError(RuntimeError):
    """A model could not be had from the Hugging Face Hub; ``repo_id`` names it."""

    def __init__(self, message: str, repo_id: str, revision: Optional[str] = None):
        super().__init__(message)
        self.repo_id = repo_id
        self.revision = revision


class HubNotFoundError(HubError, FileNotFoundError):
    """No such model, revision or file on the Hub."""


class HubAccessError(HubError, PermissionError):
    """The model is gated or private and the token (HF_TOKEN) is missing or lacks access."""


class HubOfflineError(HubError, ConnectionError):
    """The model is not cached and may not or cannot be downloaded now."""


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def cache_dir() -> Path:
    """The standard Hub cache: HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(os.path.expandvars(explicit)).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def offline() -> bool:
    return (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or "").strip().upper() in (
        "1", "ON", "YES", "TRUE")


def is_repo_id(name: str) -> bool:
    """True for a syntactically valid Hub model id ("name" or "namespace/name"),
    by huggingface_hub's own rule (validate_repo_id). Every Hub path of tallow
    passes here first: without the ``hub`` extra this names it."""
    import_extra("huggingface_hub", "hub", f"{name!r} is no local path; loading it as a Hugging Face Hub id")
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return bool(name)


def parse_model_ref(name: str) -> tuple[str, Optional[str]] | None:
    """'ns/name' or 'ns/name@revision' -> (id, revision); None if not an id."""
    repo_id, sep, rev = name.partition("@")
    if sep and not rev:
        return None
    return (repo_id, rev or None) if is_repo_id(repo_id) else None


def _looks_like_path(name: str) -> bool:
    return (name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1
            or name.lower().endswith(_PATH_SUFFIXES))


def _patterns(allow_pickle: bool) -> list[str]:
    return list(FILES) + (list(PICKLE_FILES) if allow_pickle else [])


def _has_weights(snapshot: Path, allow_pickle: bool) -> bool:
    if (snapshot / "model.safetensors").is_file() or (snapshot / "model.safetensors.index.json").is_file():
        return True
    return allow_pickle and (snapshot / "pytorch_model.bin").is_file()


def _describe(repo_id: str, revision: Optional[str]) -> str:
    return f"{repo_id!r}" + (f" at revision {revision!r}" if revision else "")


def cached_snapshot(repo_id: str, revision: Optional[str] = None, *, allow_pickle: bool = False) -> Path | None:
    """The cached snapshot of ``repo_id`` at ``revision`` if it is complete
    (every file tallow reads that the Hub listed was downloaded); no network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        path = Path(snapshot_download(repo_id, revision=revision, cache_dir=str(cache_dir()),
                                      allow_patterns=_patterns(allow_pickle), local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, OSError):
        return None
    if (path / "config.json").is_file() and _has_weights(path, allow_pickle):
        return path
    return None


def pull(repo_id: str, revision: Optional[str] = None, *, allow_pickle: bool = False) -> Path:
    """Downloads (or brings up to date) the files tallow reads of ``repo_id`` at
    ``revision`` (branch, tag or commit; default main) into the Hub cache, with a
    progress bar; returns the snapshot directory. Always asks the Hub."""
    ref = parse_model_ref(repo_id)
    if ref is None:
        raise CheckpointError(f"{repo_id!r} is not a Hugging Face Hub model id (namespace/name, "
                              "e.g. 'openai-community/gpt2')")
    repo_id, at_rev = ref
    revision = _one_revision(repo_id, at_rev, revision)
    what = _describe(repo_id, revision)
    ep = endpoint()
    if offline():
        raise HubOfflineError(f"cannot download {what}: HF_HUB_OFFLINE is set (unset it, or copy the model into "
                              f"the cache {str(cache_dir())!r})", repo_id, revision)

    from huggingface_hub import get_cached_repo_tree, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)

    token_hint = "" if os.environ.get("HF_TOKEN") else "; if it is private or gated, set HF_TOKEN"
    try:
        path = Path(snapshot_download(repo_id, revision=revision, cache_dir=str(cache_dir()), endpoint=ep,
                                      allow_patterns=_patterns(allow_pickle)))
    except GatedRepoError as exc:
        raise HubAccessError(f"{what} is gated on {ep}: accept its conditions on the model page and set HF_TOKEN "
                             f"to a token of an account that has access ({_status(exc)})", repo_id, revision) from exc
    except RevisionNotFoundError as exc:
        raise HubNotFoundError(f"{repo_id!r} has no revision {revision!r} on {ep}", repo_id, revision) from exc
    except RepositoryNotFoundError as exc:
        raise HubNotFoundError(f"no model {repo_id!r} on {ep}{token_hint} ({_status(exc)})", repo_id,
                               revision) from exc
    except RemoteEntryNotFoundError as exc:
        raise HubNotFoundError(f"a file of {what} is missing on {ep}: {exc}", repo_id, revision) from exc
    except LocalEntryNotFoundError as exc:  # connection refused, DNS, timeouts, 5xx: and not cached
        raise HubOfflineError(f"cannot reach {ep} to download {what}, and it is not in the cache "
                              f"{str(cache_dir())!r} ({_cause(exc)})", repo_id, revision) from exc
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status in (401, 403):
            raise HubAccessError(f"{ep} refused access to {what} (HTTP {status}): set HF_TOKEN to a token with "
                                 "access", repo_id, revision) from exc
        raise HubError(f"downloading {what} from {ep} failed: {exc}", repo_id, revision) from exc

    if not (path / "config.json").is_file():
        raise HubNotFoundError(f"{what} has no config.json: not a model tallow can load", repo_id, revision)
    if not _has_weights(path, allow_pickle):
        try:
            listed = {f.path for f in get_cached_repo_tree(repo_id, revision=path.name, cache_dir=str(cache_dir()))}
        except Exception:  # the listing is only for the message
            listed = set()
        if not allow_pickle and listed & set(PICKLE_FILES):
            raise HubNotFoundError(f"{what} publishes its weights only as pytorch_model.bin (a pickle); tallow "
                                   f"fetches pickles only when asked: `tallow pull {repo_id} --allow-pickle` or "
                                   "load(..., allow_pickle=True)", repo_id, revision)
        raise HubNotFoundError(f"{what} has no weights tallow reads (model.safetensors, sharded safetensors"
                               f"{', pytorch_model.bin' if allow_pickle else ''})", repo_id, revision)
    return path


def resolve(name: str | os.PathLike, *, revision: Optional[str] = None, download: bool = True,
            allow_pickle: bool = False) -> Path:
    """A local path, or the cached snapshot of a Hub id (downloaded first if
    it is not cached and ``download`` and not HF_HUB_OFFLINE). See the module
    docstring for the rule."""
    if isinstance(name, os.PathLike):
        if revision is not None:
            raise ValueError(f"revision={revision!r} applies to Hub ids, not to the local path {os.fspath(name)!r}")
        return Path(name)
    if not isinstance(name, str):
        raise TypeError(f"a model is a local path or a Hub id (str), got {type(name).__name__}")
    if not name.strip():
        raise CheckpointError("the model path or Hub id is empty")
    local = Path(name).expanduser()
    if local.exists() or _looks_like_path(name):
        if revision is not None:
            raise ValueError(f"revision={revision!r} applies to Hub ids, not to the local path {name!r}")
        return local
    ref = parse_model_ref(name)
    if ref is None:
        raise CheckpointError(f"{name!r} is neither an existing local path nor a Hugging Face Hub model id "
                              "(namespace/name, e.g. 'openai-community/gpt2')")
    repo_id, at_rev = ref
    revision = _one_revision(repo_id, at_rev, revision)
    cached = cached_snapshot(repo_id, revision, allow_pickle=allow_pickle)
    if cached is not None:
        return cached
    what = _describe(repo_id, revision)
    if offline():
        raise HubOfflineError(f"{what} is not a local path and not in the Hugging Face cache {str(cache_dir())!r}, "
                              f"and HF_HUB_OFFLINE is set: run `tallow pull {repo_id}` where the Hub is reachable",
                              repo_id, revision)
    if not download:
        raise HubOfflineError(f"{what} is not a local path and not in the Hugging Face cache {str(cache_dir())!r}: "
                              f"run `tallow pull {repo_id}` first (download=False)", repo_id, revision)
    return pull(repo_id, revision, allow_pickle=allow_pickle)


def _one_revision(repo_id: str, at_rev: Optional[str], revision: Optional[str]) -> Optional[str]:
    if at_rev and revision and at_rev != revision:
        raise ValueError(f"two revisions for {repo_id!r}: {at_rev!r} (after @) and revision={revision!r}")
    return revision or at_rev


def _status(exc) -> str:
    resp = getattr(exc, "response", None)
    return f"HTTP {resp.status_code}" if resp is not None else type(exc).__name__


def _cause(exc: BaseException) -> str:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")
