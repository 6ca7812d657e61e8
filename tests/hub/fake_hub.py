"""A local stand-in for the Hugging Face Hub's file API, so that the real
``huggingface_hub`` client downloads through ``HF_ENDPOINT`` without ever
reaching the Hub. Threaded ``http.server`` on 127.0.0.1, speaking what
huggingface_hub 2.4 uses (read from its source: hf_api.model_info /
list_repo_tree, file_download.get_hf_file_metadata / http_get,
utils._http.hf_raise_for_status):

- ``GET /api/models/{id}/revision/{rev}``: model info JSON (id, sha, siblings).
- ``GET /api/models/{id}/tree/{rev}?recursive=...``: the file listing
  (type, path, size, oid, lfs for large files).
- ``HEAD|GET /{id}/resolve/{rev}/{path}``: a small file itself, with
  ``X-Repo-Commit``, ``ETag`` (its git blob sha1), ``Content-Length``; a
  large (LFS) file as the Hub does it: a 302 to a CDN on another host
  (127.0.0.2 here) carrying ``X-Repo-Commit``, ``X-Linked-Etag`` (sha256)
  and ``X-Linked-Size``; the CDN serves the bytes with ``Accept-Ranges``
  and answers Range requests 206 with ``Content-Range`` (and never needs
  the token, which the client must not send off the Hub).
- Errors as the Hub sends them: 404 with ``X-Error-Code: RepoNotFound``,
  ``RevisionNotFound`` or ``EntryNotFound``; a gated repo's metadata is
  public, its files answer 401 (no token) or 403 (another token) with
  ``X-Error-Code: GatedRepo``.
- Fault injection: a ``drop_once`` path gets the given number of bytes of
  its body, then the connection is closed mid-file (once), so the client
  has to resume.

Every request is logged (method, path, Range, Authorization) for the tests.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".h5", ".onnx", ".msgpack")


@dataclass
class Repo:
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sha -> {path: content}
    refs: dict[str, str] = field(default_factory=dict)  # branch/tag -> sha
    gated_token: str | None = None  # gated: only this bearer token may read


@dataclass
class Request:
    method: str
    path: str
    range: str | None
    authorization: str | None


def commit_sha(n: int, repo_id: str) -> str:
    return hashlib.sha1(f"{repo_id}:{n}".encode()).hexdigest()


def read_dir(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[Request] = []
        self._blobs: dict[str, tuple[str, bytes]] = {}  # sha256 -> ("repo_id/path", bytes), for the CDN
        # "repo_id/path" -> bytes sent before the connection is cut, on that file's next full GET
        self.drop_once: dict[str, int] = {}
        self._lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                hub._handle(self, head=True)

            def do_GET(self):
                hub._handle(self, head=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.cdn = ThreadingHTTPServer(("127.0.0.2", 0), Handler)  # another host: the Hub's CDN
        for srv in (self.server, self.cdn):
            srv.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.cdn_url = f"http://127.0.0.2:{self.cdn.server_address[1]}"
        self._threads = [threading.Thread(target=srv.serve_forever, daemon=True) for srv in (self.server, self.cdn)]

    # -- set-up ------------------------------------------------------------------------

    def add_commit(self, repo_id: str, files: dict[str, bytes], *, refs: tuple[str, ...] = ("main",),
                   gated_token: str | None = None) -> str:
        repo = self.repos.setdefault(repo_id, Repo())
        if gated_token is not None:
            repo.gated_token = gated_token
        sha = commit_sha(len(repo.commits), repo_id)
        repo.commits[sha] = dict(files)
        for ref in refs:
            repo.refs[ref] = sha
        return sha

    def start(self) -> "FakeHub":
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        for srv in (self.server, self.cdn):
            srv.shutdown()
            srv.server_close()

    def requested(self, method: str | None = None, contains: str = "") -> list[Request]:
        with self._lock:
            return [r for r in self.requests if (method is None or r.method == method) and contains in r.path]

    def clear_log(self) -> None:
        with self._lock:
            self.requests.clear()

    # -- serving -----------------------------------------------------------------------

    def _handle(self, h: BaseHTTPRequestHandler, *, head: bool) -> None:
        url = urlsplit(h.path)
        path = unquote(url.path)
        with self._lock:
            self.requests.append(Request("HEAD" if head else "GET", path, h.headers.get("Range"),
                                         h.headers.get("Authorization")))
        try:
            if path.startswith("/cdn/"):
                self._cdn(h, path[len("/cdn/"):], head)
            elif path.startswith("/api/models/"):
                self._api(h, path[len("/api/models/"):], head)
            elif "/resolve/" in path:
                self._resolve(h, path.lstrip("/"), head)
            else:
                self._error(h, 404, "RepoNotFound", "Not found", head=head)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _repo(self, h, repo_id: str, head: bool, *, files: bool = False) -> Repo | None:
        repo = self.repos.get(repo_id)
        if repo is None:
            self._error(h, 404, "RepoNotFound", "Repository not found", head=head)
            return None
        if files and repo.gated_token is not None:
            auth = h.headers.get("Authorization") or ""
            if not auth:
                self._error(h, 401, "GatedRepo", f"Access to model {repo_id} is restricted. You must have access "
                                                 "to it and be authenticated to access it. Please log in.", head=head)
                return None
            if auth != f"Bearer {repo.gated_token}":
                self._error(h, 403, "GatedRepo", f"Access to model {repo_id} is restricted and you are not in the "
                                                 "authorized list.", head=head)
                return None
        return repo

    def _commit(self, h, repo: Repo, rev: str, head: bool) -> str | None:
        sha = repo.refs.get(rev, rev if rev in repo.commits else None)
        if sha is None:
            self._error(h, 404, "RevisionNotFound", f"Invalid rev id: {rev}", head=head)
        return sha

    def _api(self, h, rest: str, head: bool) -> None:
        # {ns}/{name}/revision/{rev}  or  {ns}/{name}/tree/{rev}[/{path}]
        for kind in ("/revision/", "/tree/"):
            if kind in rest:
                repo_id, _, rev = rest.partition(kind)
                break
        else:
            repo_id, kind, rev = rest, "/revision/", "main"
        repo = self._repo(h, repo_id, head)
        if repo is None:
            return
        sha = self._commit(h, repo, rev, head)
        if sha is None:
            return
        files = repo.commits[sha]
        if kind == "/revision/":
            body = {"_id": sha[:24], "id": repo_id, "modelId": repo_id, "sha": sha, "private": False,
                    "gated": "manual" if repo.gated_token else False, "disabled": False, "downloads": 0,
                    "likes": 0, "tags": [], "lastModified": "2026-01-01T00:00:00.000Z",
                    "siblings": [{"rfilename": p} for p in sorted(files)]}
        else:
            body, dirs = [], set()
            for p, data in sorted(files.items()):
                parts = p.split("/")
                for i in range(1, len(parts)):
                    dirs.add("/".join(parts[:i]))
                entry = {"type": "file", "path": p, "size": len(data), "oid": _git_oid(data)}
                if p.endswith(LFS_SUFFIXES):
                    entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
                body.append(entry)
            body += [{"type": "directory", "path": d, "size": 0, "oid": hashlib.sha1(d.encode()).hexdigest()}
                     for d in sorted(dirs)]
        self._json(h, 200, body, head=head)

    def _resolve(self, h, rest: str, head: bool) -> None:
        repo_id, _, tail = rest.partition("/resolve/")
        rev, _, file_path = tail.partition("/")
        repo = self._repo(h, repo_id, head, files=True)
        if repo is None:
            return
        sha = self._commit(h, repo, rev, head)
        if sha is None:
            return
        data = repo.commits[sha].get(file_path)
        if data is None:
            self._error(h, 404, "EntryNotFound", f"{file_path} does not exist on \"{rev}\"", head=head,
                        extra={"X-Repo-Commit": sha})
            return
        if file_path.endswith(LFS_SUFFIXES):  # the Hub: a redirect to its CDN, the metadata on the 302
            sha256 = hashlib.sha256(data).hexdigest()
            with self._lock:
                self._blobs[sha256] = (f"{repo_id}/{file_path}", data)
            h.send_response(302)
            for k, v in {"X-Repo-Commit": sha, "ETag": f'"{sha256}"', "X-Linked-Etag": f'"{sha256}"',
                         "X-Linked-Size": str(len(data)), "Location": f"{self.cdn_url}/cdn/{sha256}",
                         "Content-Length": "0"}.items():
                h.send_header(k, v)
            h.end_headers()
            return
        headers = {"X-Repo-Commit": sha, "ETag": f'"{_git_oid(data)}"'}
        self._send_bytes(h, f"{repo_id}/{file_path}", data, headers, head)

    def _cdn(self, h, sha256: str, head: bool) -> None:
        with self._lock:
            blob = self._blobs.get(sha256)
        if blob is None:
            self._error(h, 404, None, "no such blob", head=head)
            return
        key, data = blob
        self._send_bytes(h, key, data, {"ETag": f'"{sha256}"'}, head)

    def _send_bytes(self, h, key: str, data: bytes, headers: dict, head: bool) -> None:
        """The bytes, with Range requests answered 206 (and the drop_once fault)."""
        headers = {**headers, "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        start, status = 0, 200
        rng = h.headers.get("Range")
        if rng and not head:
            start = int(rng.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                self._error(h, 416, None, "Requested range not satisfiable", head=head)
                return
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = data[start:]
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if head:
            return
        with self._lock:
            drop = self.drop_once.pop(key, None) if status == 200 else None
        if drop is not None:  # part of the body, then the connection goes away mid-file
            h.wfile.write(body[:drop])
            h.wfile.flush()
            h.close_connection = True
            import socket

            h.connection.shutdown(socket.SHUT_RDWR)
            return
        h.wfile.write(body)

    @staticmethod
    def _json(h, status: int, body, *, head: bool, extra: dict | None = None) -> None:
        data = json.dumps(body).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        for k, v in (extra or {}).items():
            h.send_header(k, v)
        h.end_headers()
        if not head:
            h.wfile.write(data)

    def _error(self, h, status: int, code: str | None, message: str, *, head: bool, extra: dict | None = None):
        headers = dict(extra or {})
        if code:
            headers["X-Error-Code"] = code
        headers["X-Error-Message"] = message
        self._json(h, status, {"error": message}, head=head, extra=headers)


def _git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
