"""Metadata store: documents, chunks and images with their payloads in libSQL
(an embedded file by default, an embedded replica of a libSQL primary when
``sync_url`` is given). See ``store`` and ``migrations``."""

from .errors import StoreError, StoreUnavailableError
from .migrations import LATEST as SCHEMA_VERSION
from .migrations import MIGRATIONS
from .store import MetadataStore

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "MetadataStore", "StoreError", "StoreUnavailableError"]
