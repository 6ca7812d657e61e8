"""HTTP serving benchmark: the current server against a baseline revision of
tallow, in one run on one machine (bounded: fixed request budgets and time
caps; it stops by itself).

    python benchmarks/bench_server.py [--quick] [--baseline-rev REV] [--current-extra-toml TOML]

    # the full run (~18 min on a quiet 2-core machine, ~3 of them the search scenario):
    # installed package vs 48259c5
    python benchmarks/bench_server.py
    # issue 22 (the server on the native encoder): against the code before it
    python benchmarks/bench_server.py --baseline-rev ecfa4bf --scenarios embeddings,search
    # a revision as "current" without installing it (same worktree trick)
    python benchmarks/bench_server.py --quick --current-rev serve15
    # more settings for one side (TOML text, '\n' allowed on one line, or @file)
    python benchmarks/bench_server.py --current-extra-toml '[generation]\nkv_cache_mb = 1024'
    # one scenario, current server only
    python benchmarks/bench_server.py --quick --no-baseline --scenarios generation

Two servers, started the same way (``python -m tallow serve --config X.toml``
subprocesses on a free loopback port, one at a time, alternating per
scenario, so every ratio comes from one run):

* **baseline**: the code of ``--baseline-rev`` (default 48259c5, the serving
  before issue 15). A detached ``git worktree`` of that revision is made in a
  temporary folder, the installed native module(s) (``tallow/_C*.so``) are
  copied into its ``python/tallow/`` and the server runs with
  ``PYTHONPATH=<worktree>/python``; a one-shot ``python -c`` with the same
  environment checks that ``tallow`` really comes from the worktree. The
  worktree is removed at the end, also on error.
* **current**: the installed ``tallow`` package (or ``--current-rev REV``,
  the same worktree trick). When its config knows the issue-15 sections,
  it gets ``[workers] mode = "process"`` and ``[generation] max_rows = 32``;
  ``--current-extra-toml`` / ``--baseline-extra-toml`` merge more settings.

Scenarios:

1. **embeddings**: POST /v1/embeddings (one sentence per request), 1/8/32
   closed-loop clients, dynamic batching on (max_batch_size 32, max_wait_ms 5)
   and off (max_batch_size 1), MiniLM fp32 and INT8.
2. **overload**: ``[batching.embeddings] max_queue = 32``, 128 clients that
   do not back off, 8 sentences per request; /health probed from a separate
   process, server RSS (process and children) sampled, Retry-After collected;
   compared with 32 clients of the same request shape.
3. **generation**: a GPT-2-124M-shaped model (random weights, a byte-level
   BPE tokenizer trained on the stdlib docstrings, padded to 50257 ids),
   32 closed-loop streaming clients (SSE) with a deterministic mix of prompt
   lengths, max_tokens and sampling settings; TTFT, inter-token latency and
   generated tokens/s. A request budget and a window cap (then the started
   requests finish, bounded too). The baseline runs with its default
   generate lane and with ``[batching.generate] max_batch_size = 32``;
   ``--gen-int8`` adds INT8 runs of both.
4. **search**: POST /v1/search (k 5, not hybrid), 1 closed-loop client,
   20 short natural-language queries cycled. Only the embedder is loaded
   (no classifier, generator or image model: /v1/search needs none, and the
   revisions' defaults differ), the feature cache off (``[cache] url =
   "none"``; it holds image features only: no revision caches query
   embeddings, so cycling 20 queries measures the whole path every time).
   The demo corpus ``make run`` indexes (``tallow.serve.demo``: the stdlib's
   module docstrings, the same list from this process's tallow to both
   servers) goes in through POST /v1/documents, the same way on both sides;
   the summed ingest summaries and each side's top hit per query are
   recorded. Three rounds (quick: 1), the servers one after the other, the
   order alternating; a later round restarts the server on the same data
   folder and posts the documents again, which must find all of them
   unchanged. p50 / p90 over all rounds' requests, requests/s, and
   current / baseline of p50 (pooled and per round). ``--search-precisions``
   (default fp32), ``--search-rounds``, ``--search-requests`` (default 200).

Client and server share this machine's cores, the same way for both servers,
so the ratios are what to read. The load generator is a minimal keep-alive
HTTP/1.1 client on asyncio streams (``RawClient``), chunked SSE included.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import importlib.util
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from harness import environment, percentile, results_dir  # noqa: E402

BASELINE_REV = "48259c5"  # main before issue 15 (serving at full speed)
EMBED_CONFIGS = {"on": {"max_batch_size": 32, "max_wait_ms": 5.0},
                 "off": {"max_batch_size": 1, "max_wait_ms": 0.0}}
TARGETS = {"batching_gain": 3.0, "current_vs_baseline_embeddings": 1.3, "overload_goodput_pct": 70.0,
           "health_p99_ms": 50.0, "gen_tokens_ratio": 2.0, "gen_ttft_p99_ratio": 0.5,
           "search_p50_ratio": 0.5}  # issue 22: /v1/search p50 at 1 client, current / baseline


# ----------------------------------------------------------------- processes

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` and all its descendants (worker processes)."""
    parent: dict[int, int] = {}
    rss: dict[int, float] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
            with open(f"/proc/{d}/statm") as f:
                pages = int(f.read().split()[1])
        except OSError:
            continue
        parent[int(d)] = int(stat.rsplit(")", 1)[1].split()[1])
        rss[int(d)] = pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    tree, frontier = {pid}, [pid]
    while frontier:
        p = frontier.pop()
        for child, par in parent.items():
            if par == p and child not in tree:
                tree.add(child)
                frontier.append(child)
    return sum(rss.get(p, 0.0) for p in tree)


def git(*args: str, cwd: Path = REPO) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


PROBE_CODE = """
import dataclasses, json, sys, tallow
from tallow.serve.config import ServeConfig
native, err = True, None
try:
    tallow.get_isa()
except Exception as exc:
    native, err = False, repr(exc)
print(json.dumps({"file": tallow.__file__, "version": getattr(tallow, "__version__", None),
                  "native": native, "native_error": err,
                  "sections": [f.name for f in dataclasses.fields(ServeConfig)]}))
"""


