"""Problem details (RFC 9457): the one error type of the runtime, free of any web framework.

A `Problem` carries the status, a short title, a detail sentence and, for limit and validation
errors, the offending `field`, the `limit` and the `value` received. service/errors.py answers it
over HTTP; the offline tools (vqtok-tokenize, evaluation) read its `detail`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

PROBLEM_MEDIA_TYPE = "application/problem+json"
PROBLEM_TYPE_BASE = "https://vqtok.dev/problems/"


class Problem(Exception):
    """An error answered as problem+json; `kind` becomes the problem `type` URI's last segment."""

    def __init__(
        self,
        status: int,
        kind: str,
        detail: str,
        *,
        title: str | None = None,
        field: str | None = None,
        limit: object = None,
        value: object = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.kind = kind
        self.title = title or HTTPStatus(status).phrase
        self.detail = detail
        self.field = field
        self.limit = limit
        self.value = value
        self.headers = dict(headers or {})

    def body(self, instance: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": PROBLEM_TYPE_BASE + self.kind,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        }
        if instance is not None:
            body["instance"] = instance
        for key in ("field", "limit", "value"):
            member = getattr(self, key)
            if member is not None:
                body[key] = _jsonable(member)
        return body


def _jsonable(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/Infinity: echo them as "nan", "inf"
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if isinstance(value, tuple | list):
        return [_jsonable(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if hasattr(value, "item"):  # numpy scalars
        return _jsonable(value.item())
    return str(value)
