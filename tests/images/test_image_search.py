"""tallow.engine.images.ImageSearch: add / search / delete, filters, the
feature cache, persistence and reconciliation with the store, bad input,
concurrency. A small random ResNet (256-d features) stands in for ResNet-50:
its features of unrelated pictures are already ~0.99 cosine-similar (all
post-ReLU averages), so the tests assert rankings and thresholds close to 1,
not absolute scores of unrelated images."""

from __future__ import annotations

import io
import shutil
import struct
import threading
import zlib

import numpy as np
import pytest

from tallow.engine import IndexRebuiltWarning
from tallow.engine.images import HASH_KEY, MODEL_FILE, ImageInputError, ImageSearch, ImageSearchError
from tallow.store import MetadataStore


def make_image(seed: int, size: tuple[int, int] = (320, 240)):
    """A PIL RGB image: smooth random colour field + a few random shapes, so
    that different seeds give clearly different pictures."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    w, h = size
    # Low-frequency colour field: a small random grid upsampled.
    grid = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    img = Image.fromarray(grid).resize((w, h), Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
        x1, y1 = x0 + int(rng.integers(10, w // 2)), y0 + int(rng.integers(10, h // 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        else:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
    noise = rng.normal(0, 6, size=(h, w, 3))
    arr = np.clip(np.asarray(img, dtype=np.float64) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def encode(img, fmt: str = "JPEG", **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


N = 8
SAME = 0.9999  # the same bytes: cosine 1 up to float rounding


class CountingCache:
    """A dict with hit/miss counters: the duck type of tallow.cache.FeatureCache."""

    def __init__(self):
        self.data: dict[str, np.ndarray] = {}
        self.hits = self.misses = self.puts = 0
        self.lock = threading.Lock()

    def get(self, key):
        with self.lock:
            v = self.data.get(key)
            if v is None:
                self.misses += 1
            else:
                self.hits += 1
            return v

    def put(self, key, value):
        with self.lock:
            self.puts += 1
            self.data[key] = np.array(value)


class BrokenCache:
    """A cache whose backend went away (Redis down): every call raises."""

    def get(self, key):
        raise ConnectionError("cache is down")

    def put(self, key, value):
        raise ConnectionError("cache is down")


@pytest.fixture(scope="module")
def pictures():
    """N distinct pictures as PNG bytes, and the PIL images."""
    imgs = [make_image(seed) for seed in range(N)]
    return [encode(im, "PNG") for im in imgs], imgs


def open_search(tmp_path, model, **kwargs) -> ImageSearch:
    store = MetadataStore(tmp_path / "tallow.db")
    return ImageSearch(tmp_path, store, model, **kwargs)


def close_all(ims: ImageSearch) -> None:
    ims.close()
    ims.store.close()  # the caller's store: ImageSearch does not close it


@pytest.fixture
def filled(tmp_path, resnet, pictures):
    """An ImageSearch holding the N pictures as img0..img7, payload kind a/b and n."""
    datas, _ = pictures
    ims = open_search(tmp_path, resnet)
    ims.add_many([(f"img{i}", d, {"kind": "ab"[i % 2], "n": i}) for i, d in enumerate(datas)])
    yield ims
    close_all(ims)


def ids(result) -> list[str]:
    return [h["id"] for h in result["hits"]]


# ------------------------------------------------------------------------ add / search


def test_add_then_search_finds_the_same_image_first(tmp_path, resnet, pictures):
    datas, imgs = pictures
    ims = open_search(tmp_path, resnet)
    try:
        r = ims.add("cat", datas[3], {"kind": "b", "n": 3})
        assert r["id"] == "cat" and len(r["sha256"]) == 64 and r["dim"] == 256
        assert (r["width"], r["height"]) == imgs[3].size
        assert r["cached"] is False
        assert set(r["timing_ms"]) == {"preprocess", "inference", "store", "index", "total"}
        for i in (0, 1, 5):
            ims.add(f"other{i}", datas[i])
        res = ims.search(datas[3], k=3)
        assert ids(res)[0] == "cat" and len(res["hits"]) == 3
        top = res["hits"][0]
        assert top["score"] > SAME
        assert top["payload"] == {"kind": "b", "n": 3}  # the store's payload, without tallow's hash
        assert (top["width"], top["height"], top["sha256"]) == (*imgs[3].size, r["sha256"])
        scores = [h["score"] for h in res["hits"]]
        assert scores == sorted(scores, reverse=True)
        assert set(res["timing_ms"]) == {"preprocess", "inference", "search", "metadata", "total"}
        assert all(v >= 0 for v in res["timing_ms"].values())
        assert ims.count() == 4
    finally:
        close_all(ims)


def test_near_duplicate_ranks_above_unrelated(filled, pictures):
    _, imgs = pictures
    for i in (0, 5):
        # Another size, another format, lossy: the bytes (and SHA-256) differ.
        query = encode(imgs[i].resize((200, 150)), "JPEG", quality=70)
        res = filled.search(query, k=N)
        assert res["cached"] is False
        assert ids(res)[0] == f"img{i}", [(h["id"], round(h["score"], 5)) for h in res["hits"]]
        assert res["hits"][0]["score"] > res["hits"][1]["score"]


def test_filters_and_score_threshold(filled, pictures):
    datas, _ = pictures
    res = filled.search(datas[2], k=N, filter={"kind": "b"})
    assert sorted(ids(res)) == [f"img{i}" for i in range(1, N, 2)]
    res = filled.search(datas[2], k=N, filter={"kind": "a", "n": {"gte": 4}})
    assert sorted(ids(res)) == ["img4", "img6"]  # img2 is kind a but n < 4
    res = filled.search(datas[2], k=N, filter={"must_not": [{"n": {"in": [2, 3]}}]})
    assert "img2" not in ids(res) and len(res["hits"]) == N - 2
    res = filled.search(datas[2], k=N, score_threshold=SAME)
    assert ids(res) == ["img2"]
    assert filled.search(datas[2], k=N, filter={"kind": "zzz"})["hits"] == []
    with pytest.raises(ImageInputError, match="filter") as e:
        filled.search(datas[2], filter={"n": {"near": 3}})
    assert e.value.kind == "invalid"
    for bad in (float("nan"), "0.5", True):
        with pytest.raises(ImageInputError, match="score_threshold"):
            filled.search(datas[2], score_threshold=bad)
    for bad in (0, -1, 10_001, "3", 2.0):
        with pytest.raises(ImageInputError, match="k must"):
            filled.search(datas[2], k=bad)


def test_delete_and_replace(filled, pictures):
    datas, _ = pictures
    assert filled.delete("img4") is True
    assert filled.delete("img4") is False
    assert filled.count() == N - 1 and filled.get("img4") is None
    assert "img4" not in ids(filled.search(datas[4], k=N))
    # Re-adding an id replaces its image and payload.
    filled.add("img1", datas[4], {"kind": "new"})
    assert filled.count() == N - 1
    res = filled.search(datas[4], k=2)
    assert ids(res)[0] == "img1" and res["hits"][0]["payload"] == {"kind": "new"}
    assert res["hits"][0]["score"] > SAME
    assert filled.search(datas[1], k=1, filter={"kind": "b"})["hits"][0]["id"] != "img1"


def test_add_many_checks_everything_before_writing(tmp_path, resnet, pictures):
    datas, _ = pictures
    ims = open_search(tmp_path, resnet)
    try:
        truncated = encode(make_image(99), "JPEG")[:400]
        with pytest.raises(ImageInputError, match="'b'") as e:
            ims.add_many([("a", datas[0]), ("b", truncated), ("c", datas[1])])
        assert e.value.kind == "invalid"
        with pytest.raises(ImageInputError, match="more than once"):
            ims.add_many([("a", datas[0]), ("a", datas[1])])
        assert ims.count() == 0
        # The same bytes twice in one batch: computed once, stored under both ids.
        res = ims.add_many([("a", datas[0]), ("b", datas[1], {"n": 1}), ("c", datas[0])], batch_size=2)
        assert [r["id"] for r in res["images"]] == ["a", "b", "c"]
        assert res["images"][0]["sha256"] == res["images"][2]["sha256"]
        assert ims.count() == 3
        assert sorted(ids(ims.search(datas[0], k=2, score_threshold=SAME))) == ["a", "c"]
    finally:
        close_all(ims)


def test_features_are_normalised_and_deterministic(tmp_path, resnet, pictures):
    datas, _ = pictures
    ims = open_search(tmp_path, resnet)
    try:
        vecs, cached = ims.features(datas[:3] + [datas[0]])
        assert vecs.shape == (4, 256) and vecs.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, rtol=1e-5)
        np.testing.assert_array_equal(vecs[0], vecs[3])
        assert cached == [False] * 4
        assert ims.features([])[0].shape == (0, 256)
    finally:
        close_all(ims)


# ------------------------------------------------------------------------ cache


def test_feature_cache_hits_on_the_same_bytes(tmp_path, resnet, pictures):
    datas, _ = pictures
    cache = CountingCache()
    ims = open_search(tmp_path, resnet, cache=cache)
    try:
        assert ims.add("a", datas[0])["cached"] is False
        assert cache.puts == 1 and cache.hits == 0
        (key,) = cache.data
        assert key == f"{ims.model_tag}:{ims.get('a')['sha256']}"  # namespaced by the model
        r = ims.add("b", datas[0])
        assert r["cached"] is True and cache.hits == 1
        res = ims.search(datas[0], k=1)
        assert res["cached"] is True and cache.hits == 2 and ids(res)[0] in ("a", "b")
        assert ims.search(datas[1], k=1)["cached"] is False
        assert ims.search(datas[1], k=1)["cached"] is True
    finally:
        close_all(ims)
    # Another model identity never reads these entries.
    other = open_search(tmp_path / "other", resnet, cache=cache, model_tag="another-model")
    try:
        hits = cache.hits
        assert other.add("a", datas[0])["cached"] is False and cache.hits == hits
    finally:
        close_all(other)


def test_stored_features_serve_as_a_cache_without_one(tmp_path, resnet, pictures):
    datas, _ = pictures
    ims = open_search(tmp_path, resnet)
    try:
        ims.add("a", datas[0])
        assert ims.add("b", datas[0])["cached"] is True  # the same bytes are already stored
        assert ims.search(datas[0], k=1)["cached"] is True
        assert ims.search(datas[1], k=1)["cached"] is False
    finally:
        close_all(ims)


def test_a_failing_cache_degrades_to_no_cache(tmp_path, resnet, pictures):
    datas, _ = pictures
    ims = open_search(tmp_path, resnet, cache=BrokenCache())
    try:
        ims.add("a", datas[0])
        assert ids(ims.search(datas[0], k=1)) == ["a"]
    finally:
        close_all(ims)


# ------------------------------------------------------------------------ bad input


def _png_header(width: int, height: int) -> bytes:
    """A PNG signature and IHDR declaring width x height, and no pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk + b"\x00\x00\x00\x00IEND\xaeB`\x82"