class CodeTree:
    """Where a server's ``tallow`` comes from: the installed package, or a
    detached git worktree of a revision with the installed native module(s)
    copied in (PYTHONPATH=<worktree>/python)."""

    def __init__(self, label: str, rev: str | None, tmp: Path):
        self.label, self.rev, self.path = label, rev, None
        self.commit = None
        if rev is None:
            self.describe = "installed package"
            with contextlib.suppress(Exception):
                self.commit = git("rev-parse", "--short", "HEAD")
                dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
                self.describe = f"installed package (repo HEAD {self.commit}{', dirty' if dirty else ''})"
        else:
            try:
                self.commit = git("rev-parse", "--short", f"{rev}^{{commit}}")
            except subprocess.CalledProcessError as exc:
                raise SystemExit(f"bench_server: cannot resolve {label} revision {rev!r} in {REPO} "
                                 f"({exc.stderr.strip()}); fetch it, pass another --{label}-rev, or run with "
                                 "--no-baseline (current server only)") from None
            self.path = tmp / f"tree-{label}"
            git("worktree", "add", "--detach", str(self.path), self.commit)
            self.describe = f"git worktree of {self.commit} ({git('log', '-1', '--format=%s', self.commit)[:70]})"
        try:
            if self.path is not None:
                self._graft_native()
            self.info = self.probe()
            if self.path is not None and not Path(self.info["file"]).resolve().is_relative_to(self.path.resolve()):
                raise RuntimeError(f"{label}: tallow imports from {self.info['file']}, "
                                   f"not from the worktree {self.path}")
            if not self.info.get("native", True):
                raise RuntimeError(f"{label}: the native module does not load with this code: "
                                   f"{self.info.get('native_error')}")
        except BaseException:
            self.close()
            raise
        if self.path is None and self.info["file"] != installed_tallow_dir().joinpath("__init__.py").as_posix():
            print(f"warning: {label} imports tallow from {self.info['file']}", flush=True)

    def _graft_native(self) -> None:
        src, dst = installed_tallow_dir(), self.path / "python" / "tallow"
        natives = sorted(src.glob("_C*.so"))
        if not natives:  # an editable install (scikit-build-core) keeps it in site-packages/tallow
            with contextlib.suppress(ImportError, ValueError):
                spec = importlib.util.find_spec("tallow._C")
                if spec is not None and spec.origin:
                    natives = sorted(Path(spec.origin).parent.glob("_C*.so"))
        if not natives:
            raise RuntimeError(f"no native module (_C*.so) in the installed tallow at {src}")
        for so in natives:
            shutil.copy2(so, dst / so.name)
        kernels = self.path / "kernels"  # the wheel ships them as tallow/kernels
        if kernels.is_dir() and not (dst / "kernels").exists():
            shutil.copytree(kernels, dst / "kernels")
        changed = git("diff", "--name-only", self.commit, "HEAD", "--", "csrc", "CMakeLists.txt")
        if changed:
            print(f"warning: {self.label} ({self.commit}): native sources differ from the checkout's HEAD "
                  f"({len(changed.splitlines())} files); it runs with the installed native module", flush=True)

    def env(self) -> dict:
        env = dict(os.environ)
        if self.path is not None:
            env["PYTHONPATH"] = os.pathsep.join([str(self.path / "python")] +
                                                ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
            # An editable install's import hook (scikit-build-core, loaded by a .pth in every
            # interpreter) maps `tallow` to the checkout whatever PYTHONPATH says; it stands
            # aside in a process whose SKBUILD_EDITABLE_SKIP lists its build folder.
            skip = [f.path for f in sys.meta_path
                    if type(f).__module__.startswith("_editable_skbc_") and getattr(f, "path", None)]
            if skip:
                env["SKBUILD_EDITABLE_SKIP"] = os.pathsep.join(
                    ([env["SKBUILD_EDITABLE_SKIP"]] if env.get("SKBUILD_EDITABLE_SKIP") else []) + skip)
        return env

    def probe(self) -> dict:
        out = subprocess.run([sys.executable, "-c", PROBE_CODE], env=self.env(), cwd=tempfile.gettempdir(),
                             check=True, capture_output=True, text=True).stdout
        return json.loads(out.strip().splitlines()[-1])

    def summary(self) -> dict:
        return {"rev": self.rev, "commit": self.commit, "describe": self.describe, "tallow_file": self.info["file"],
                "config_sections": self.info["sections"]}

    def close(self) -> None:
        if self.path is not None:
            with contextlib.suppress(Exception):
                git("worktree", "remove", "--force", str(self.path))
            shutil.rmtree(self.path, ignore_errors=True)
            with contextlib.suppress(Exception):
                git("worktree", "prune")
            self.path = None


def installed_tallow_dir() -> Path:
    spec = importlib.util.find_spec("tallow")
    if spec is None or spec.origin is None:
        raise RuntimeError("tallow is not installed in this interpreter")
    return Path(spec.origin).parent


# -------------------------------------------------------------------- config

def deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a TOML basic string: JSON's escapes are TOML's
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def to_toml(d: dict, prefix: str = "") -> str:
    lines = []
    scalars = {k: v for k, v in d.items() if not isinstance(v, dict)}
    if scalars:
        if prefix:
            lines.append(f"[{prefix}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in scalars.items()]
        lines.append("")
    for k, v in d.items():
        if isinstance(v, dict):
            lines.append(to_toml(v, f"{prefix}.{k}" if prefix else k))
    return "\n".join(lines)


def parse_extra(texts: list[str]) -> dict:
    """--*-extra-toml values: TOML text, or @path of a TOML file; merged in order."""
    out: dict = {}
    for t in texts:
        text = Path(t[1:]).read_text() if t.startswith("@") else t
        if "\n" not in text:  # one shell line: '[workers]\nmode = "inline"'
            text = text.replace("\\n", "\n")
        out = deep_merge(out, tomllib.loads(text))
    return out


@dataclass
class Side:
    """One server under test: its code and the settings added to every config."""
    name: str
    tree: CodeTree
    extra: dict = field(default_factory=dict)

    def config(self, base: dict) -> dict:
        return deep_merge(base, self.extra)


# -------------------------------------------------------------------- server

class Server:
    def __init__(self, side: Side, workdir: Path, tag: str, base: dict):
        self.side, self.port = side, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cfg = side.config(deep_merge(base, {"server": {"port": self.port, "log_level": "warning"},
                                            "data": {"dir": str(workdir / f"{side.name}-{tag}"),
                                                     "demo_corpus": False}}))
        self.config_text = to_toml(cfg)
        path = workdir / f"{side.name}-{tag}.toml"
        path.write_text(self.config_text)
        self.log = workdir / f"{side.name}-{tag}.log"
        self._log = open(self.log, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "tallow", "serve", "--config", str(path)],
                                     env=side.tree.env(), cwd=workdir, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.started = time.monotonic()

    def log_tail(self, n: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        return ""

    def wait_ready(self, timeout: float = 900) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.side.name}: tallow serve exited with {self.proc.returncode}:\n"
                                   f"{self.log_tail()}\nconfig:\n{self.config_text}")
            with contextlib.suppress(OSError, http.client.HTTPException):
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                c.request("GET", "/ready")
                ok = c.getresponse().status == 200
                c.close()
                if ok:
                    return time.monotonic() - self.started
            time.sleep(0.3)
        raise RuntimeError(f"{self.side.name}: tallow serve did not become ready\n{self.log_tail()}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):  # leftover workers of this server's group
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._log.close()


@contextlib.contextmanager
def serving(side: Side, workdir: Path, tag: str, base: dict):
    server = Server(side, workdir, tag, base)
    try:
        secs = server.wait_ready()
        print(f"  [{side.name}:{tag}] ready in {secs:.1f} s", flush=True)
        yield server
    finally:
        server.stop()


# -------------------------------------------------------------------- client

class RawClient:
    """A minimal keep-alive HTTP/1.1 client on asyncio streams. The load
    generator shares the cores with the server; httpx costs ~1-2 ms of CPU
    per request, this a few tens of µs (the role wrk plays elsewhere).
    Reads Content-Length and chunked bodies, and streams server-sent events."""

    def __init__(self, url: str):
        host, port = url.removeprefix("http://").split(":")
        self.host, self.port = host, int(port)
        self.reader = self.writer = None

    async def _send(self, method: str, path: str, payload: dict | None) -> tuple[int, dict]:
        body = json.dumps(payload).encode() if payload is not None else b""
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\n"
        if payload is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        msg = (head + "\r\n").encode() + body
        for attempt in (0, 1):  # a reused connection the server closed: once more on a new one
            reused = self.writer is not None
            if not reused:
                self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            try:
                self.writer.write(msg)
                await self.writer.drain()
                raw = await self.reader.readuntil(b"\r\n\r\n")
                break
            except (OSError, asyncio.IncompleteReadError):
                await self.close()
                if not reused or attempt:
                    raise
        lines = raw.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        return int(lines[0][9:12]), headers

    async def _pieces(self, headers: dict):
        if headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    while (await self.reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                        pass
                    return
                yield (await self.reader.readexactly(size + 2))[:-2]
        elif "content-length" in headers:
            n = int(headers["content-length"])
            if n:
                yield await self.reader.readexactly(n)
        else:  # till the server closes
            while piece := await self.reader.read(65536):
                yield piece
            await self.close()

    async def _finish(self, headers: dict) -> None:
        if headers.get("connection", "").lower() == "close":
            await self.close()

    async def request(self, method: str, path: str, payload: dict | None = None) -> tuple[int, dict, bytes]:
        status, headers = await self._send(method, path, payload)
        body = b"".join([p async for p in self._pieces(headers)])
        await self._finish(headers)
        return status, headers, body

    async def post(self, path: str, payload: dict) -> tuple[int, bytes]:
        status, _, body = await self.request("POST", path, payload)
        return status, body

    async def stream(self, path: str, payload: dict, on_event) -> tuple[int, dict, bytes]:
        """POST and read server-sent events: ``on_event(data: bytes, t: float)``
        for each ``data:`` field as it arrives. A non-200 answer: its body."""
        status, headers = await self._send("POST", path, payload)
        if status != 200 or "text/event-stream" not in headers.get("content-type", ""):
            body = b"".join([p async for p in self._pieces(headers)])
            await self._finish(headers)
            return status, headers, body
        buf = b""
        async for piece in self._pieces(headers):
            t = time.perf_counter()
            buf += piece
            while (cut := buf.find(b"\n\n")) >= 0:
                event, buf = buf[:cut], buf[cut + 2:]
                for line in event.split(b"\n"):
                    if line.startswith(b"data:"):
                        on_event(line[5:].strip(), t)
        await self._finish(headers)
        return status, headers, b""

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()
        self.reader = self.writer = None


# ---------------------------------------------------------------- embeddings

async def load(url: str, clients: int, requests: int, texts: list[str], *, per_request: int = 1,
               max_seconds: float = 60.0) -> dict:
    """``clients`` closed loops (each waits for its answer) share a budget of ``requests``."""
    latencies: list[float] = []
    refused: list[float] = []
    retry_after: list[float] = []
    statuses: dict[int, int] = {}
    next_i = 0
    stop_at = time.monotonic() + max_seconds

    async def client():
        nonlocal next_i
        conn = RawClient(url)
        try:
            while next_i < requests and time.monotonic() < stop_at:
                i = next_i
                next_i += 1
                batch = [texts[(i * per_request + j) % len(texts)] for j in range(per_request)]
                t0 = time.perf_counter()
                try:
                    code, headers, _ = await conn.request("POST", "/v1/embeddings",
                                                          {"input": batch if per_request > 1 else batch[0]})
                except (OSError, asyncio.IncompleteReadError, ValueError):
                    code, headers = -1, {}
                    await conn.close()
                dt = time.perf_counter() - t0
                statuses[code] = statuses.get(code, 0) + 1
                if code == 200:
                    latencies.append(dt)
                elif code == 429:
                    refused.append(dt)
                    with contextlib.suppress(KeyError, ValueError):
                        retry_after.append(float(headers["retry-after"]))
        finally:
            await conn.close()

    t0 = time.perf_counter()
    await asyncio.gather(*[client() for _ in range(clients)])
    wall = time.perf_counter() - t0
    ok = statuses.get(200, 0)
    ms = lambda xs, q: round(percentile(xs, q) * 1000, 2) if xs else None  # noqa: E731
    return {"clients": clients, "requests": sum(statuses.values()), "ok": ok, "seconds": wall,
            "throughput_rps": ok / wall, "p50_ms": ms(latencies, 0.5), "p99_ms": ms(latencies, 0.99),
            "refused_p50_ms": ms(refused, 0.5), "retry_after": retry_after,
            "errors": {str(k): v for k, v in statuses.items() if k != 200}}


def embed_base(quantize: bool, lane: dict) -> dict:
    return {"models": {"quantize": "int8" if quantize else ""}, "batching": {"embeddings": dict(lane)}}


def run_embeddings(sides: list[Side], work: Path, texts: list[str], quick: bool,
                   precisions: list[str]) -> list[dict]:
    plan = [(1, 40 if quick else 150), (8, 80 if quick else 400), (32, 160 if quick else 800)]
    rows = []
    k = 0
    for precision in precisions:
        for batching, lane in EMBED_CONFIGS.items():
            k += 1
            for side in (sides if k % 2 else sides[::-1]):  # one after the other, the order alternating
                tag = f"emb-{precision}-{batching}"
                with serving(side, work, tag, embed_base(precision == "int8", lane)) as server:
                    asyncio.run(load(server.url, 4, 40, texts))  # warm the connection path
                    for clients, n in plan:
                        r = asyncio.run(load(server.url, clients, n, texts))
                        r.pop("retry_after")
                        rows.append({"server": side.name, "precision": precision, "batching": batching,
                                     "config": lane, **r})
                        print(f"  {side.name:8s} {precision} batching {batching:3s} clients={clients:3d}: "
                              f"{r['throughput_rps']:7.1f} req/s  p50 {r['p50_ms']} ms  p99 {r['p99_ms']} ms  "
                              f"errors {r['errors']}", flush=True)
    return rows


def embedding_summary(rows: list[dict], sides: list[str], precisions: list[str]) -> dict:
    def rps(server, precision, batching, clients=32):
        for r in rows:
            if (r["server"], r["precision"], r["batching"], r["clients"]) == (server, precision, batching, clients):
                return r["throughput_rps"]
        return None

    gain = {s: {p: {c: rps(s, p, "on", c) / rps(s, p, "off", c) for c in (1, 8, 32)
                    if rps(s, p, "on", c) and rps(s, p, "off", c)} for p in precisions} for s in sides}
    vs = {}
    if "baseline" in sides and "current" in sides:
        vs = {p: rps("current", p, "on") / rps("baseline", p, "on") for p in precisions
              if rps("current", p, "on") and rps("baseline", p, "on")}
    return {"batching_gain": gain, "current_vs_baseline_32": vs}


# ------------------------------------------------------------------ overload

PROBE_HEALTH = r"""
import http.client, json, sys, time
port, interval, seconds = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
health, depth, conn, n = [], [], None, 0
end = time.monotonic() + seconds
while time.monotonic() < end:
    for path in ("/health",) + (("/metrics",) if n % 5 == 4 else ()):
        t0 = time.perf_counter()
        try:
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("GET", path)
            r = conn.getresponse()
            body = r.read()
            code = r.status
        except Exception:
            code, body = -1, b""
            if conn is not None:
                conn.close()
            conn = None
        ms = (time.perf_counter() - t0) * 1000
        if path == "/health":
            health.append((code, ms))
        else:
            for line in body.decode("utf-8", "replace").splitlines():
                if line.startswith('tallow_queue_depth{lane="embeddings"}'):
                    depth.append(float(line.rsplit(" ", 1)[1]))
    n += 1
    time.sleep(max(0.0, interval - ms / 1000))
print(json.dumps({"health": health, "depth": depth}))
"""


async def overload(server: Server, texts: list[str], seconds: float, clients: int = 128) -> dict:
    """``clients`` clients (no back-off) against the queue, while a separate
    process probes /health and the server's memory (with its children) is sampled."""
    rss: list[float] = [tree_rss_mb(server.proc.pid)]
    done = asyncio.Event()

    async def sample_rss():
        while not done.is_set():
            rss.append(tree_rss_mb(server.proc.pid))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(done.wait(), 0.5)

    sampler = asyncio.create_task(sample_rss())
    storm = asyncio.create_task(load(server.url, clients, 10**9, texts, per_request=8, max_seconds=seconds))
    await asyncio.sleep(min(0.5, seconds / 4))  # let the queue fill
    prober = await asyncio.create_subprocess_exec(sys.executable, "-c", PROBE_HEALTH, str(server.port), "0.075",
                                                  str(max(0.5, seconds - 0.75)), stdout=asyncio.subprocess.PIPE)
    out, _ = await prober.communicate()
    result = await storm
    done.set()
    await sampler
    rss.append(tree_rss_mb(server.proc.pid))
    probe = json.loads(out or b'{"health": [], "depth": []}')
    health = probe["health"]
    ra = result.pop("retry_after")
    refused = result["errors"].get("429", 0)
    return {**result, "goodput_rps": result["ok"] / result["seconds"], "refused_rps": refused / result["seconds"],
            "health_ok": sum(1 for s, _ in health if s == 200), "health_probes": len(health),
            "health_p50_ms": percentile([ms for _, ms in health], 0.5) if health else None,
            "health_p99_ms": percentile([ms for _, ms in health], 0.99) if health else None,
            "health_max_ms": max(ms for _, ms in health) if health else None,
            "max_queue_depth_seen": max(probe["depth"]) if probe["depth"] else None,
            "retry_after_seen": len(ra),
            "retry_after_s": ({"min": min(ra), "median": statistics.median(ra), "max": max(ra)} if ra else None),
            "rss_mb_start": rss[0], "rss_mb_max": max(rss), "rss_mb_end": rss[-1]}


def run_overload(sides: list[Side], work: Path, texts: list[str], quick: bool) -> dict:
    seconds = 3.0 if quick else 12.0
    base = embed_base(False, {**EMBED_CONFIGS["on"], "max_queue": 32})
    out = {}
    for side in sides:
        with serving(side, work, "overload", base) as server:
            asyncio.run(load(server.url, 8, 32, texts, per_request=8))  # warm up
            ref = asyncio.run(load(server.url, 32, 64 if quick else 320, texts, per_request=8,
                                   max_seconds=5 if quick else 20))
            ref.pop("retry_after")
            over = asyncio.run(overload(server, texts, seconds))
        over["storm_s"] = seconds
        over["reference_32_clients"] = ref
        over["goodput_pct_of_32_clients"] = 100 * over["goodput_rps"] / ref["throughput_rps"]
        out[side.name] = over
        print(f"  {side.name:8s} overload: goodput {over['goodput_rps']:.1f}/s "
              f"({over['goodput_pct_of_32_clients']:.0f}% of {ref['throughput_rps']:.1f}/s at 32 clients), "
              f"429 {over['refused_rps']:.1f}/s, /health p99 {fmt(over['health_p99_ms'])} ms "
              f"({over['health_ok']}/{over['health_probes']}), Retry-After {over['retry_after_s']}, "
              f"RSS max {over['rss_mb_max']:.0f} MB, errors {over['errors']}", flush=True)
    return out


# -------------------------------------------------------------------- search

SEARCH_K = 5
# Short natural-language questions about the demo corpus (the stdlib's module docstrings),
# cycled: neither revision caches query embeddings (the feature cache holds image features
# only), and 20 different ones keep any cache a later revision adds from deciding the result.
SEARCH_QUERIES = [
    "how do I parse command line arguments", "read and write CSV files", "compress data with gzip",
    "send an email message over SMTP", "run a subprocess and capture its output",
    "serialize Python objects to bytes", "parse JSON from a string", "work with dates and time zones",
    "generate random numbers from a distribution", "match text with regular expressions",
    "create a temporary file or directory", "log messages to a file", "run tasks concurrently with threads",
    "asynchronous I/O with an event loop", "compute a secure hash of data", "decode base64 encoded text",
    "a unit testing framework", "copy and move directory trees", "fetch a web page over HTTP",
    "exact decimal arithmetic for money",
]


def search_base(quantize: bool) -> dict:
    """Only the embedder: /v1/search needs no other model, and the two
    revisions' defaults differ there (HEAD loads SmolLM2 as its generator,
    ecfa4bf none); the feature cache off (it serves image features only)."""
    return {"models": {"quantize": "int8" if quantize else "", "classifier": "", "generator": "", "image": ""},
            "cache": {"url": "none"}}


async def ingest_documents(url: str, docs: list[dict], per_request: int = 10) -> dict:
    """The documents through the server's own POST /v1/documents; the summed
    ingest summaries (added / updated / unchanged, chunks)."""
    conn = RawClient(url)
    total = {"added": 0, "updated": 0, "unchanged": 0, "chunks": 0, "seconds": 0.0}
    try:
        for i in range(0, len(docs), per_request):
            status, body = await conn.post("/v1/documents", {"documents": docs[i:i + per_request]})
            if status != 200:
                raise RuntimeError(f"POST /v1/documents answered {status}: {body[:300].decode('utf-8', 'replace')}")
            got = json.loads(body)
            for key in total:
                total[key] += got.get(key) or 0
    finally:
        await conn.close()
    return total


async def search_load(url: str, queries: list[str], requests: int, max_seconds: float, k: int = SEARCH_K,
                      offset: int = 0) -> dict:
    """One closed-loop client: POST /v1/search with ``queries`` cycled
    (starting at ``offset``), ``requests`` of them or ``max_seconds``. A 200
    with fewer than ``k`` hits counts as an error ("short"): the index must
    hold the documents. Also the top hit's id per query."""
    latencies: list[float] = []
    took: list[float] = []
    statuses: dict[str, int] = {}
    top: dict[str, str | None] = {}
    conn = RawClient(url)
    stop_at = time.monotonic() + max_seconds
    t_start = time.perf_counter()
    n = 0
    try:
        while n < requests and time.monotonic() < stop_at:
            q = queries[(offset + n) % len(queries)]
            n += 1
            t0 = time.perf_counter()
            try:
                code, body = await conn.post("/v1/search", {"query": q, "k": k})
            except (OSError, asyncio.IncompleteReadError, ValueError):
                code, body = -1, b""
                await conn.close()
            dt = time.perf_counter() - t0
            key = str(code)
            if code == 200:
                got = json.loads(body)
                hits = got.get("hits") or []
                if len(hits) < k:
                    key = "short"
                else:
                    latencies.append(dt)
                    if got.get("took_ms") is not None:
                        took.append(got["took_ms"])
                    top.setdefault(q, hits[0].get("chunk_id"))
            statuses[key] = statuses.get(key, 0) + 1
    finally:
        await conn.close()
    wall = time.perf_counter() - t_start
    ms = lambda xs, q: round(percentile(xs, q) * 1000, 3) if xs else None  # noqa: E731
    return {"requests": n, "ok": len(latencies), "seconds": wall,
            "throughput_rps": len(latencies) / wall if wall > 0 else 0.0,
            "p50_ms": ms(latencies, 0.5), "p90_ms": ms(latencies, 0.9), "p99_ms": ms(latencies, 0.99),
            "server_took_p50_ms": round(percentile(took, 0.5), 3) if took else None,
            "latencies_ms": [round(x * 1000, 3) for x in latencies], "top_hit": top,
            "errors": {k_: v for k_, v in statuses.items() if k_ != "200"}}


def run_search(sides: list[Side], work: Path, quick: bool, precisions: list[str], rounds: int | None = None,
               requests: int | None = None) -> dict:
    """Per precision: ``rounds`` rounds, the two servers one after the other,
    the order alternating per round. The first round ingests the demo corpus
    through POST /v1/documents (the same documents, from this process's
    tallow, on both sides); later rounds restart the server on the same data
    directory and post them again, which must find every one unchanged."""
    from tallow.serve.demo import demo_documents

    docs = demo_documents()
    rounds = rounds or (1 if quick else 3)
    requests = requests or (30 if quick else 200)
    max_seconds = 15.0 if quick else 60.0
    out: dict = {"k": SEARCH_K, "queries": len(SEARCH_QUERIES), "documents": len(docs), "rounds": rounds,
                 "requests_per_round": requests, "max_seconds_per_round": max_seconds, "by_precision": {}}
    for precision in precisions:
        per_side: dict = {sd.name: {"rounds": [], "ingest": None} for sd in sides}
        for r in range(rounds):
            for side in (sides if r % 2 == 0 else sides[::-1]):
                with serving(side, work, f"search-{precision}", search_base(precision == "int8")) as server:
                    ing = asyncio.run(ingest_documents(server.url, docs))
                    got = ing["added"] + ing["updated"] + ing["unchanged"]
                    if got != len(docs) or (r > 0 and ing["unchanged"] != len(docs)):
                        raise RuntimeError(f"{side.name}: the index should hold the {len(docs)} demo documents "
                                           f"(round {r + 1}), the ingest said {ing}")
                    if r == 0:
                        per_side[side.name]["ingest"] = ing
                        print(f"  [{side.name}] ingested {len(docs)} documents, {ing['chunks']} chunks "
                              f"in {ing['seconds']:.1f} s", flush=True)
                    warm = asyncio.run(search_load(server.url, SEARCH_QUERIES, len(SEARCH_QUERIES), 120.0))
                    if warm["errors"]:
                        raise RuntimeError(f"{side.name}: search warm-up errors {warm['errors']}")
                    res = asyncio.run(search_load(server.url, SEARCH_QUERIES, requests, max_seconds,
                                                  offset=r * 7))
                    res["top_hit"] = warm["top_hit"]
                    per_side[side.name]["rounds"].append(res)
                    print(f"  {side.name:8s} search {precision} round {r + 1}: {res['throughput_rps']:6.1f} req/s  "
                          f"p50 {res['p50_ms']} ms  p90 {res['p90_ms']} ms  server took p50 "
                          f"{res['server_took_p50_ms']} ms  errors {res['errors']}", flush=True)
        out["by_precision"][precision] = search_summary(per_side)
    return out


def search_summary(per_side: dict) -> dict:
    """Each side's rounds pooled (p50 / p90 of all latencies, requests/s over
    all rounds' time), each round's p50, and current / baseline: the pooled
    p50s' ratio and each round's; top-hit agreement between the sides."""
    sides: dict = {}
    for name, d in per_side.items():
        lat = [x for r in d["rounds"] for x in r["latencies_ms"]]
        secs = sum(r["seconds"] for r in d["rounds"])
        errors: dict = {}
        for r in d["rounds"]:
            for k_, v in r["errors"].items():
                errors[k_] = errors.get(k_, 0) + v
        sides[name] = {"ok": len(lat), "seconds": secs,
                       "throughput_rps": len(lat) / secs if secs > 0 else 0.0,
                       "p50_ms": round(percentile(lat, 0.5), 3) if lat else None,
                       "p90_ms": round(percentile(lat, 0.9), 3) if lat else None,
                       "p99_ms": round(percentile(lat, 0.99), 3) if lat else None,
                       "round_p50_ms": [r["p50_ms"] for r in d["rounds"]],
                       "round_rps": [round(r["throughput_rps"], 2) for r in d["rounds"]],
                       "server_took_p50_ms": [r["server_took_p50_ms"] for r in d["rounds"]],
                       "errors": errors, "ingest": d["ingest"],
                       "top_hit": d["rounds"][0]["top_hit"] if d["rounds"] else {}}
    out: dict = {"sides": sides}
    b, c = sides.get("baseline"), sides.get("current")
    if b and c:
        if b["p50_ms"] and c["p50_ms"]:
            out["p50_ratio"] = c["p50_ms"] / b["p50_ms"]
        out["round_p50_ratios"] = [cp / bp for cp, bp in zip(c["round_p50_ms"], b["round_p50_ms"]) if cp and bp]
        shared = set(b["top_hit"]) & set(c["top_hit"])
        out["top_hit_agreement"] = [sum(b["top_hit"][q] == c["top_hit"][q] for q in shared), len(shared)]
    return out


# ---------------------------------------------------------------- generation

def save_generator(directory: Path) -> Path:
    """A GPT-2-124M-shaped model with random weights and a byte-level BPE
    tokenizer trained on the docstring corpus, padded with added tokens to the
    model's 50257 ids (every sampled id decodes to text)."""
    import torch
    from tokenizers import Tokenizer
    from transformers import GPT2Config, GPT2LMHeadModel

    from bench_models import _save_hf
    from registry import GPT2_124M
    from tallow.testing import train_byte_level_bpe

    directory.mkdir(parents=True, exist_ok=True)
    vocab = GPT2_124M["vocab"]
    train_byte_level_bpe(directory / "tokenizer.json", vocab_size=vocab)
    tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
    have = tok.get_vocab_size()
    tok.add_tokens([f"<x{i}>" for i in range(have, vocab)])
    assert tok.get_vocab_size() == vocab, tok.get_vocab_size()
    eos = tok.token_to_id("<|endoftext|>")
    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=GPT2_124M["hidden"], n_layer=GPT2_124M["layers"], n_head=GPT2_124M["heads"],
                     vocab_size=vocab, n_positions=GPT2_124M["ctx"], bos_token_id=eos, eos_token_id=eos)
    _save_hf(GPT2LMHeadModel(cfg).eval(), directory)
    tok.save(str(directory / "tokenizer.json"))
    return directory


SAMPLING_MIX = [  # (name, settings): cycled through the requests
    ("greedy", {"temperature": 0.0}),
    ("top_p", {"temperature": 0.8, "top_p": 0.95}),
    ("top_k", {"temperature": 1.0, "top_k": 40}),
    ("repetition", {"temperature": 0.7, "repetition_penalty": 1.2}),
    ("seed", {"temperature": 0.9, "seed": None}),  # the request's index
    ("stop", {"temperature": 0.8, "stop": ["ing"]}),
]


def request_mix(model_dir: Path, texts: list[str], n: int, quick: bool) -> list[dict]:
    """A deterministic list of streaming completion payloads: prompt lengths
    8-200 tokens (log-uniform), max_tokens 8-128 (quick: 4-32), sampling mixed."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    ids = tok.encode(" ".join(texts[:1500])).ids
    rng = random.Random(15)
    out = []
    for i in range(n):
        plen = int(round(8 * (200 / 8) ** rng.random()))
        start = rng.randrange(0, len(ids) - plen)
        name, settings = SAMPLING_MIX[i % len(SAMPLING_MIX)]
        payload = {"prompt": tok.decode(ids[start:start + plen]),
                   "max_tokens": rng.randint(4, 32) if quick else rng.randint(8, 128),
                   "stream": True, "stream_options": {"include_usage": True},
                   **{k: (i if k == "seed" else v) for k, v in settings.items()}}
        out.append({"kind": name, "prompt_tokens": plen, "payload": payload})
    return out


async def generation_load(url: str, specs: list[dict], clients: int, cap_s: float, drain_s: float = 60.0) -> dict:
    """``clients`` streaming closed loops share ``specs``. The measuring window
    ends at ``cap_s`` or when the budget runs out (the first client left
    without a request), whichever comes first: tokens/s counts the token
    events inside it, ITL the gaps that end inside it. Requests started in the
    window then finish (``drain_s`` at most, then they are cut), so that TTFT
    is known for every request started; one cut before its first token counts
    with the time it had waited (a lower bound, reported as censored)."""
    recs: list[dict] = []
    order = iter(range(len(specs)))
    t_start = time.perf_counter()
    stop_at = t_start + cap_s
    exhausted = [None]

    async def client():
        conn = RawClient(url)
        try:
            while time.perf_counter() < stop_at:
                i = next(order, None)
                if i is None:
                    exhausted[0] = exhausted[0] or time.perf_counter()
                    break
                rec = {"i": i, "kind": specs[i]["kind"], "status": None, "times": [], "text": 0, "usage": None,
                       "done": False, "error": None, "finish": None, "cut_after": None}
                recs.append(rec)
                t0 = rec["t0"] = time.perf_counter()

                def on_event(data: bytes, t: float, rec=rec):
                    if data == b"[DONE]":
                        rec["done"] = True
                        return
                    obj = json.loads(data)
                    if "error" in obj:
                        rec["error"] = str(obj["error"].get("message", "error"))[:200]
                        return
                    if obj.get("choices"):
                        rec["times"].append(t)
                        rec["text"] += len(obj["choices"][0].get("text") or "")
                        rec["finish"] = obj["choices"][0].get("finish_reason") or rec["finish"]
                    if obj.get("usage"):
                        rec["usage"] = obj["usage"]

                try:
                    status, _, body = await conn.stream("/v1/completions", specs[i]["payload"], on_event)
                    rec["status"] = status
                    if status != 200:
                        rec["error"] = f"{status} {body[:200].decode('utf-8', 'replace')}"
                except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                    rec["error"] = f"{type(exc).__name__}: {exc}"[:200]
                    await conn.close()
                except asyncio.CancelledError:
                    if not rec["times"]:
                        rec["cut_after"] = time.perf_counter() - t0
                    raise
        finally:
            await conn.close()

    tasks = [asyncio.create_task(client()) for _ in range(clients)]
    _, pending = await asyncio.wait(tasks, timeout=cap_s + drain_s)
    for t in pending:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    wall = time.perf_counter() - t_start
    end = min(stop_at, exhausted[0] or stop_at, t_start + wall)
    window = end - t_start
    done = [r for r in recs if r["done"] and not r["error"]]
    errors = [r for r in recs if r["error"]]
    in_window = sum(1 for r in recs for t in r["times"] if t <= end)
    mismatch = sum(1 for r in done if r["usage"] is None or r["usage"].get("completion_tokens") != len(r["times"]))
    ttft = [r["times"][0] - r["t0"] if r["times"] else r["cut_after"] for r in recs
            if r["times"] or r["cut_after"] is not None]
    gaps = [b - a for r in recs for a, b in zip(r["times"], r["times"][1:]) if b <= end]
    ms = lambda xs, q: round(percentile(xs, q) * 1000, 1) if xs else None  # noqa: E731
    by_kind: dict = {}
    for r in done:
        k = by_kind.setdefault(r["kind"], {"requests": 0, "tokens": 0, "finish_stop": 0})
        k["requests"] += 1
        k["tokens"] += len(r["times"])
        k["finish_stop"] += r["finish"] == "stop"
    return {"clients": clients, "window_s": window, "seconds": wall, "budget_ran_out": exhausted[0] is not None,
            "requests_started": len(recs), "requests_done": len(done),
            "requests_cut": sum(1 for r in recs if not r["done"] and not r["error"]), "errors": len(errors),
            "error_samples": sorted({r["error"] for r in errors})[:5], "tokens_in_window": in_window,
            "tokens_per_s": in_window / window if window > 0 else 0.0,
            "tokens_total": sum(len(r["times"]) for r in recs),
            "usage_tokens_done": sum((r["usage"] or {}).get("completion_tokens", 0) for r in done),
            "usage_mismatches": mismatch, "ttft_p50_ms": ms(ttft, 0.5), "ttft_p99_ms": ms(ttft, 0.99),
            "ttft_censored": sum(1 for r in recs if not r["times"] and r["cut_after"] is not None),
            "itl_p50_ms": ms(gaps, 0.5), "itl_p99_ms": ms(gaps, 0.99), "by_kind": by_kind}


def run_generation(runs: list[tuple[str, Side, dict, bool]], work: Path, texts: list[str], quick: bool,
                   clients: int, budget: int, cap_s: float, drain_s: float, failed: dict) -> dict:
    model_dir = work / "gpt2-124m-random"
    t0 = time.perf_counter()
    save_generator(model_dir)
    print(f"  generator saved in {time.perf_counter() - t0:.1f} s ({model_dir})", flush=True)
    specs = request_mix(model_dir, texts, budget, quick)
    warm = [{"kind": "warmup", "payload": {**s["payload"], "prompt": s["payload"]["prompt"][:80], "max_tokens": 4}}
            for s in specs[:6]]
    out = {}
    for label, side, lane, quantize in runs:
        base = {"models": {"generator": str(model_dir), "max_completion_tokens": 256,
                           "quantize": "int8" if quantize else ""},
                "batching": {"generate": lane}}
        try:
            with serving(side, work, f"gen-{label}", base) as server:
                w = asyncio.run(generation_load(server.url, warm, 3, 120, 0))
                if w["errors"]:
                    print(f"  warm-up errors: {w['error_samples']}", flush=True)
                r = asyncio.run(generation_load(server.url, specs, clients, cap_s, drain_s))
                r["rss_mb_end"] = tree_rss_mb(server.proc.pid)  # the server and its workers, KV caches included
        except Exception as exc:  # the other runs still count
            import traceback

            traceback.print_exc()
            failed[f"generation {label}"] = f"{type(exc).__name__}: {exc}"[-3000:]
            continue
        r["server"], r["lane"], r["precision"] = side.name, lane, "int8" if quantize else "fp32"
        out[label] = r
        print(f"  {label:14s} {r['tokens_per_s']:7.1f} tok/s  TTFT p50 {r['ttft_p50_ms']} p99 {r['ttft_p99_ms']} ms  "
              f"ITL p50 {r['itl_p50_ms']} p99 {r['itl_p99_ms']} ms  window {r['window_s']:.0f} s  "
              f"done {r['requests_done']} cut {r['requests_cut']} errors {r['errors']} "
              f"usage mismatches {r['usage_mismatches']} "
              f"{r['error_samples'] or ''}", flush=True)
    return out


# -------------------------------------------------------------------- report

def target(name: str, scenario: str, measured, goal: float, unit: str, op: str = ">=") -> dict:
    met = None if measured is None else (measured >= goal if op == ">=" else measured <= goal)
    return {"scenario": scenario, "name": name, "measured": measured, "target": goal, "unit": unit, "op": op,
            "met": met}


def format_target(t: dict) -> tuple[str, str]:
    """(goal, measured) cells: '≥ 3×', '3.41×'; '≤ 50 ms', '12.3 ms'; '≥ 70%', '81%'."""
    unit = t.get("unit", "×")
    spec = {"×": ".2f", "%": ".0f"}.get(unit, ".1f")
    sep = " " if unit == "ms" else ""
    goal = f"{'≥' if t['op'] == '>=' else '≤'} {t['target']:g}{sep}{unit}"
    return goal, ("not measured" if t["measured"] is None else f"{t['measured']:{spec}}{sep}{unit}")


def fmt(x, spec: str = ".1f", unit: str = "") -> str:
    return "—" if x is None else f"{x:{spec}}{unit}"


def yes_no(met) -> str:
    return "—" if met is None else ("yes" if met else "no")


def build_targets(emb: dict | None, over: dict | None, gen: dict | None, search: dict | None = None) -> list[dict]:
    ts = []
    if emb:
        for side, per in emb["batching_gain"].items():
            for p, gains in per.items():
                ts.append(target(f"embeddings {p}, 32 clients: batching on / off ({side})", "embeddings",
                                 gains.get(32), TARGETS["batching_gain"], "×"))
        for p, r in emb["current_vs_baseline_32"].items():
            ts.append(target(f"embeddings {p}, 32 clients, batching on: current / baseline", "embeddings", r,
                             TARGETS["current_vs_baseline_embeddings"], "×"))
    if over:
        for side, o in over.items():
            ts.append(target(f"overload goodput, % of 32-client throughput ({side})", "overload",
                             o["goodput_pct_of_32_clients"], TARGETS["overload_goodput_pct"], "%"))
            ts.append(target(f"overload /health p99 ({side})", "overload", o["health_p99_ms"],
                             TARGETS["health_p99_ms"], "ms", "<="))
    if gen and "current" in gen and "baseline" in gen:
        c, b = gen["current"], gen["baseline"]
        ts.append(target("generation tokens/s: current / baseline", "generation",
                         c["tokens_per_s"] / b["tokens_per_s"] if b["tokens_per_s"] else None,
                         TARGETS["gen_tokens_ratio"], "×"))
        ts.append(target("generation TTFT p99: current / baseline", "generation",
                         c["ttft_p99_ms"] / b["ttft_p99_ms"] if c["ttft_p99_ms"] and b["ttft_p99_ms"] else None,
                         TARGETS["gen_ttft_p99_ratio"], "×", "<="))
        if c["ttft_censored"] or b["ttft_censored"]:
            ts[-1]["note"] = (f"TTFT of streams cut before their first token is a lower bound (baseline "
                              f"{b['ttft_censored']}, current {c['ttft_censored']} of them)")
    for p, sm in ((search or {}).get("by_precision") or {}).items():
        if "baseline" in sm["sides"] and "current" in sm["sides"]:
            ts.append(target(f"search {p}, 1 client: p50 current / baseline", "search", sm.get("p50_ratio"),
                             TARGETS["search_p50_ratio"], "×", "<="))
    return ts


def markdown(result: dict) -> str:
    L = []
    s = result["servers"]
    L.append("Servers: " + "; ".join(f"**{k}** = {v['describe']}" for k, v in s.items()) + ".")
    L.append("")
    rows = result.get("embeddings_rows") or []
    if rows:
        L.append("**Embeddings** (POST /v1/embeddings, one sentence per request; batching on: max_batch_size 32, "
                 "max_wait_ms 5; off: max_batch_size 1)")
        L.append("")
        sides = list(dict.fromkeys(r["server"] for r in rows))
        L.append("| model | batching | clients | " + " | ".join(f"{sd} req/s (p50 / p99 ms)" for sd in sides)
                 + (" | current / baseline |" if len(sides) == 2 else " |"))
        L.append("|---|---|---|" + "---|" * len(sides) + ("---|" if len(sides) == 2 else ""))
        keys = list(dict.fromkeys((r["precision"], r["batching"], r["clients"]) for r in rows))
        for p, b, c in keys:
            cells, vals = [], []
            for sd in sides:
                r = next((r for r in rows if (r["server"], r["precision"], r["batching"], r["clients"]) ==
                          (sd, p, b, c)), None)
                vals.append(r["throughput_rps"] if r else None)
                err = sum(r["errors"].values()) if r else 0
                cells.append("—" if r is None else f"{r['throughput_rps']:.1f} ({fmt(r['p50_ms'])} / "
                             f"{fmt(r['p99_ms'])}){f', {err} errors' if err else ''}")
            ratio = (f" {vals[1] / vals[0]:.2f}× |" if len(sides) == 2 and all(vals) else
                     (" — |" if len(sides) == 2 else ""))
            L.append(f"| MiniLM {p} | {b} | {c} | " + " | ".join(cells) + " |" + ratio)
        L.append("")
    over = result.get("overload")
    if over:
        o0 = next(iter(over.values()))
        L.append(f"**Overload** (fp32, max_queue 32, 128 clients without back-off × 8 sentences, "
                 f"{o0.get('storm_s', o0['seconds']):.0f} s; /health probed every 75 ms from another process)")
        L.append("")
        L.append("| server | goodput (200/s) | refused (429/s) | 32 clients, same requests (req/s) | goodput % "
                 "| /health p99 ms (OK/probes) | 429 p50 ms | Retry-After min/median/max s "
                 "| RSS MB start → max → end "
                 "| other errors |")
        L.append("|---|---|---|---|---|---|---|---|---|---|")
        for sd, o in over.items():
            ra = o["retry_after_s"]
            ra_cell = f"{ra['min']:g} / {ra['median']:g} / {ra['max']:g}" if ra else "—"
            other = sum(v for k, v in o["errors"].items() if k != "429")
            L.append(f"| {sd} | {o['goodput_rps']:.1f} | {o['refused_rps']:.1f} | "
                     f"{o['reference_32_clients']['throughput_rps']:.1f} | {o['goodput_pct_of_32_clients']:.0f}% | "
                     f"{fmt(o['health_p99_ms'])} ({o['health_ok']}/{o['health_probes']}) | "
                     f"{fmt(o['refused_p50_ms'])} | {ra_cell} | {o['rss_mb_start']:.0f} → {o['rss_mb_max']:.0f} → "
                     f"{o['rss_mb_end']:.0f} | {other} |")
        L.append("")
    gen = result.get("generation")
    if gen:
        g0 = next(iter(gen.values()))
        L.append(f"**Generation** (GPT-2-124M shape, random weights, fp32 (`-int8` runs: INT8); "
                 f"{g0['clients']} streaming clients, "
                 f"closed loops; prompts 8–200 tokens, mixed max_tokens and sampling: greedy, top_p, top_k, "
                 f"repetition penalty, seed, stop; {result['generation_settings']['budget']} requests or "
                 f"{result['generation_settings']['cap_s']:.0f} s, then the started requests finish "
                 f"(≤ {result['generation_settings']['drain_s']:.0f} s); tokens/s and ITL inside the window, TTFT "
                 "of every request started)")
        L.append("")
        L.append("| run | server | generate lane | tokens/s | requests done (cut) | TTFT p50 / p99 ms "
                 "| ITL p50 / p99 ms | errors | usage ≠ events | RSS MB after |")
        L.append("|---|---|---|---|---|---|---|---|---|---|")
        for label, g in gen.items():
            lane = ", ".join(f"{k} {v}" for k, v in g["lane"].items()) or "defaults"
            L.append(f"| {label} | {g['server']} | {lane} | {g['tokens_per_s']:.1f} | {g['requests_done']} "
                     f"({g['requests_cut']}) | {fmt(g['ttft_p50_ms'], '.0f')} / {fmt(g['ttft_p99_ms'], '.0f')}"
                     f"{f' ({c} cut before a token: ≥)' if (c := g.get('ttft_censored')) else ''} "
                     f"| {fmt(g['itl_p50_ms'])} / {fmt(g['itl_p99_ms'])} | {g['errors']} | {g['usage_mismatches']} "
                     f"| {fmt(g.get('rss_mb_end'), '.0f')} |")
        L.append("")
    search = result.get("search")
    if search:
        L += search_markdown(search)
    if result["targets"]:
        L.append("**Targets**")
        L.append("")
        L.append("| scenario | measure | target | measured | met |")
        L.append("|---|---|---|---|---|")
        for t in result["targets"]:
            goal, measured = format_target(t)
            note = f" ({t['note']})" if t.get("note") else ""
            L.append(f"| {t['scenario']} | {t['name']} | {goal} | {measured}{note} | {yes_no(t['met'])} |")
        L.append("")
    for name, err in (result.get("failed") or {}).items():
        shown = " / ".join(err.splitlines()[:2])[:400].replace("`", "'")
        L.append(f"**{name} failed**: `{shown}` (see the run's log)")
        L.append("")
    L.append(DESIGN)
    return "\n".join(L) + "\n"


def search_markdown(search: dict) -> list[str]:
    L = [f"**Search** (POST /v1/search, k {search['k']}, 1 closed-loop client, {search['queries']} queries cycled; "
         f"the demo corpus ({search['documents']} stdlib module docstrings) ingested through POST /v1/documents; "
         f"{search['rounds']} round(s) of ≤ {search['requests_per_round']} requests per server, the order "
         "alternating; p50 / p90 over all rounds' requests)", ""]
    by = search["by_precision"]
    sides = list(dict.fromkeys(sd for sm in by.values() for sd in sm["sides"]))
    two = len(sides) == 2
    L.append("| precision | " + " | ".join(f"{sd} p50 / p90 ms (req/s)" for sd in sides)
             + (" | current / baseline p50 (each round) | top hit same |" if two else " |"))
    L.append("|---|" + "---|" * len(sides) + ("---|---|" if two else ""))
    for p, sm in by.items():
        cells = []
        for sd in sides:
            x = sm["sides"].get(sd)
            err = sum(x["errors"].values()) if x else 0
            cells.append("—" if x is None else f"{fmt(x['p50_ms'], '.2f')} / {fmt(x['p90_ms'], '.2f')} "
                         f"({x['throughput_rps']:.1f}){f', {err} errors' if err else ''}")
        extra = ""
        if two:
            rounds = ", ".join(f"{r:.2f}" for r in sm.get("round_p50_ratios") or [])
            same = sm.get("top_hit_agreement")
            extra = (f" {fmt(sm.get('p50_ratio'), '.2f', '×')} ({rounds or '—'}) |"
                     f" {f'{same[0]}/{same[1]}' if same else '—'} |")
        L.append(f"| MiniLM {p} | " + " | ".join(cells) + " |" + extra)
    chunks = {sd: x["ingest"]["chunks"] for sm in by.values() for sd, x in sm["sides"].items() if x.get("ingest")}
    if chunks:
        L.append("")
        L.append("Index: " + "; ".join(f"{sd} {n} chunks" for sd, n in chunks.items()) + ".")
    L.append("")
    return L


DESIGN = """**Design comparison.** The baseline runs the event loop and the models in one process: a forward
pass holds the GIL the event loop needs, completions batch only requests that arrive together with
identical settings and run to the batch's end (a seeded request runs alone), and a refused request is
parsed, validated and tokenized before the queue check refuses it. The current server changes three
things, each behind one part of the tables: (1) the models run in worker processes (`[workers]`): the
event loop no longer waits for the GIL behind a forward pass — the embeddings throughput line;
(2) completions are scheduled per decode step (Orca's iteration-level scheduling, as vLLM and TGI do):
a request joins the running batch at the next step with its prompt prefilled beside the decode (a
token budget per step, `generation.prefill_tokens_per_step`), a row leaves when it finishes, and every
row samples with its own settings and generator — the tokens/s and time-to-first-token lines; (3) a
full queue is refused before the body is read, and the refusal is held 250 ms so clients that ignore
Retry-After cannot turn refusals into a busy loop that starves the workers — the overload line.
Against vLLM's design: vLLM also splits the API server from the engine core (two processes over
ZeroMQ; here a socket pair with pickled messages and a shared-memory arena for large arrays) and also
mixes prefill into decode steps under a token budget (chunked prefill; here a prompt is prefilled whole,
prompts together up to the budget). Its KV cache is paged (PagedAttention: fixed-size blocks allocated
as a row grows, shareable between requests with a common prefix, rows preempted and recomputed or
swapped when blocks run out); tallow's pool is one rectangle per layer, slots x the longest
reservation, reserved at admission for prompt + max_tokens — no preemption is ever needed and a row's
decode reads a plain strided view, but memory is held for tokens a row may never produce and one long
request widens every slot. TGI puts a Rust router with the same kind of token budget in front of
Python model shards; Triton Inference Server schedules per model instance, as `workers.<model> = N`
does here (a call goes to the instance with the fewest in flight)."""


# ---------------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small budgets (a smoke run, ~5 min)")
    ap.add_argument("--baseline-rev", default=BASELINE_REV, help="revision served as the baseline (a git worktree)")
    ap.add_argument("--no-baseline", action="store_true", help="the current server only")
    ap.add_argument("--current-rev", default=None,
                    help="serve this revision as 'current' (worktree) instead of the installed package")
    ap.add_argument("--current-extra-toml", action="append", default=[],
                    help="TOML merged into every config of the current server (text, or @file); repeatable")
    ap.add_argument("--baseline-extra-toml", action="append", default=[], help="the same for the baseline")
    ap.add_argument("--current-workers-mode", default="process", choices=["process", "inline", "none"],
                    help="[workers] mode for the current server when its config has the section ('none': leave out)")
    ap.add_argument("--scenarios", default="embeddings,overload,search,generation")
    ap.add_argument("--precisions", default=None, help="embeddings: fp32,int8 (quick: fp32)")
    ap.add_argument("--search-precisions", default="fp32", help="search: fp32 and/or int8 (default fp32)")
    ap.add_argument("--search-rounds", type=int, default=None, help="search: rounds per server (default 3; quick 1)")
    ap.add_argument("--search-requests", type=int, default=None,
                    help="search: requests per round (default 200; quick 30)")
    ap.add_argument("--gen-clients", type=int, default=32)
    ap.add_argument("--gen-requests", type=int, default=None, help="request budget per server (default 256; quick 48)")
    ap.add_argument("--gen-seconds", type=float, default=None,
                    help="measuring window cap per server (default 120; quick 15)")
    ap.add_argument("--gen-drain", type=float, default=None,
                    help="at most this long for the started requests to finish (default 60; quick 8)")
    ap.add_argument("--no-gen-b32", action="store_true",
                    help="skip the baseline run with [batching.generate] max_batch_size = 32")
    ap.add_argument("--gen-int8", action="store_true", help="generation: INT8 runs of both servers too")
    ap.add_argument("--out", type=Path, default=None, help="result folder (default: this machine's results dir)")
    args = ap.parse_args()
    scenarios = [s for s in args.scenarios.split(",") if s]
    precisions = (args.precisions or ("fp32" if args.quick else "fp32,int8")).split(",")
    bad = [p for p in args.search_precisions.split(",") if p not in ("fp32", "int8")]
    if bad:
        ap.error(f"--search-precisions: {', '.join(map(repr, bad))} is not fp32 or int8")
    budget = args.gen_requests or (48 if args.quick else 256)
    cap_s = args.gen_seconds or (15.0 if args.quick else 120.0)
    drain_s = args.gen_drain if args.gen_drain is not None else (8.0 if args.quick else 60.0)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the finally below removes the worktrees
    from tallow.corpus import docstring_sentences

    texts = [s for s in docstring_sentences(4000) if 20 <= len(s) <= 200][:2000]
    t_all = time.perf_counter()
    trees: list[CodeTree] = []
    with tempfile.TemporaryDirectory(prefix="bench_server-") as tmp:
        work = Path(tmp)
        try:
            sides: list[Side] = []
            if not args.no_baseline:
                trees.append(CodeTree("baseline", args.baseline_rev, work))
                sides.append(Side("baseline", trees[-1], parse_extra(args.baseline_extra_toml)))
            trees.append(CodeTree("current", args.current_rev, work))
            cur = trees[-1]
            auto: dict = {}
            if "workers" in cur.info["sections"] and args.current_workers_mode != "none":
                auto["workers"] = {"mode": args.current_workers_mode}
            if "generation" in cur.info["sections"]:
                auto["generation"] = {"max_rows": 32}
            sides.append(Side("current", cur, deep_merge(auto, parse_extra(args.current_extra_toml))))
            for sd in sides:
                print(f"{sd.name}: {sd.tree.describe}; tallow from {sd.tree.info['file']}; "
                      f"extra config {sd.extra or '{}'}", flush=True)
            names = [sd.name for sd in sides]
            result: dict = {"servers": {sd.name: {**sd.tree.summary(), "extra_config": sd.extra} for sd in sides},
                            "quick": args.quick}
            emb = over = gen = search = None
            failed: dict[str, str] = {}

            def attempt(name: str, fn):
                """One scenario; a failure is recorded and the others still run."""
                if name not in scenarios:
                    return None
                print(name, flush=True)
                t0 = time.perf_counter()
                try:
                    return fn()
                except Exception as exc:  # keep what the other scenarios measured
                    import traceback

                    traceback.print_exc()
                    failed[name] = f"{type(exc).__name__}: {exc}"[-3000:]
                    return None
                finally:
                    result.setdefault("scenario_seconds", {})[name] = round(time.perf_counter() - t0, 1)
                    print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)

            rows = attempt("embeddings", lambda: run_embeddings(sides, work, texts, args.quick, precisions))
            if rows:
                emb = embedding_summary(rows, names, precisions)
                result["embeddings_rows"] = rows
                result["embeddings"] = emb
                # run_all's older keys: the current server's gains, {clients: gain}
                cg = emb["batching_gain"]["current"]
                result["batching_speedup"] = {str(c): g for c, g in cg.get("fp32", {}).items()}
                result["batching_speedup_int8"] = {str(c): g for c, g in cg.get("int8", {}).items()}
            over = attempt("overload", lambda: run_overload(sides, work, texts, args.quick))
            if over:
                result["overload"] = over
            search = attempt("search", lambda: run_search(sides, work, args.quick, args.search_precisions.split(","),
                                                          args.search_rounds, args.search_requests))
            if search:
                result["search"] = search
            runs = []
            by = {sd.name: sd for sd in sides}
            for q in ([False, True] if args.gen_int8 else [False]):
                sfx = "-int8" if q else ""
                if "baseline" in by:
                    runs.append((f"baseline{sfx}", by["baseline"], {}, q))
                    if not args.no_gen_b32 and not q:
                        runs.append(("baseline-b32", by["baseline"], {"max_batch_size": 32}, q))
                runs.append((f"current{sfx}", by["current"], {}, q))
            gen = attempt("generation", lambda: run_generation(runs, work, texts, args.quick, args.gen_clients,
                                                               budget, cap_s, drain_s, failed))
            if gen:
                result["generation"] = gen
                result["generation_settings"] = {"clients": args.gen_clients, "budget": budget, "cap_s": cap_s,
                                                 "drain_s": drain_s}
            result["targets"] = build_targets(emb, over, gen, search)
            result["failed"] = failed
        finally:
            for t in trees:
                t.close()
    env = environment()
    result = {"env": env, **result, "wall_s": time.perf_counter() - t_all}
    out = args.out or results_dir(env["machine"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "server.json").write_text(json.dumps(result, indent=2))
    md = markdown(result)
    (out / "server.md").write_text(md)
    print(md)
    print(f"wrote {out / 'server.json'} and server.md in {result['wall_s']:.0f} s", flush=True)
    if result["failed"]:
        sys.exit(f"bench_server: failed scenarios: {', '.join(result['failed'])}")


if __name__ == "__main__":
    main()
