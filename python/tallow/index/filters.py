"""tallow's one filter syntax, accepted by every index backend.

    {"category": "programming"}                        field equals a value
    {"timestamp": {"gte": 1700000000, "lt": 1800000000}}  numeric range
    {"tag": {"in": ["a", "b"]}}                         one of
    {"lang": {"ne": "de"}}  {"tag": {"nin": ["x"]}}     negations
    {"must": [F, ...], "should": [F, ...], "must_not": [F, ...]}

Top-level keys are ANDed. ``should`` means at least one of. Values are str,
int, float or bool. A field missing from a payload matches no positive
condition (and therefore every negated one).

``parse`` validates a filter once into a small tree; the tree is evaluated in
Python (HNSW), translated to a Qdrant ``Filter`` or to a parameterized SQL
expression over a JSON payload column (libSQL).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Union

from ..errors import InputError

_RANGE_OPS = ("gt", "gte", "lt", "lte")
_OPS = ("eq", "ne", "in", "nin") + _RANGE_OPS
_BOOL_KEYS = ("must", "should", "must_not")
Scalar = Union[str, int, float, bool]


class FilterError(InputError):
    """A filter that does not follow tallow's filter syntax."""


@dataclass(frozen=True)
class Cond:
    field: str
    op: str       # one of _OPS
    value: Any    # scalar, or a tuple of scalars for in/nin


@dataclass(frozen=True)
class Bool:
    must: tuple = ()
    should: tuple = ()
    must_not: tuple = ()


Node = Union[Cond, Bool]


def _check_scalar(field: str, op: str, v: Any) -> Scalar:
    if isinstance(v, bool) or isinstance(v, str):
        return v
    if isinstance(v, (int, float)):
        if isinstance(v, float) and not math.isfinite(v):
            raise FilterError(f"filter on {field!r}: {op} value must be finite, got {v!r}")
        return v
    raise FilterError(f"filter on {field!r}: {op} value must be str, int, float or bool, got {type(v).__name__}")


def _field_conds(field: str, spec: Any) -> list[Cond]:
    if not isinstance(field, str) or not field:
        raise FilterError(f"filter field names must be non-empty strings, got {field!r}")
    if not isinstance(spec, dict):
        return [Cond(field, "eq", _check_scalar(field, "eq", spec))]
    if not spec:
        raise FilterError(f"filter on {field!r}: empty operator object")
    conds = []
    for op, v in spec.items():
        if op not in _OPS:
            raise FilterError(f"filter on {field!r}: unknown operator {op!r}; expected one of {', '.join(_OPS)}")
        if op in ("in", "nin"):
            if not isinstance(v, (list, tuple)) or not v:
                raise FilterError(f"filter on {field!r}: {op} needs a non-empty list, got {v!r}")
            conds.append(Cond(field, op, tuple(_check_scalar(field, op, x) for x in v)))
        elif op in _RANGE_OPS:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise FilterError(f"filter on {field!r}: {op} needs a number, got {v!r}")
            conds.append(Cond(field, op, _check_scalar(field, op, v)))
        else:
            conds.append(Cond(field, op, _check_scalar(field, op, v)))
    return conds


def parse(spec: dict | None) -> Node | None:
    """Validates a filter and returns its tree (None for no filter)."""
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise FilterError(f"a filter must be a dict, got {type(spec).__name__}")
    must: list[Node] = []
    should: list[Node] = []
    must_not: list[Node] = []
    for key, value in spec.items():
        if key in _BOOL_KEYS:
            if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, dict) for v in value):
                raise FilterError(f"filter {key!r} needs a non-empty list of filters (objects), got {value!r}")
            subs = [parse(v) for v in value]
            {"must": must, "should": should, "must_not": must_not}[key].extend(s for s in subs if s is not None)
        else:
            must.extend(_field_conds(key, value))
    if not must and not should and not must_not:
        return None
    if len(must) == 1 and not should and not must_not:
        return must[0]
    return Bool(tuple(must), tuple(should), tuple(must_not))


def fields(node: Node | None) -> set[str]:
    """Payload fields a filter reads (to create payload indexes for)."""
    if node is None:
        return set()
    if isinstance(node, Cond):
        return {node.field}
    return set().union(*(fields(n) for n in node.must + node.should + node.must_not))


def _cmp_ok(a: Any, b: Any) -> bool:
    """Values are comparable: both numbers (not bool), or both str."""
    num = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool)
    return (num(a) and num(b)) or (isinstance(a, str) and isinstance(b, str))


