"""Models from the Hugging Face Hub (issue 14, part 1), for real: the real
``huggingface_hub`` client downloads from a local stand-in of the Hub's file
API (fake_hub.py) through HF_ENDPOINT, into an HF_HOME of the test's own.
Nothing here reaches the real Hub: huggingface_hub's import-time default
endpoint is pointed at a closed port, so a request that forgot the endpoint
fails instead of leaving the machine."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fake_hub import FakeHub, read_dir

from tallow.models import (CheckpointError, HubAccessError, HubNotFoundError, HubOfflineError, ResNet50, load,
                           resolve)

WANTED = {"config.json", "model.safetensors", "tokenizer.json", "modules.json", "1_Pooling/config.json"}
SENTENCES = ["a quick test of the hub", "another sentence"]


def _tiny_embedder(out: Path, minilm_dir: Path, seed: int, hidden: int = 32) -> Path:
    """A tiny random sentence-transformers BERT (MiniLM's tokenizer and pooling
    files) plus the files a real repo has that tallow must not fetch."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    model = BertModel(cfg).eval()
    model.save_pretrained(out)
    for name in ("tokenizer.json", "modules.json", "1_Pooling/config.json", "vocab.txt", "README.md"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(minilm_dir / name, out / name)
    torch.save(model.state_dict(), out / "pytorch_model.bin")  # a pickle: never fetched unless asked
    (out / "onnx").mkdir(exist_ok=True)
    (out / "onnx" / "model.onnx").write_bytes(b"\0" * 1000)
    (out / "tf_model.h5").write_bytes(b"\0" * 1000)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory, minilm_dir, resnet_dir):
    root = tmp_path_factory.mktemp("hub-models")
    v1 = _tiny_embedder(root / "v1", minilm_dir, seed=11)
    # main's weights are 11.7 MB: over huggingface_hub's 10 MiB read chunk, so a
    # connection cut after the first chunk leaves something to resume from
    v2 = _tiny_embedder(root / "v2", minilm_dir, seed=12, hidden=96)
    pickle_only = root / "pickle-only"
    pickle_only.mkdir()
    for name in ("config.json", "tokenizer.json", "pytorch_model.bin"):
        shutil.copy(v1 / name, pickle_only / name)
    # microsoft/resnet-50's layout (ResNetForImageClassification), sharded safetensors
    from transformers import ResNetForImageClassification

    resnet = root / "resnet"
    ResNetForImageClassification.from_pretrained(resnet_dir).save_pretrained(resnet, max_shard_size="300KB")
    assert (resnet / "model.safetensors.index.json").is_file()
    return {"v1": v1, "v2": v2, "pickle_only": pickle_only, "resnet": resnet}


@pytest.fixture(scope="module")
def hub(models):
    h = FakeHub()
    h.v1 = h.add_commit("tallow-test/tiny-minilm", read_dir(models["v1"]), refs=("v1",))
    h.v2 = h.add_commit("tallow-test/tiny-minilm", read_dir(models["v2"]), refs=("main",))
    h.add_commit("tallow-test/gated", read_dir(models["v1"]), gated_token="hf_good_token")
    h.add_commit("tallow-test/pickle-only", read_dir(models["pickle_only"]))
    h.add_commit("tallow-test/resnet-50", read_dir(models["resnet"]))
    h.start()
    yield h
    h.stop()


