"""Memory of `tallow serve` on make run's configuration (issue 21, item 7):
the server's whole process tree (server + model workers), VmRSS after one
/v1/classify call, with the sentiment head served by the embedder's workers
(one copy of MiniLM) and, for comparison, as before: in a worker of its own
(a second MiniLM).

    python benchmarks/bench_serve_memory.py [--classifier DIR]

``ready_s`` is the start-up time: from starting the process to the first
200 from /ready (polled every 0.1 s). ``--classifier`` serves another
classifier (e.g. data/sentiment/baselines/empythy-head, the head shipped
before issue 26) in place of tallow.toml's; its results go to
serve_memory-<name>.{json,md}.

Each layout is a fresh `tallow serve --config tallow.toml --no-demo` on a free
port and an empty data directory (the demo corpus would add the same index
to both). "separate" patches Services._classifier_on_the_embedder to say no,
which is exactly the layout the server had before the head was shared.
Writes results/<machine>/serve_memory.{json,md}.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from bench_functions import free_port, rss_mb  # noqa: E402
from harness import environment, results_dir  # noqa: E402

SEPARATE = "import tallow.serve.services as s; s.Services._classifier_on_the_embedder = lambda self: False; "
MAIN = "import sys; from tallow.cli import main; sys.exit(main(sys.argv[1:]))"


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


def _tree(pid: int) -> list[int]:
    return [pid] + [q for c in _children(pid) for q in _tree(c)]


def measure(layout: str, classifier=None) -> dict:
    port = free_port()
    with tempfile.TemporaryDirectory() as data:
        cmd = [sys.executable, "-c", (SEPARATE if layout == "separate" else "") + MAIN, "serve",
               "--config", str(ROOT / "tallow.toml"), "--port", str(port), "--data-dir", data, "--no-demo"]
        if classifier:
            cmd += ["--classifier", str(classifier)]
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 600
            while True:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=5).status_code == 200:
                        ready_s = time.monotonic() - t0
                        break
                except httpx.TransportError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"tallow serve ({layout}) did not become ready")
                time.sleep(0.1)
            r = httpx.post(f"http://127.0.0.1:{port}/v1/classify", json={"input": ["great", "awful"]}, timeout=60)
            r.raise_for_status()
            models = httpx.get(f"http://127.0.0.1:{port}/ready", timeout=5).json()["models"]
            pids = _tree(proc.pid)
            rss = {pid: round(rss_mb(pid), 1) for pid in pids}
            return {"layout": layout, "classifier": str(classifier or "tallow.toml's"), "ready_s": round(ready_s, 2),
                    "processes": len(pids), "rss_mib": rss, "total_mib": round(sum(rss.values()), 1),
                    "classifier_served_by": models["classifier"].get("served_by", "its own workers")}
        finally:
            proc.terminate()
            proc.wait(60)


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classifier", help="serve this classifier instead of tallow.toml's")
    args = ap.parse_args(argv)
    rows = [measure(layout, args.classifier) for layout in ("shared", "separate")]
    out = results_dir()
    out.mkdir(parents=True, exist_ok=True)
    name = "serve_memory" + (f"-{Path(args.classifier).name}" if args.classifier else "")
    (out / f"{name}.json").write_text(json.dumps({"env": environment(), "rows": rows}, indent=2))
    lines = ["| layout | classifier | processes | RSS of the process tree (MiB) | ready after (s) | classifier served by |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['layout']} | {r['classifier']} | {r['processes']} | {r['total_mib']:.0f} | {r['ready_s']:.1f} | "
              f"{r['classifier_served_by']} |" for r in rows]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
