"""Index fixtures: one factory per backend (closed after the test), a seeded rng."""

from __future__ import annotations

import numpy as np
import pytest

from index_helpers import ALL_BACKENDS, make_index
from tallow.testing import needs_libsql


@pytest.fixture(params=[pytest.param(b, marks=needs_libsql()) if b == "libsql" else b for b in ALL_BACKENDS])
def backend(request):
    return request.param


@pytest.fixture
def index_factory(tmp_path):
    made = []

    def make(backend, dim, metric="cosine", **kw):
        ix = make_index(backend, dim, metric, tmp_path, **kw)
        made.append(ix)
        return ix

    yield make
    for ix in made:
        ix.close()


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
