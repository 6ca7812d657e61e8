"""The core/extras boundary (issue 25): with every extra's packages hidden, the
core (tallow, tallow.ops, tallow.models) works, and each extra-gated entry point
raises MissingExtraError naming its extra — at use, never at ``import tallow``.

The packages are hidden in a subprocess by wrapping every import finder, so they
look uninstalled to imports and to ``importlib.util.find_spec`` alike. The real
thing — a fresh venv with the wheel and only the core's dependencies — is
``make test-wheel`` (scripts/test_wheel.py); this is its fast guard in the suite.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

from tallow._extras import EXTRAS, MissingExtraError, import_extra, require

ROOT = Path(__file__).resolve().parents[1]


def _hide(modules: set[str]) -> str:
    return textwrap.dedent(
        f"""
        import sys
        HIDDEN = {sorted(modules)!r}
        class _Hide:
            def __init__(self, inner):
                self.inner = inner
            def find_spec(self, name, path=None, target=None):
                if name.partition(".")[0] in HIDDEN:
                    return None
                return self.inner.find_spec(name, path, target)
            def __getattr__(self, attr):
                return getattr(self.inner, attr)
        sys.meta_path[:] = [_Hide(f) for f in sys.meta_path]
        """
    )


ALL_EXTRA_MODULES = {m for modules in EXTRAS.values() for m in modules} | {"libsql"}


def _run(code: str, hidden: set[str] = ALL_EXTRA_MODULES, args: list[str] | None = None) -> dict:
    env = {**os.environ, "TALLOW_BACKEND": ""}
    proc = subprocess.run([sys.executable, "-c", _hide(hidden) + textwrap.dedent(code), *(args or [])],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_core_works_with_every_extra_missing():
    out = _run(
        """
        import json, torch, tallow
        report = tallow.info()
        from tallow import ops
        from tallow.models import load, minilm_path
        q = torch.randn(2, 3, 17, 32)
        attn = bool(torch.allclose(ops.attention(q, q, q), ops.attention_ref(q, q, q), atol=1e-4))
        model = load(minilm_path())
        emb = model.embed(["a sentence", "another one"])
        print(json.dumps({"extras": report["extras"], "native": report["native"]["available"], "attn": attn,
                          "emb": list(emb.shape), "norm": float(emb[0].norm())}))
        """
    )
    assert not any(out["extras"].values()), out["extras"]  # the hiding worked: info() sees none
    assert out["native"] and out["attn"]
    assert out["emb"] == [2, 384] and abs(out["norm"] - 1.0) < 1e-3


# (extra, code that uses one of its features); tests/wheel/check_installed_wheel.py runs
# the same probes in a real core-only venv.
GATED = [
    ("serve", "import tallow.serve"),
    ("serve", "from tallow.serve.app import create_app"),
    ("search", "from tallow.index.hnsw import HnswIndex; HnswIndex(4)"),
    ("search", "import tempfile, tallow; tallow.Engine(tempfile.mkdtemp(), embedder=None)"),
    ("qdrant", "from tallow.index.qdrant import QdrantIndex; QdrantIndex(4, location=':memory:')"),
    ("redis", "from tallow.cache import make_cache; make_cache('redis://127.0.0.1:1/0')"),
    ("functions", "from tallow.functions.runtime import Runtime"),
    ("hub", "from tallow.models import load; load('openai-community/gpt2')"),
    ("train", "from tallow.train.plots import plot_run; import tempfile; plot_run(tempfile.mkdtemp())"),
]


def probe(code: str) -> str:
    """A script running ``code`` that prints, as its last line, JSON {raised:
    the ImportError's class name or None, extra, message}."""
    return textwrap.dedent(
        f"""
        import json
        try:
            {code}
            print(json.dumps({{"raised": None}}))
        except ImportError as exc:
            print(json.dumps({{"raised": type(exc).__name__, "extra": getattr(exc, "extra", None),
                               "message": str(exc)}}))
        """
    )


@pytest.mark.parametrize("extra,code", GATED, ids=[f"{e}:{c[:40]}" for e, c in GATED])
def test_each_gated_feature_names_its_extra(extra, code):
    out = _run(probe(code))
    assert out["raised"] == "MissingExtraError", out
    assert out["extra"] == extra
    assert f"pip install 'tallow[{extra}]'" in out["message"]


@pytest.mark.parametrize("argv,extra", [(["serve", "--no-config"], "serve"),
                                        (["train", "convnet", "--epochs", "1", "--out", "{tmp}"], "train")])
def test_cli_names_the_missing_extra_without_a_traceback(argv, extra, tmp_path):
    code = _hide(ALL_EXTRA_MODULES) + "import sys; from tallow.cli import main; sys.exit(main(sys.argv[1:]))"
    argv = [a.format(tmp=tmp_path / "run") for a in argv]
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert f"pip install 'tallow[{extra}]'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_only_the_missing_extra_is_named():
    # serve installed, functions missing: the server imports; a function runtime names 'functions'
    out = _run(
        """
        import json
        import tallow.serve
        try:
            from tallow.functions.runtime import Runtime
            raised = None
        except ImportError as exc:
            raised = getattr(exc, "extra", None)
        print(json.dumps({"raised": raised}))
        """, hidden={"wasmtime"})
    assert out["raised"] == "functions"


def test_pyproject_extras_install_what_each_feature_imports():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]

    def names(reqs: list[str]) -> set[str]:
        out: set[str] = set()
        for req in reqs:
            name = req.split(";")[0].strip()
            for sep in "<>=![ ":
                name = name.split(sep)[0]
            if name == "tallow":  # tallow[search,...]: the named extras' requirements
                for inner in req.split("[", 1)[1].split("]", 1)[0].split(","):
                    out |= names(extras[inner.strip()])
            else:
                out.add(name.lower().replace("_", "-"))
        return out

    for extra, modules in EXTRAS.items():
        assert extra in extras, f"pyproject.toml has no extra {extra!r}"
        declared = names(extras[extra])
        for module, dist in modules.items():
            assert dist.lower().replace("_", "-") in declared, f"tallow[{extra}] does not install {dist} ({module})"
    assert names(extras["all"]) >= set().union(*(names(extras[e]) for e in EXTRAS))
    core = names(project["dependencies"])
    for dist in {d for modules in EXTRAS.values() for d in modules.values()}:
        assert dist.lower().replace("_", "-") not in core, f"{dist} belongs to an extra, not the core"


def test_helpers_check_their_arguments():
    with pytest.raises(ValueError, match="unknown extra"):
        require("nope", "x")
    with pytest.raises(MissingExtraError, match=r"pip install 'tallow\[hub\]'"):
        import_extra("surely_not_a_module_here", "hub", "a feature")
