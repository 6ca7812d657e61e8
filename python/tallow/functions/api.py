"""What the server and the runtime hand each other: a request, a response,
the error a request ends with, and ``Host``, the narrow API through which
functions reach tallow's models and ops."""

from __future__ import annotations

from dataclasses import dataclass, field


class FunctionError(Exception):
    """A request a function could not answer; ``status`` is the HTTP status."""

    def __init__(self, status: int, message: str, *, function: str, kind: str):
        super().__init__(message)
        self.status = status
        self.message = message
        self.function = function
        self.kind = kind  # trap | deadline | fuel | instantiate | error_code | bad_request


class HostUnavailable(Exception):
    """A host function's model is not loaded (the guest gets E_UNAVAILABLE)."""


class HostInputError(ValueError):
    """The guest passed input the model or op refuses (the guest gets E_INVALID)."""


class Host:
    """The narrow API functions reach tallow's models and ops through. The
    server passes one backed by its models; this default has no models."""

    def embed_text(self, text: str, timeout_s: float):  # -> 1-D float32 numpy array
        raise HostUnavailable("no embedder here")

    def classify_text(self, text: str, timeout_s: float) -> dict:
        raise HostUnavailable("no classifier here")

    def preprocess_image(self, data: bytes, timeout_s: float):  # -> float32 array [3, 224, 224]
        import numpy as np

        from ..ops.preprocess import preprocess

        try:
            return np.ascontiguousarray(preprocess([bytes(data)], num_threads=1)[0].numpy(), dtype="<f4")
        except ValueError as exc:
            raise HostInputError(str(exc)) from None


@dataclass
class FnRequest:
    method: str = "GET"
    path: str = "/"
    query: str = ""
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""


@dataclass
class FnResponse:
    status: int = 200
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    fuel_used: int = 0
    elapsed_ms: float = 0.0