def matches(node: Node | None, payload: dict) -> bool:
    """Evaluates a parsed filter on one payload."""
    if node is None:
        return True
    if isinstance(node, Bool):
        return (all(matches(n, payload) for n in node.must)
                and (not node.should or any(matches(n, payload) for n in node.should))
                and not any(matches(n, payload) for n in node.must_not))
    present = node.field in payload
    v = payload.get(node.field)
    if node.op == "eq":
        return present and _same(v, node.value)
    if node.op == "ne":
        return not (present and _same(v, node.value))
    if node.op == "in":
        return present and any(_same(v, x) for x in node.value)
    if node.op == "nin":
        return not (present and any(_same(v, x) for x in node.value))
    if not present or not _cmp_ok(v, node.value):
        return False
    return {"gt": v > node.value, "gte": v >= node.value, "lt": v < node.value, "lte": v <= node.value}[node.op]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return a == b


def to_qdrant(node: Node | None):
    """A qdrant_client.models.Filter equivalent to the tree."""
    from qdrant_client import models as qm

    if node is None:
        return None

    def match(field: str, value: Any):
        # Numbers compare by value, as in matches() and to_sql (1 == 1.0): a closed range,
        # since MatchValue(1) does not match a stored 1.0 and takes no floats at all.
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return qm.FieldCondition(key=field, range=qm.Range(gte=value, lte=value))
        return qm.FieldCondition(key=field, match=qm.MatchValue(value=value))

    def cond(c: Cond):
        """(condition or filter, negated)."""
        if c.op in ("eq", "ne"):
            return match(c.field, c.value), c.op == "ne"
        if c.op in ("in", "nin"):
            # MatchAny takes a list of only str (or only int, which would miss stored
            # floats); anything else is an OR of single matches.
            if not all(isinstance(v, str) for v in c.value):
                return qm.Filter(should=[match(c.field, v) for v in c.value]), c.op == "nin"
            return qm.FieldCondition(key=c.field, match=qm.MatchAny(any=list(c.value))), c.op == "nin"
        return qm.FieldCondition(key=c.field, range=qm.Range(**{c.op: c.value})), False

    def build(n: Node) -> "qm.Filter":
        if isinstance(n, Cond):
            fc, negated = cond(n)
            return qm.Filter(must_not=[fc]) if negated else qm.Filter(must=[fc])
        return qm.Filter(must=[build(x) for x in n.must] or None,
                         should=[build(x) for x in n.should] or None,
                         must_not=[build(x) for x in n.must_not] or None)

    return build(node)


def to_sql(node: Node | None, column: str = "payload") -> tuple[str, list]:
    """(WHERE expression, parameters) over a JSON text column; '1' for no filter.

    Field names go through json_extract paths as parameters, never into the
    SQL text, so a field name cannot inject SQL."""
    if node is None:
        return "1", []
    params: list = []

    # SQLite's JSON paths have no escape for '"' inside a quoted key ('$."a""b"'
    # and '$."a\\"b"' both address nothing), so such keys are looked up with json_each.
    def path(field: str) -> str:
        if '"' in field:
            params.append(field)
            return f"(SELECT value FROM json_each({column}) WHERE key = ?)"
        params.append('$."' + field + '"')
        return f"json_extract({column}, ?)"

    def typed(field: str) -> str:
        if '"' in field:
            params.append(field)
            return f"(SELECT type FROM json_each({column}) WHERE key = ?)"
        params.append('$."' + field + '"')
        return f"json_type({column}, ?)"

    def value_sql(v: Any) -> str:
        params.append(int(v) if isinstance(v, bool) else v)
        return "?"

    def type_guard(field: str, v: Any) -> str:
        # JSON true/false come back from json_extract as 1/0; keep bools apart from numbers.
        if isinstance(v, bool):
            return f"{typed(field)} IN ('true', 'false')"
        if isinstance(v, str):
            return f"{typed(field)} = 'text'"
        return f"{typed(field)} IN ('integer', 'real')"

    def cond(c: Cond) -> str:
        if c.op in ("eq", "ne"):
            expr = f"({type_guard(c.field, c.value)} AND {path(c.field)} = {value_sql(c.value)})"
            return expr if c.op == "eq" else f"NOT COALESCE({expr}, 0)"
        if c.op in ("in", "nin"):
            parts = [f"({type_guard(c.field, v)} AND {path(c.field)} = {value_sql(v)})" for v in c.value]
            expr = "(" + " OR ".join(parts) + ")"
            return expr if c.op == "in" else f"NOT COALESCE({expr}, 0)"
        sym = {"gt": ">", "gte": ">=", "lt": "<", "lte": "<="}[c.op]
        return f"({type_guard(c.field, c.value)} AND {path(c.field)} {sym} {value_sql(c.value)})"

    def build(n: Node) -> str:
        if isinstance(n, Cond):
            return f"COALESCE({cond(n)}, 0)"
        parts = [build(x) for x in n.must]
        if n.should:
            parts.append("(" + " OR ".join(build(x) for x in n.should) + ")")
        parts += [f"NOT {build(x)}" for x in n.must_not]
        return "(" + " AND ".join(parts or ["1"]) + ")"

    return build(node), params
