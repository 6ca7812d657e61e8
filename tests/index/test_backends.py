"""Every backend against an exact numpy brute force, the three metrics, filters,
score thresholds, deletes and bad input — through the common VectorIndex API."""

from __future__ import annotations

import numpy as np
import pytest

from tallow.testing import needs_libsql

from tallow.index import MAX_K, FilterError, HnswIndex, IndexInputError
from tallow.index import filters as F

from index_helpers import BACKENDS, brute_force

METRICS = ("cosine", "ip", "l2")


def ids_of(hits):
    return [h.id for h in hits]


def test_metrics_constant():
    from tallow.index import METRICS as exported
    assert set(exported) == set(METRICS)


# -- exactness / recall vs brute force -----------------------------------------------------

@pytest.mark.parametrize("metric", METRICS)
def test_hnsw_recall_at_default_ef(index_factory, rng, metric):
    n, dim, k = 3000, 32, 10
    data = rng.standard_normal((n, dim)).astype(np.float32)
    queries = rng.standard_normal((60, dim)).astype(np.float32)
    ix = index_factory("hnsw", dim, metric)
    ix.upsert(list(range(n)), data)
    got = ix.search(queries, k)
    truth, tscores = brute_force(data, queries, k, metric)
    recall = np.mean([len(set(ids_of(g)) & set(t.tolist())) / k for g, t in zip(got, truth)])
    assert recall >= 0.95, f"{metric}: recall@{k} = {recall:.3f} at ef={ix.ef}"
    # Scores are in the index's units (similarity, or L2 distance — not squared).
    for g, t, ts in zip(got, truth, tscores):
        for h in g:
            if h.id in t.tolist():
                np.testing.assert_allclose(h.score, ts[t.tolist().index(h.id)], rtol=1e-4, atol=1e-4)
        s = [h.score for h in g]
        assert s == sorted(s, reverse=metric != "l2")


@pytest.mark.parametrize("metric", METRICS)
def test_qdrant_local_is_exact(index_factory, rng, metric):
    n, dim, k = 400, 24, 8
    data = rng.standard_normal((n, dim)).astype(np.float32)
    queries = rng.standard_normal((10, dim)).astype(np.float32)
    ix = index_factory("qdrant", dim, metric)
    ix.upsert([f"p{i}" for i in range(n)], data, [{"i": i} for i in range(n)])
    got = ix.search(queries, k)
    truth, tscores = brute_force(data, queries, k, metric)
    for g, t, ts in zip(got, truth, tscores):
        assert ids_of(g) == [f"p{i}" for i in t]
        assert [h.payload["i"] for h in g] == t.tolist()        # the reserved id field is not leaked
        np.testing.assert_allclose([h.score for h in g], ts, rtol=1e-4, atol=1e-4)
    assert ix.count() == n


@pytest.mark.parametrize("metric", METRICS)
@needs_libsql()
def test_libsql_vectors_vs_brute_force(index_factory, rng, metric):
    """ip is answered by an exact scan (ids equal); cosine / l2 go through the
    DiskANN index (high recall, scores exact for what it returns)."""
    n, dim, k = 400, 16, 8
    data = rng.standard_normal((n, dim)).astype(np.float32)
    queries = rng.standard_normal((20, dim)).astype(np.float32)
    ix = index_factory("libsql", dim, metric)
    ix.upsert(list(range(n)), data)
    got = ix.search(queries, k)
    truth, tscores = brute_force(data, queries, k, metric)
    if metric == "ip":
        for g, t, ts in zip(got, truth, tscores):
            assert ids_of(g) == t.tolist()
            np.testing.assert_allclose([h.score for h in g], ts, rtol=1e-4, atol=1e-3)
    else:
        recall = np.mean([len(set(ids_of(g)) & set(t.tolist())) / k for g, t in zip(got, truth)])
        assert recall >= 0.9, f"{metric}: recall@{k} = {recall:.3f}"
        assert all(len(g) == k for g in got)
    # Exact scores for every hit returned, whatever the path.
    for q, g in zip(queries, got):
        for h in g:
            _, s = brute_force(data[[h.id]], q, 1, metric)
            np.testing.assert_allclose(h.score, s[0, 0], rtol=1e-4, atol=1e-3)