@pytest.fixture
def hub_env(hub, tmp_path, monkeypatch):
    """HF_ENDPOINT -> the fake hub, a fresh HF_HOME, no token, online."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE",
                "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    # a request that does not use the endpoint tallow passes would go here: a closed port, not the Hub
    # (hf_hub_url swaps the import-time ENDPOINT prefix of its URL template for the endpoint passed)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        "http://127.0.0.1:9/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "not-the-cache"))
    hub.clear_log()
    hub.drop_once.clear()
    return tmp_path / "hf-home" / "hub"


def _embed(model) -> torch.Tensor:
    return torch.as_tensor(model.embed(SENTENCES))


def _fetched_files(hub, repo="tallow-test/tiny-minilm") -> set[str]:
    """Files of ``repo`` the client asked the Hub about (HEAD or GET on /resolve/;
    large files then come from the CDN)."""
    return {r.path.split("/resolve/", 1)[1].split("/", 1)[1] for r in hub.requested(contains=f"/{repo}/resolve/")}


def test_pull_cli_fetches_only_what_tallow_reads_resuming_a_dropped_download(hub, hub_env, models):
    """`tallow pull` in a subprocess with the real environment variables; the
    weights' download is cut mid-file once and resumed with a Range request."""
    chunk = 10 * 2**20  # huggingface_hub.constants.DOWNLOAD_CHUNK_SIZE: what it writes at a time
    hub.drop_once["tallow-test/tiny-minilm/model.safetensors"] = chunk + 2**19
    env = {**os.environ, "TALLOW_SET_OMP_WAIT_POLICY": "0"}
    proc = subprocess.run([sys.executable, "-m", "tallow", "pull", "tallow-test/tiny-minilm"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    snapshot = Path(proc.stdout.strip().splitlines()[-1])
    assert snapshot == hub_env / "models--tallow-test--tiny-minilm" / "snapshots" / hub.v2
    # only the files tallow reads: no pickle, no onnx/tf/README/vocab
    assert _fetched_files(hub) == WANTED
    assert {p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()} == WANTED
    # the interrupted download was resumed where it stopped, not restarted
    import hashlib

    weights = (models["v2"] / "model.safetensors").read_bytes()
    gets = hub.requested("GET", f"/cdn/{hashlib.sha256(weights).hexdigest()}")  # LFS files come from the CDN
    assert [g.range for g in gets] == [None, f"bytes={chunk}-"]
    assert (snapshot / "model.safetensors").read_bytes() == (models["v2"] / "model.safetensors").read_bytes()
    assert "Trying to resume download" in proc.stderr
    assert "Fetching 5 files: 100%" in proc.stderr  # huggingface_hub's progress bar

    # then load(id) uses the cache without a single request, and matches the local directory
    hub.clear_log()
    model = load("tallow-test/tiny-minilm")
    assert hub.requested() == []
    torch.testing.assert_close(_embed(model), _embed(load(models["v2"])), rtol=0, atol=0)


def test_load_by_id_downloads_when_not_cached_and_pins_revisions(hub, hub_env, models):
    main = _embed(load(models["v2"]))
    old = _embed(load(models["v1"]))
    assert main.shape[1] == 96 and old.shape[1] == 32  # two different models
    torch.testing.assert_close(_embed(load("tallow-test/tiny-minilm")), main, rtol=0, atol=0)
    assert _fetched_files(hub) == WANTED
    # a tag, a commit hash and the ID@REVISION form all pin the old weights
    torch.testing.assert_close(_embed(load("tallow-test/tiny-minilm", revision="v1")), old, rtol=0, atol=0)
    torch.testing.assert_close(_embed(load(f"tallow-test/tiny-minilm@{hub.v1}")), old, rtol=0, atol=0)
    assert (hub_env / "models--tallow-test--tiny-minilm" / "refs" / "v1").read_text() == hub.v1
    # the cache now serves both revisions offline
    hub.clear_log()
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        torch.testing.assert_close(_embed(load("tallow-test/tiny-minilm@v1")), old, rtol=0, atol=0)
        torch.testing.assert_close(_embed(load("tallow-test/tiny-minilm")), main, rtol=0, atol=0)
    finally:
        del os.environ["HF_HUB_OFFLINE"]
    assert hub.requested() == []
    with pytest.raises(ValueError, match="two revisions"):
        load("tallow-test/tiny-minilm@v1", revision="main")


def test_errors_name_the_id(hub, hub_env, monkeypatch):
    with pytest.raises(HubNotFoundError, match=r"no model 'tallow-test/nothing-here' on http://127\.0\.0\.1.*HF_TOKEN"):
        load("tallow-test/nothing-here")
    with pytest.raises(HubNotFoundError, match=r"'tallow-test/tiny-minilm' has no revision 'v9'"):
        load("tallow-test/tiny-minilm", revision="v9")
    # gated: 401 without a token, 403 with one that lacks access; HF_TOKEN opens it
    with pytest.raises(HubAccessError, match=r"'tallow-test/gated' is gated .*HF_TOKEN"):
        load("tallow-test/gated")
    monkeypatch.setenv("HF_TOKEN", "hf_wrong_token")
    with pytest.raises(HubAccessError, match=r"'tallow-test/gated' is gated"):
        load("tallow-test/gated")
    monkeypatch.setenv("HF_TOKEN", "hf_good_token")
    assert load("tallow-test/gated").config.hidden_size == 32  # v1's
    assert {r.authorization for r in hub.requested(contains="/tallow-test/gated/resolve/")} == {
        None, "Bearer hf_wrong_token", "Bearer hf_good_token"}
    cdn = hub.requested(contains="/cdn/")
    assert cdn and all(r.authorization is None for r in cdn)  # the token never leaves the Hub
    monkeypatch.delenv("HF_TOKEN")
    # offline and not cached; download=False and not cached; unreachable endpoint
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubOfflineError, match=r"'tallow-test/tiny-minilm' .*HF_HUB_OFFLINE is set: run `tallow pull "
                                              r"tallow-test/tiny-minilm`"):
        load("tallow-test/tiny-minilm")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(HubOfflineError, match=r"run `tallow pull tallow-test/tiny-minilm` first"):
        load("tallow-test/tiny-minilm", download=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(HubOfflineError, match=r"cannot reach http://127\.0\.0\.1:9 to download 'tallow-test/tiny-minilm'"):
        load("tallow-test/tiny-minilm")
    # pickles only when asked
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    with pytest.raises(HubNotFoundError, match=r"only as pytorch_model\.bin .*--allow-pickle"):
        load("tallow-test/pickle-only")
    assert "pytorch_model.bin" not in _fetched_files(hub, "tallow-test/pickle-only")
    assert load("tallow-test/pickle-only", allow_pickle=True).config.hidden_size == 32
    assert "pytorch_model.bin" in _fetched_files(hub, "tallow-test/pickle-only")


def test_cli_pull_reports_errors(hub, hub_env, capsys):
    from tallow.cli import main

    assert main(["pull", "tallow-test/nothing-here", "--revision", "v1"]) == 2
    assert "tallow pull: error: no model 'tallow-test/nothing-here'" in capsys.readouterr().err
    assert main(["pull", "not//an id"]) == 2
    assert "is not a Hugging Face Hub model id" in capsys.readouterr().err


def test_local_path_wins_and_bad_names_are_clear(hub, hub_env, models, tmp_path, monkeypatch):
    # a directory that happens to be called like an id is a path: the Hub is never asked
    monkeypatch.chdir(tmp_path)
    shutil.copytree(models["v1"], tmp_path / "tallow-test" / "tiny-minilm")
    assert resolve("tallow-test/tiny-minilm") == Path("tallow-test/tiny-minilm")
    torch.testing.assert_close(_embed(load("tallow-test/tiny-minilm")), _embed(load(models["v1"])), rtol=0, atol=0)
    assert hub.requested() == []
    for bad in ("not an id", "a/b--c", "x/y@", "@v1"):
        with pytest.raises(CheckpointError, match="neither an existing local path nor a Hugging Face Hub model id"):
            load(bad)
    # things that look like paths stay paths: a missing one says so, and nothing is asked of the Hub
    for missing in ("./models/gpt2", "data/models/gpt2", "resnet50.pth", "/nonexistent/model"):
        with pytest.raises(CheckpointError, match="does not exist"):
            load(missing)
    with pytest.raises(CheckpointError, match="does not exist"):
        load(Path("tallow-test/other"))  # a Path is never an id
    assert hub.requested() == []


def test_resnet_in_the_hf_layout_from_the_hub_matches_transformers(hub, hub_env, resnet_dir):
    """microsoft/resnet-50's layout: ResNetForImageClassification, here with
    sharded safetensors; tallow's ResNet matches transformers' own forward."""
    from transformers import ResNetForImageClassification

    model = load("tallow-test/resnet-50")
    assert isinstance(model, ResNet50)
    fetched = _fetched_files(hub, "tallow-test/resnet-50")
    assert "model.safetensors.index.json" in fetched and len([f for f in fetched if f.startswith("model-")]) >= 2
    hf = ResNetForImageClassification.from_pretrained(resnet_dir).eval()
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = hf(pixel_values=images).logits
    torch.testing.assert_close(model(images), expected, rtol=1e-4, atol=1e-4)


def test_sharded_safetensors_index_errors(tmp_path, models):
    d = tmp_path / "sharded"
    shutil.copytree(models["resnet"], d)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    (d / first).unlink()
    with pytest.raises(CheckpointError, match=f"names the shard '{first}', which is missing"):
        load(d)


def test_server_config_takes_a_hub_id(hub, hub_env, gpt2_dir, tmp_path):
    """models.generator = "<hub id>" in the server's config: loaded from the
    Hub cache (fetched once), answered on /v1/completions, named in /v1/models."""
    import time

    from fastapi.testclient import TestClient

    from tallow.serve import create_app, load_config

    hub.add_commit("tallow-test/tiny-gpt2", read_dir(gpt2_dir))
    cfg = load_config(**{"data.dir": str(tmp_path / "data"), "data.demo_corpus": False,
                         "models.generator": "tallow-test/tiny-gpt2", "models.warmup": False})
    with TestClient(create_app(config=cfg)) as client:
        deadline = time.monotonic() + 120
        while (r := client.get("/ready")).status_code != 200:
            assert time.monotonic() < deadline, r.json()
            time.sleep(0.2)
        r = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 4, "seed": 1})
        assert r.status_code == 200, r.text
        cards = {c["task"]: c for c in client.get("/v1/models").json()["data"]}
        assert cards["generator"]["path"] == "tallow-test/tiny-gpt2"
    assert "config.json" in _fetched_files(hub, "tallow-test/tiny-gpt2")