@pytest.mark.parametrize("data, kind, message", [
    (b"this is not an image at all", "unsupported", "not an image in a supported format"),
    (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "unsupported", "supported format"),
    ("truncated-jpeg", "invalid", "truncated|cannot decode"),
    (_png_header(8000, 6000), "too_large", "48.0 megapixels"),        # above max_megapixels=40
    (_png_header(30000, 30000), "too_large", "too large|megapixels"),  # above Pillow's own bomb limit
    (b"", "invalid", "empty"),
    ("not bytes", "invalid", "expected encoded image bytes"),
])
def test_bad_images_are_refused_and_nothing_is_written(tmp_path, resnet, data, kind, message):
    if data == "truncated-jpeg":
        data = encode(make_image(7, (640, 480)), "JPEG")[:3000]
    elif data == "not bytes":
        data = 12345
    cache = CountingCache()
    ims = open_search(tmp_path, resnet, cache=cache)
    try:
        for call in (lambda: ims.add("x", data, {"n": 1}), lambda: ims.search(data)):
            with pytest.raises(ImageInputError, match=message) as e:
                call()
            assert e.value.kind == kind
            assert isinstance(e.value, ValueError)
        assert ims.count() == 0 and ims.stats()["indexed"] == 0 and cache.puts == 0
        assert not (tmp_path / MODEL_FILE).exists()
    finally:
        close_all(ims)


