"""The three kinds of failure every layer of tallow raises, so a caller (and
the server, which maps them to HTTP in ``tallow.serve.errors``) handles each
one way:

- ``InputError`` (a ``ValueError``): the caller's input is wrong. ``param``
  names the offending field when the raiser knows it; ``kind`` says how:
  ``"invalid"``, ``"too_long"`` (more tokens than allowed), ``"too_large"``
  (an image over the pixel limit) or ``"unsupported"`` (data of a media type
  tallow does not read: HTTP 415; every other kind is 422).
- ``NotFound`` (a ``LookupError``): the named thing does not exist (404).
- ``Unavailable`` (a ``RuntimeError``): it exists but cannot serve now —
  loading, not configured, failed (503).

The older per-layer classes (``EngineError``, ``ImageInputError``,
``IndexInputError``, ``FilterError``, ``InputTooLongError``,
``PreprocessError``) are subclasses of ``InputError``: code that catches them
keeps working. ``check_utf8`` is the one UTF-8 check.
"""

from __future__ import annotations

KINDS = ("invalid", "too_long", "too_large", "unsupported")


class InputError(ValueError):
    """Bad input: ``param`` is the offending field (or None), ``kind`` one of ``KINDS``."""

    def __init__(self, message: str = "", *, param: str | None = None, kind: str = "invalid"):
        if kind not in KINDS:
            raise ValueError(f"{type(self).__name__} kind must be one of {KINDS}, got {kind!r}")
        super().__init__(message)
        self.param = param
        self.kind = kind


class NotFound(LookupError):
    """The named thing (a document, a model, an image) does not exist."""

    def __init__(self, message: str = "", *, param: str | None = None):
        super().__init__(message)
        self.param = param


class Unavailable(RuntimeError):
    """It cannot serve now: still loading, not configured, or failed.
    ``retry_after_s``: when trying again may help (None: it will not by itself)."""

    def __init__(self, message: str = "", *, retry_after_s: int | None = None):
        super().__init__(message)
        self.retry_after_s = retry_after_s


def check_utf8(text: str, what: str, *, param: str | None = None, error: type[InputError] = InputError) -> None:
    """Raises ``error`` when ``text`` is not encodable as UTF-8: JSON allows
    lone surrogates ("\\ud800"), which no tokenizer, hash or store accepts."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise error(f"{what} is not valid Unicode text: a lone surrogate at position {exc.start}",
                    param=param) from None


__all__ = ["InputError", "KINDS", "NotFound", "Unavailable", "check_utf8"]
