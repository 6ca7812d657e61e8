"""[[functions]] in tallow.toml: bad entries fail at start, naming the entry."""

from __future__ import annotations

from pathlib import Path

import pytest

from fn_helpers import GUESTS

from tallow.serve import ConfigError, load_config


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "tallow.toml"
    p.write_text(text)
    return p


def entry(**kw) -> str:
    kw.setdefault("module", str(GUESTS / "hello.wat"))
    kw.setdefault("route", "/hello")
    kw.setdefault("name", "hello")
    lines = ["[[functions]]"]
    for k, v in kw.items():
        lines.append(f"{k} = {v!r}".replace("'", '"') if not isinstance(v, str) else f'{k} = "{v}"')
    return "\n".join(lines) + "\n"


def test_good_manifest_relative_module_and_limits(tmp_path):
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "hello.wat").write_text((GUESTS / "hello.wat").read_text())
    cfg = load_config(write(tmp_path, entry(module="g/hello.wat", route="/hi/...") +
                            "[functions.limits]\ndeadline_ms = 250\nmemory_mib = 16\n"
                            "[kv]\nstores = [\"default\", \"todo\"]\nmax_keys = 10\n"))
    (fn,) = cfg.functions
    assert fn.module == tmp_path / "g" / "hello.wat" and fn.wildcard and fn.base_route == "/hi"
    assert fn.limits.deadline_ms == 250.0 and fn.limits.memory_mib == 16 and fn.limits.fuel > 0
    assert fn.methods == ["GET", "POST"] and fn.kv_stores == ["default"] and fn.host_functions == []
    assert cfg.kv.stores == ["default", "todo"] and cfg.kv.max_keys == 10 and cfg.kv.max_key_bytes == 256


@pytest.mark.parametrize("text, message", [
    (entry(module="nowhere.wasm"), r"functions\[0\] \(hello\)\.module: no such file"),
    (entry(module="x.txt"), r"functions\[0\] \(hello\)\.module must end in \.wasm or \.wat"),
    (entry(host_functions=["run_shell"]), r"functions\[0\] \(hello\)\.host_functions: unknown host function 'run_shell'"),
    (entry(route="no-slash"), r"functions\[0\] \(hello\)\.route"),
    (entry(route="/a/{b}"), r"functions\[0\] \(hello\)\.route"),
    (entry(methods=["FETCH"]), r"functions\[0\] \(hello\)\.methods"),
    (entry(kv_stores=["secret"]), r"functions\[0\] \(hello\)\.kv_stores: no store named 'secret'"),
    (entry(colour="red"), r"functions\[0\] \(hello\): unknown setting 'colour'"),
    (entry(name="Bad Name"), r"functions\[0\] \(Bad Name\)\.name"),
    (entry() + "[functions.limits]\nfuel = -1\n", r"functions\[0\] \(hello\)\.limits\.fuel"),
    (entry() + "[functions.limits]\nspeed = 1\n", r"unknown setting functions\[0\] \(hello\)\.limits\.speed"),
    (entry() + entry(route="/other"), r"functions\[1\] \(hello\): the name is also used by functions\[0\]"),
    (entry() + entry(name="two"), r"functions\[1\] \(two\): route '/hello' clashes with functions\[0\] \(hello\)"),
    ("[kv]\nmax_keys = 0\n", r"kv\.max_keys"),
])
def test_bad_entries_name_themselves(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text))


def test_clash_with_builtin_route_and_missing_export_fail_at_start(tmp_path):
    from tallow.functions import FunctionConfigError
    from tallow.serve import create_app

    for route, name in (("/v1/embeddings", "emb"), ("/health", "health"), ("/v1/models/...", "models")):
        cfg = load_config(write(tmp_path, entry(name=name, route=route)), **{"data.dir": str(tmp_path / "d")})
        with pytest.raises(FunctionConfigError, match=rf"function '{name}': route .* clashes with the built-in"):
            create_app(config=cfg)
    cfg = load_config(write(tmp_path, entry(name="noexport", module=str(GUESTS / "noexport.wat"))),
                      **{"data.dir": str(tmp_path / "d")})
    with pytest.raises(FunctionConfigError, match=r"function 'noexport'.*does not export 'handle"):
        create_app(config=cfg)