def test_max_megapixels_is_checked_from_the_header(tmp_path, resnet, pictures):
    datas, _ = pictures  # 320 x 240 = 0.077 MP
    ims = open_search(tmp_path, resnet, max_megapixels=0.05)
    try:
        with pytest.raises(ImageInputError, match="above the limit of 0.05 megapixels") as e:
            ims.add("x", datas[0])
        assert e.value.kind == "too_large" and ims.count() == 0
    finally:
        close_all(ims)


@pytest.mark.parametrize("id, payload, message", [
    ("", None, "id is empty"),
    (7, None, "id must be a str"),
    ("x" * 257, None, "257 characters"),
    ("a\nb", None, "control characters"),
    ("ok", ["not", "a", "dict"], "payload must be a JSON object"),
    ("ok", {"s": {1, 2}}, "not JSON-serialisable"),
    ("ok", {"f": float("nan")}, "not JSON-serialisable"),
    ("ok", {HASH_KEY: "x"}, "reserved"),
    ("ok", {"big": "x" * 70_000}, "the limit is 65536"),
])
def test_bad_ids_and_payloads(tmp_path, resnet, pictures, id, payload, message):
    datas, _ = pictures
    ims = open_search(tmp_path, resnet)
    try:
        with pytest.raises(ImageInputError, match=message) as e:
            ims.add(id, datas[0], payload)
        assert e.value.kind == "invalid" and ims.count() == 0
    finally:
        close_all(ims)


