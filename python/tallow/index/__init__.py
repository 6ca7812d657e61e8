"""Vector indexes behind one interface: HNSW (hnswlib, the embedded default),
Qdrant (qdrant-client) and libSQL vectors. Filters: see ``filters``."""

from .base import MAX_K, METRICS, Hit, IndexInputError, VectorIndex
from .filters import FilterError
from .hnsw import CorruptIndexError, HnswIndex
from .libsql_vectors import LibsqlVectorIndex
from .qdrant import QdrantIndex

__all__ = ["MAX_K", "METRICS", "CorruptIndexError", "FilterError", "Hit", "HnswIndex", "IndexInputError", "LibsqlVectorIndex", "QdrantIndex",
           "VectorIndex"]
