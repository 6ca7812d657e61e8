"""Admission answered as HTTP: a full queue or gate (``batching.Overloaded``)
is a 429 with Retry-After, counted in ``tallow_rejected_total``. Its own
module so that both the routers' helpers (``deps``) and the generation
service (``generation``, which the model workers import) use it without an
import cycle (services -> workers -> generation -> deps -> services)."""

from __future__ import annotations

from typing import Any

from .batching import Overloaded
from .errors import APIError


def admit(services: Any, gate) -> None:
    """Enters an admission gate (``batching.Gate``): 429 when it is full.
    The caller calls ``gate.leave()`` when the request is done."""
    try:
        gate.enter()
    except Overloaded as exc:
        raise too_busy(services, exc) from None


def too_busy(services: Any, exc: Overloaded) -> APIError:
    services.metrics.rejected.labels(exc.lane).inc()
    return APIError(429, str(exc), headers={"Retry-After": str(exc.retry_after_s)})