# ------------------------------------------------------------------------ persistence


def test_persists_across_close_and_reopen(tmp_path, resnet, pictures):
    datas, _ = pictures
    ims = open_search(tmp_path, resnet)
    ims.add_many([(f"img{i}", d, {"n": i}) for i, d in enumerate(datas[:4])])
    close_all(ims)
    assert (tmp_path / "image_index" / "CURRENT").exists()
    ims = open_search(tmp_path, resnet)
    try:
        assert ims.count() == 4 and ims.stats()["indexed"] == 4
        res = ims.search(datas[2], k=1)
        assert ids(res) == ["img2"] and res["hits"][0]["payload"] == {"n": 2}
        assert res["cached"] is True  # from the store: image_model.json names this model
    finally:
        close_all(ims)


def test_reopen_reconciles_the_index_with_the_store(tmp_path, resnet, pictures):
    datas, _ = pictures
    ims = open_search(tmp_path, resnet)
    ims.add_many([(f"img{i}", d) for i, d in enumerate(datas[:4])])
    vecs, _ = ims.features([datas[5]])
    close_all(ims)

    # Behind the index's back: an image only in the store, a row deleted, a payload changed.
    with MetadataStore(tmp_path / "tallow.db") as store:
        store.put_image("only-in-store", "5" * 64, {"src": "store"}, 320, 240, vecs[0])
        store.delete_image("img0")
        row = store.get_images(["img1"])[0]
        store.put_image("img1", row["sha256"], {"kind": "changed"}, row["width"], row["height"], row["feature"])
    ims = open_search(tmp_path, resnet)
    try:
        assert ims.stats()["indexed"] == ims.count() == 4
        assert ids(ims.search(datas[5], k=1)) == ["only-in-store"]
        assert "img0" not in ids(ims.search(datas[0], k=N))
        assert ids(ims.search(datas[1], k=N, filter={"kind": "changed"})) == ["img1"]
    finally:
        close_all(ims)

    # No index at all: rebuilt from the store.
    shutil.rmtree(tmp_path / "image_index")
    ims = open_search(tmp_path, resnet)
    try:
        assert ims.stats()["indexed"] == 4
        assert ids(ims.search(datas[2], k=1)) == ["img2"]
    finally:
        close_all(ims)