def test_hnsw_exact_path_equals_brute_force(index_factory, rng):
    """A filter matching few items is answered by exact search: ids equal."""
    n, dim, k = 1000, 16, 10
    data = rng.standard_normal((n, dim)).astype(np.float32)
    ix = index_factory("hnsw", dim, "l2")
    ix.upsert(list(range(n)), data, [{"sel": i % 50 == 0} for i in range(n)])
    q = rng.standard_normal((5, dim)).astype(np.float32)
    sel = np.arange(0, n, 50)
    truth, ts = brute_force(data[sel], q, k, "l2")
    for g, t, s in zip(ix.search(q, k, filter={"sel": True}), truth, ts):
        assert ids_of(g) == sel[t].tolist()
        np.testing.assert_allclose([h.score for h in g], s, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("metric", METRICS)
def test_same_answers_across_backends_on_small_data(index_factory, rng, metric):
    """On 60 points every backend (HNSW is exact at this size) gives the same
    ranking and scores in the same units."""
    dim = 6
    data = rng.standard_normal((60, dim)).astype(np.float32)
    q = rng.standard_normal(dim).astype(np.float32)
    truth, ts = brute_force(data, q, 5, metric)
    for b in BACKENDS:
        ix = index_factory(b, dim, metric)
        ix.upsert(list(range(60)), data)
        [g] = ix.search(q, 5)
        assert ids_of(g) == truth[0].tolist(), b
        np.testing.assert_allclose([h.score for h in g], ts[0], rtol=1e-4, atol=1e-3, err_msg=b)


# -- upsert / delete / count ---------------------------------------------------------------

def test_upsert_updates_in_place_and_delete(index_factory, backend, rng):
    dim = 8
    ix = index_factory(backend, dim, "l2")
    data = rng.standard_normal((20, dim)).astype(np.float32)
    ix.upsert(list(range(20)), data, [{"v": 1}] * 20)
    new = np.full(dim, 50.0, np.float32)
    ix.upsert([3], new, [{"v": 2}])                 # same id: replaced, not added
    assert ix.count() == 20
    [g] = ix.search(new, 1)
    assert g[0].id == 3 and g[0].payload == {"v": 2} and g[0].score == pytest.approx(0.0, abs=1e-3)
    assert ix.delete([3, 4, 999]) == 2              # unknown ids are not counted
    assert ix.count() == 18
    assert 3 not in ids_of(ix.search(new, 18)[0])
    assert ix.delete([]) == 0
    ix.upsert([], np.zeros((0, dim), np.float32))   # empty upsert is a no-op


def test_int_and_str_ids_are_distinct(index_factory, backend):
    ix = index_factory(backend, 2, "l2")
    ix.upsert([5, "5"], [[0, 0], [10, 10]], [{"k": "int"}, {"k": "str"}])
    assert ix.count() == 2
    [g] = ix.search([0, 0], 2)
    assert [(h.id, h.payload["k"]) for h in g] == [(5, "int"), ("5", "str")]
    assert ix.delete(["5"]) == 1 and ix.count() == 1
    assert ids_of(ix.search([10, 10], 1)[0]) == [5]


def test_entries_list_ids_with_payloads(index_factory, backend, rng):
    ix = index_factory(backend, 4, "cosine")
    assert ix.entries() == [] and ix.entries("h") == []
    ids = [0, 7, "a", "7", "doc#12"]
    payloads = [{"h": "x0", "n": 0}, {"h": "x7"}, {"n": 2}, {"h": None, "tags": ["t"]}, {"h": "x12"}]
    ix.upsert(ids, rng.standard_normal((5, 4)).astype(np.float32), payloads)
    ix.upsert([7], rng.standard_normal((1, 4)).astype(np.float32), [{"h": "y7"}])  # replaced
    ix.delete(["a"])
    want = {0: {"h": "x0", "n": 0}, 7: {"h": "y7"}, "7": {"h": None, "tags": ["t"]}, "doc#12": {"h": "x12"}}

    def keyed(pairs):  # int 7 and str "7" are two ids: key by (type, id)
        assert len(pairs) == len({(type(i), i) for i, _ in pairs})
        return {(type(i), i): v for i, v in pairs}

    assert keyed(ix.entries()) == {(type(i), i): p for i, p in want.items()}
    assert keyed(ix.entries("h")) == {(type(i), i): p.get("h") for i, p in want.items()}
    # payloads come back as copies: changing one does not change the index
    for _, p in ix.entries():
        p["h"] = "changed"
    assert keyed(ix.entries("h"))[(int, 7)] == "y7"


def test_entries_pages_through_many_items(index_factory, backend, rng):
    n = 2500  # more than one Qdrant scroll page
    ix = index_factory(backend, 4, "l2")
    ix.upsert([f"p{i}" for i in range(n)], rng.standard_normal((n, 4)).astype(np.float32),
              [{"i": i} for i in range(n)])
    assert sorted(v for _, v in ix.entries("i")) == list(range(n))
    assert {i for i, _ in ix.entries()} == {f"p{i}" for i in range(n)}


def test_empty_index_returns_no_hits(index_factory, backend):
    ix = index_factory(backend, 4, "cosine")
    assert ix.search(np.ones((2, 4)), 3) == [[], []]
    assert ix.count() == 0


# -- filters ------------------------------------------------------------------------------

PAYLOADS = [
    {"cat": "a", "n": 1, "x": 0.5, "flag": True, "tag": "red"},
    {"cat": "b", "n": 2, "x": 1.5, "flag": False, "tag": "green"},
    {"cat": "a", "n": 3, "x": 2.5, "flag": True},
    {"cat": "c", "n": 4, "x": -1.0, "flag": False, "tag": "blue"},
    {"cat": "b", "n": 5, "tag": "red"},
    {"cat": "a", "n": 6, "x": 3.0, "flag": True, "tag": "green"},
    {"n": 7, "x": 0.0, "tag": "blue"},
    {"cat": "c", "n": 8, "x": 4.5, "flag": False},
]

FILTERS = [
    {"cat": "a"},
    {"cat": {"eq": "b"}},
    {"cat": {"ne": "a"}},                       # missing field matches a negation
    {"n": {"gt": 4}},
    {"n": {"gte": 4}},
    {"n": {"lt": 3}},
    {"n": {"lte": 3}},
    {"n": {"gte": 2, "lt": 6}},
    {"x": {"gt": 0.5, "lte": 3.0}},
    {"x": 2.5},                                 # float equality
    {"tag": {"in": ["red", "blue"]}},
    {"tag": {"nin": ["red", "blue"]}},
    {"n": {"in": [1, 7, 100]}},
    {"flag": True},
    {"flag": False},
    {"cat": "a", "flag": True},
    {"must": [{"cat": "a"}, {"n": {"gt": 1}}]},
    {"should": [{"cat": "c"}, {"tag": "red"}]},
    {"must_not": [{"cat": "a"}]},
    {"must": [{"n": {"lte": 6}}], "should": [{"tag": "green"}, {"flag": False}], "must_not": [{"cat": "c"}]},
    {"should": [{"must": [{"cat": "a"}, {"n": 6}]}, {"must_not": [{"tag": {"in": ["red", "green", "blue"]}}]}]},
    {"cat": "zzz"},
]


@pytest.mark.parametrize("flt", FILTERS, ids=lambda f: str(f)[:60])
def test_filters_match_python_semantics_on_every_backend(index_factory, flt):
    """Each operator and must/should/must_not: the ids returned with k = all are
    exactly the payloads the reference evaluator (filters.matches) accepts."""
    node = F.parse(flt)
    expect = {i for i, p in enumerate(PAYLOADS) if F.matches(node, p)}
    data = np.random.default_rng(0).standard_normal((len(PAYLOADS), 4)).astype(np.float32)
    for b in BACKENDS:
        ix = index_factory(b, 4, "cosine")
        ix.upsert(list(range(len(PAYLOADS))), data, PAYLOADS)
        [g] = ix.search(data[0], len(PAYLOADS), filter=flt)
        assert set(ids_of(g)) == expect, f"{b}: {flt}"
        for h in g:
            assert h.payload == PAYLOADS[h.id]


def test_filter_semantics_by_hand():
    """The reference evaluator itself, on cases worth spelling out."""
    m = lambda f, p: F.matches(F.parse(f), p)
    assert m({"flag": True}, {"flag": True}) and not m({"flag": True}, {"flag": 1})   # bools are not ints
    assert not m({"n": 1}, {"n": True})
    assert m({"n": 1}, {"n": 1.0})
    assert not m({"n": {"gt": 0}}, {"n": "5"})                                      # no str/number comparison
    assert not m({"n": {"gt": 0}}, {}) and m({"n": {"ne": 0}}, {}) and m({"n": {"nin": [0]}}, {})
    assert F.parse(None) is None and F.parse({}) is None
    assert F.fields(F.parse({"a": 1, "should": [{"b": 2}], "must_not": [{"c": {"in": [1]}}]})) == {"a", "b", "c"}


@pytest.mark.parametrize("flt, match", [
    ({"cat": {"like": "a%"}}, "unknown operator 'like'"),
    ({"must": [{"n": {"between": [1, 2]}}]}, "unknown operator 'between'"),
    ({"cat": {}}, "empty operator"),
    ({"tag": {"in": []}}, "non-empty list"),
    ({"tag": {"in": "red"}}, "non-empty list"),
    ({"n": {"gt": "3"}}, "needs a number"),
    ({"n": {"gt": True}}, "needs a number"),
    ({"x": float("nan")}, "finite"),
    ({"x": [1, 2]}, "str, int, float or bool"),
    ({"must": {"cat": "a"}}, "non-empty list"),
    ({"should": []}, "non-empty list"),
    ({"": 1}, "non-empty strings"),
    ("cat = 'a'", "must be a dict"),
])
def test_bad_filters_raise_filter_error(index_factory, backend, flt, match):
    ix = index_factory(backend, 2, "l2")
    ix.upsert([1], [[0.0, 0.0]], [{"cat": "a"}])
    with pytest.raises(FilterError, match=match):
        ix.search([0.0, 0.0], 1, filter=flt)


def test_selective_filter_still_returns_k_hits(index_factory, backend, rng):
    """12 of 1500 items match; k = 10 gives 10 hits, the true top 10 of those 12."""
    n, dim, k = 1500 if backend != "qdrant" else 500, 16, 10
    data = rng.standard_normal((n, dim)).astype(np.float32)
    chosen = set(rng.choice(n, 12, replace=False).tolist())
    payloads = [{"rare": i in chosen, "g": i % 3} for i in range(n)]
    ix = index_factory(backend, dim, "cosine")
    ix.upsert(list(range(n)), data, payloads)
    q = rng.standard_normal((3, dim)).astype(np.float32)
    sel = np.array(sorted(chosen))
    truth, _ = brute_force(data[sel], q, k, "cosine")
    for g, t in zip(ix.search(q, k, filter={"rare": True}), truth):
        assert len(g) == k
        assert set(ids_of(g)) == set(sel[t].tolist())
    # k larger than the matching set: all of them, no error
    assert sorted(ids_of(ix.search(q[0], 50, filter={"rare": True})[0])) == sel.tolist()


def test_hnsw_broad_filter_uses_filtered_graph_search(index_factory, rng):
    """A filter matching half the items goes through hnswlib's filtered search;
    every hit matches and recall stays high."""
    n, dim, k = 2000, 16, 10
    data = rng.standard_normal((n, dim)).astype(np.float32)
    ix = index_factory("hnsw", dim, "ip")
    ix.upsert(list(range(n)), data, [{"even": i % 2 == 0} for i in range(n)])
    q = rng.standard_normal((10, dim)).astype(np.float32)
    even = np.arange(0, n, 2)
    truth, _ = brute_force(data[even], q, k, "ip")
    got = ix.search(q, k, filter={"even": True})
    assert all(len(g) == k and all(h.id % 2 == 0 for h in g) for g in got)
    recall = np.mean([len(set(ids_of(g)) & set(even[t].tolist())) / k for g, t in zip(got, truth)])
    assert recall >= 0.95


# -- score threshold ----------------------------------------------------------------------

@pytest.mark.parametrize("metric, threshold, expect", [
    ("cosine", 0.5, [1, 3]),      # similarities 1.0, 0.707, 0.0: keep >= 0.5
    ("ip", 2.0, [3]),             # dot products 3.0, 1.0, 0.0: keep >= 2
    ("l2", 3.0, [1, 2]),          # distances 0, 2.236, 3.606: keep <= 3
])
def test_score_threshold(index_factory, backend, metric, threshold, expect):
    ix = index_factory(backend, 4, metric)
    ix.upsert([1, 2, 3], [[1, 0, 0, 0], [0, 2, 0, 0], [3, 3, 0, 0]])
    [g] = ix.search([1, 0, 0, 0], 3, score_threshold=threshold)
    assert ids_of(g) == expect
    [g] = ix.search([1, 0, 0, 0], 3)
    assert len(g) == 3


# -- bad input ----------------------------------------------------------------------------

@pytest.mark.parametrize("call, match", [
    (lambda ix: ix.upsert([1], np.ones((1, 5))), "dimension 5, the index has dimension 4"),
    (lambda ix: ix.upsert([1, 2], np.ones((1, 4))), "2 ids but 1 vectors"),
    (lambda ix: ix.upsert([1], [[np.nan, 0, 0, 0]]), "NaN or inf"),
    (lambda ix: ix.upsert([1, 2], [[0, 0, 0, 0], [np.inf, 0, 0, 0]]), "row 1 contains NaN or inf"),
    (lambda ix: ix.upsert([1, 1], np.ones((2, 4))), "duplicates"),
    (lambda ix: ix.upsert(["a", "a"], np.ones((2, 4))), "duplicates"),
    (lambda ix: ix.upsert([-1], np.ones((1, 4))), ">= 0"),
    (lambda ix: ix.upsert([""], np.ones((1, 4))), "empty string"),
    (lambda ix: ix.upsert([1.5], np.ones((1, 4))), "int or str"),
    (lambda ix: ix.upsert([True], np.ones((1, 4))), "int or str"),
    (lambda ix: ix.upsert("ab", np.ones((2, 4))), "list of int or str"),
    (lambda ix: ix.upsert([1], np.ones((1, 4)), [{"x": float("inf")}]), "JSON"),
    (lambda ix: ix.upsert([1], np.ones((1, 4)), [{"x": 1}, {"x": 2}]), "1 ids but 2 payloads"),
    (lambda ix: ix.upsert([1], np.ones((1, 4)), ["x"]), "must be a dict"),
    (lambda ix: ix.upsert([1], [["a", "b", "c", "d"]]), "numeric"),
    (lambda ix: ix.upsert([1], np.ones((1, 2, 4))), "must be"),
    (lambda ix: ix.search(np.ones(3), 1), "dimension 3"),
    (lambda ix: ix.search(np.full(4, np.nan), 1), "NaN"),
    (lambda ix: ix.search(np.ones(4), 0), "k must be >= 1"),
    (lambda ix: ix.search(np.ones(4), -3), "k must be >= 1"),
    (lambda ix: ix.search(np.ones(4), MAX_K + 1), f"k must be <= {MAX_K}"),
    (lambda ix: ix.search(np.ones(4), 2.0), "k must be an int"),
    (lambda ix: ix.search(np.ones(4), True), "k must be an int"),
    (lambda ix: ix.delete([1, 1]), "duplicates"),
])
def test_bad_input_raises_index_input_error(index_factory, backend, call, match):
    ix = index_factory(backend, 4, "l2")
    ix.upsert([7], np.ones((1, 4)))
    with pytest.raises(IndexInputError, match=match):
        call(ix)
    assert ix.count() == 1                       # nothing half-done


def test_k_at_max_is_accepted(index_factory, backend):
    ix = index_factory(backend, 2, "l2")
    ix.upsert([1, 2], [[0, 0], [1, 1]])
    assert len(ix.search([0, 0], MAX_K)[0]) == 2


def test_bad_constructor_arguments():
    with pytest.raises(IndexInputError, match="metric"):
        HnswIndex(4, "manhattan")
    with pytest.raises(IndexInputError, match="dim"):
        HnswIndex(0)
    from tallow.index import LibsqlVectorIndex, QdrantIndex
    with pytest.raises(IndexInputError, match="metric"):
        LibsqlVectorIndex(4, "dot")
    with pytest.raises(IndexInputError, match="table name"):
        LibsqlVectorIndex(4, table="x; DROP TABLE y")
    with pytest.raises(IndexInputError, match="exactly one"):
        QdrantIndex(4)
