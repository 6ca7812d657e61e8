"""filters.to_sql / to_qdrant against the reference evaluator filters.matches,
on random payloads of mixed types (bools vs ints, floats, missing fields)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from tallow.testing import needs_libsql

from tallow.index import filters as F

from index_helpers import make_index

FIELDS = ("a", "b", "c")
VALUES = (0, 1, 2, -3, 1.0, 2.5, True, False, "x", "y", "1")


def random_payload(rnd, values=VALUES):
    p = {}
    for f in FIELDS:
        r = rnd.random()
        if r < 0.2:
            continue                                   # missing
        if r < 0.25:
            p[f] = {"nested": 1}                       # not a scalar: matches no positive condition
        elif r < 0.3:
            p[f] = None
        else:
            p[f] = rnd.choice(values)
    return p


def random_cond(rnd, values=VALUES):
    f = rnd.choice(FIELDS)
    op = rnd.choice(("eq", "ne", "in", "nin", "gt", "gte", "lt", "lte", "plain"))
    if op == "plain":
        return {f: rnd.choice(values)}
    if op in ("in", "nin"):
        return {f: {op: rnd.sample(values, rnd.randint(1, 3))}}
    if op in ("gt", "gte", "lt", "lte"):
        return {f: {op: rnd.choice((0, 1, 1.5, -3, 2))}}
    return {f: {op: rnd.choice(values)}}


def random_filter(rnd, depth=0, values=VALUES):
    if depth >= 2 or rnd.random() < 0.5:
        return random_cond(rnd, values)
    spec = {}
    for key in ("must", "should", "must_not"):
        if rnd.random() < 0.6:
            spec[key] = [random_filter(rnd, depth + 1, values) for _ in range(rnd.randint(1, 3))]
    return spec or random_cond(rnd, values)


@needs_libsql()
def test_to_sql_agrees_with_matches_on_random_filters():
    import libsql

    rnd = random.Random(42)
    payloads = [random_payload(rnd) for _ in range(80)]
    conn = libsql.connect(":memory:")
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, payload TEXT)")
    conn.executemany("INSERT INTO t VALUES (?, ?)", [(i, json.dumps(p)) for i, p in enumerate(payloads)])
    conn.commit()
    for _ in range(300):
        spec = random_filter(rnd)
        node = F.parse(spec)
        where, params = F.to_sql(node)
        assert where.count("?") == len(params)
        got = {r[0] for r in conn.execute(f"SELECT id FROM t WHERE {where}", tuple(params)).fetchall()}
        expect = {i for i, p in enumerate(payloads) if F.matches(node, p)}
        assert got == expect, f"filter {spec}: SQL gave {sorted(got ^ expect)} differently"
    conn.close()


def test_to_qdrant_agrees_with_matches_on_random_filters():
    """Regressions: a mixed-type "in" list made MatchAny raise a pydantic error, and
    an int equality missed stored floats (1 vs 1.0) that matches() and SQL accept."""
    rnd = random.Random(7)
    values = VALUES
    payloads = [random_payload(rnd, values) for _ in range(40)]
    ix = make_index("qdrant", 2, "l2")
    try:
        ix.upsert(list(range(len(payloads))), np.zeros((len(payloads), 2)), payloads)
        for _ in range(60):
            spec = random_filter(rnd, values=values)
            node = F.parse(spec)
            expect = {i for i, p in enumerate(payloads) if F.matches(node, p)}
            got = {h.id for h in ix.search([0.0, 0.0], 100, filter=spec)[0]}
            assert got == expect, f"filter {spec}: differs on {sorted(got ^ expect)}"
    finally:
        ix.close()


@pytest.mark.parametrize("backend", ["hnsw", pytest.param("libsql", marks=needs_libsql())])
def test_awkward_field_names(backend):
    """Field names are literal top-level keys: dots, quotes, spaces, '$'."""
    names = ["a.b", 'we"ird', "sp ace", "$", "a[0]", "ünï", "x'y"]
    ix = make_index(backend, 2, "l2")
    try:
        ix.upsert(list(range(len(names))), np.zeros((len(names), 2)), [{n: i} for i, n in enumerate(names)])
        for i, n in enumerate(names):
            assert [h.id for h in ix.search([0.0, 0.0], 10, filter={n: i})[0]] == [i], n
            assert len(ix.search([0.0, 0.0], 10, filter={n: {"ne": i}})[0]) == len(names) - 1, n
    finally:
        ix.close()