def test_a_corrupt_index_is_moved_aside_and_rebuilt(tmp_path, resnet, pictures):
    datas, _ = pictures
    ims = open_search(tmp_path, resnet)
    ims.add_many([(f"img{i}", d) for i, d in enumerate(datas[:3])])
    close_all(ims)
    snap = (tmp_path / "image_index" / "CURRENT").read_text().strip()
    (tmp_path / "image_index" / snap / "meta.json").write_text("{not json")
    with pytest.warns(IndexRebuiltWarning, match="rebuilding the image index"):
        ims = open_search(tmp_path, resnet)
    try:
        assert ims.stats()["indexed"] == 3 and ids(ims.search(datas[1], k=1)) == ["img1"]
        assert list(tmp_path.glob("image_index.corrupt-*"))
    finally:
        close_all(ims)


def test_a_model_path_is_loaded_lazily(tmp_path, resnet_dir, pictures):
    datas, _ = pictures
    ims = open_search(tmp_path, resnet_dir)
    try:
        assert ims._model is None and ims.dim is None
        ims.add("a", datas[0])
        assert ims.dim == 256 and ids(ims.search(datas[0], k=1)) == ["a"]
    finally:
        close_all(ims)


def test_another_model_cannot_search_the_stored_features(tmp_path, resnet, pictures):
    datas, _ = pictures
    ims = open_search(tmp_path, resnet)
    ims.add("a", datas[0])
    tag = ims.model_tag
    close_all(ims)
    store = MetadataStore(tmp_path / "tallow.db")
    try:
        with pytest.raises(ImageSearchError, match="indexed with model"):
            ImageSearch(tmp_path, store, resnet, model_tag="something-else")
        ims = ImageSearch(tmp_path, store, resnet, model_tag=tag)  # the same identity: fine
        ims.close()
    finally:
        store.close()


# ------------------------------------------------------------------------ concurrency


def test_concurrent_searches_and_adds(tmp_path, resnet, pictures):
    datas, imgs = pictures
    ims = open_search(tmp_path, resnet, cache=CountingCache())
    ims.add_many([(f"img{i}", d) for i, d in enumerate(datas[:4])])
    extra = [encode(make_image(100 + i), "JPEG") for i in range(6)]
    errors: list[BaseException] = []

    def searcher(seed: int) -> None:
        try:
            for j in range(12):
                q = datas[(seed + j) % 4]
                res = ims.search(q, k=3)
                assert ids(res)[0] == f"img{(seed + j) % 4}"
        except BaseException as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    def adder(part: list[int]) -> None:
        try:
            for i in part:
                ims.add(f"new{i}", extra[i], {"n": i})
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=searcher, args=(s,)) for s in range(3)]
    threads += [threading.Thread(target=adder, args=([0, 2, 4],)), threading.Thread(target=adder, args=([1, 3, 5],))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors, errors
        assert ims.count() == 10 and ims.stats()["indexed"] == 10
        for i in range(6):
            assert ids(ims.search(extra[i], k=1)) == [f"new{i}"]
    finally:
        close_all(ims)


def test_search_many_equals_searches_one_by_one_and_isolates_bad_queries(filled, pictures):
    datas, _ = pictures
    queries = [{"data": datas[1], "k": 3}, {"data": datas[2], "k": 2, "filter": {"kind": "a"}},
               {"data": b"not an image", "k": 3}, {"data": datas[3], "k": 0}, {"data": datas[5], "k": 4}]
    got = filled.search_many(queries)
    assert isinstance(got[2], ImageInputError) and got[2].kind == "unsupported"
    assert isinstance(got[3], ImageInputError)
    for i in (0, 1, 4):
        alone = filled.search(queries[i]["data"], queries[i]["k"], queries[i].get("filter"))
        assert ids(got[i]) == ids(alone)
        assert [h["score"] for h in got[i]["hits"]] == pytest.approx([h["score"] for h in alone["hits"]], abs=1e-5)
        assert got[i]["timing_ms"]["batch_size"] == 3
    truncated = datas[6][: len(datas[6]) // 2]  # a good header, bad data: found only when decoding
    got = filled.search_many([{"data": datas[1], "k": 1}, {"data": truncated, "k": 1}])
    assert ids(got[0]) == ["img1"] and isinstance(got[1], ImageInputError)
