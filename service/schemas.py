"""Wire formats: request/response models and the conversions between tokens and JSON.

Tokens travel either as nested JSON integer lists or as base64 of little-endian uint16,
row-major (C order) — 2 bytes per token instead of ~5 for JSON text, and a zero-copy
`np.frombuffer(b, "<u2").reshape(shape)` for the client.
"""

from __future__ import annotations

import base64
import binascii
import math
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from service.errors import Problem

TokenFormat = Literal["json", "base64"]

_TOKEN = {"type": "integer", "minimum": 0}
_ROW = {"type": "array", "items": _TOKEN, "minItems": 1}
_INT_GRID = {"type": "array", "items": _ROW, "minItems": 1}
_TOKENS_SCHEMA = {
    "description": "one token grid [h][w] (answer: image/png) or a batch [n][h][w] "
    "(answer: JSON with base64 PNGs); integers in [0, codebook_size)",
    "anyOf": [_INT_GRID, {"type": "array", "items": _INT_GRID, "minItems": 1}],
}


def _given(name: str) -> dict[str, Any]:
    """JSON schema: `name` is present and not null (null means absent to the server)."""
    return {"required": [name], "properties": {name: {"not": {"type": "null"}}}}


# exactly one of the two token forms, and `shape` only with `tokens_b64`
_ONE_TOKEN_FORM = {
    "oneOf": [
        {"allOf": [_given("tokens"), {"not": _given("tokens_b64")}, {"not": _given("shape")}]},
        {"allOf": [_given("tokens_b64"), _given("shape"), {"not": _given("tokens")}]},
    ]
}


class ModelRef(BaseModel):
    """Which model (and so which codebook) produced or will read the tokens."""

    id: str
    codebook_size: int
    downsample: int


class EncodedItem(BaseModel):
    shape: list[int] = Field(description="token grid [h, w]")
    tokens: list[list[int]] | str = Field(
        description="format=json: [h][w] integers; format=base64: little-endian uint16, row-major"
    )
    image_size: list[int] = Field(description="[H, W] of the image the encoder saw")
    original_size: list[int] = Field(description="[H0, W0] of the upload (after EXIF rotation)")


class EncodeResponse(BaseModel):
    model: ModelRef
    format: TokenFormat
    items: list[EncodedItem]


class DecodeRequest(BaseModel):
    """Tokens to turn back into pixels: `tokens`, or `tokens_b64` with `shape`."""

    model_config = ConfigDict(
        protected_namespaces=(), extra="forbid", json_schema_extra=_ONE_TOKEN_FORM
    )

    tokens: list[Any] | None = Field(None, json_schema_extra=_TOKENS_SCHEMA)
    tokens_b64: str | None = Field(
        None, description="base64 of little-endian uint16 tokens, row-major; needs `shape`"
    )
    shape: list[int] | None = Field(
        None,
        description="[h, w] or [n, h, w] of tokens_b64",
        json_schema_extra={
            "minItems": 2,
            "maxItems": 3,
            "items": {"type": "integer", "minimum": 1},
        },
    )
    model_id: str | None = Field(
        None, description="the id the tokens were made with; a different served model answers 409"
    )
    original_size: list[int] | list[list[int]] | None = Field(
        None,
        description="[H0, W0] (or one per batch item) to crop the decoded image to, "
        "as returned by encode with resize=pad",
    )


class DecodedImage(BaseModel):
    png_b64: str
    size: list[int] = Field(description="[H, W] of the PNG")


class DecodeBatchResponse(BaseModel):
    model: ModelRef
    items: list[DecodedImage]


class ProblemDetails(BaseModel):
    """RFC 9457 problem details, plus the field, limit and value that caused them."""

    type: str
    title: str
    status: int
    detail: str
    instance: str | None = None
    field: str | None = None
    limit: Any = None
    value: Any = None


class Health(BaseModel):
    status: Literal["ok", "loading", "draining"]
    model: str | None = None


def tokens_to_wire(tokens: np.ndarray, fmt: TokenFormat) -> list[list[int]] | str:
    """One [h, w] grid in the requested wire format."""
    if fmt == "base64":
        return base64.b64encode(np.ascontiguousarray(tokens, dtype="<u2").tobytes()).decode()
    return tokens.tolist()


def tokens_from_request(request: DecodeRequest) -> tuple[np.ndarray, bool, str]:
    """Tokens [n, h, w] as sent, whether it was the single-grid form, and the field they came in.

    Only the form is checked here; limits (grid size, batch) are service.admission's, the code
    range is the service's (it knows the codebook).
    """
    if (request.tokens is None) == (request.tokens_b64 is None):
        raise Problem(
            422,
            "invalid-tokens",
            "give exactly one of `tokens` (nested integer lists) or `tokens_b64` (with `shape`)",
            field="tokens",
        )
    if request.tokens is not None:
        if request.shape is not None:
            raise Problem(
                422, "invalid-tokens", "`shape` goes with `tokens_b64` only", field="shape"
            )
        array = _array_from_lists(request.tokens)
        field = "tokens"
    else:
        array = _array_from_b64(request.tokens_b64 or "", request.shape)
        field = "tokens_b64"
    single = array.ndim == 2
    batch = array[None] if single else array
    if min(batch.shape) < 1:
        raise Problem(
            422,
            "invalid-tokens",
            f"{field}: empty token grid, shape {list(array.shape)}",
            field=field,
            value=list(array.shape),
        )
    return batch.astype(np.int64, copy=False), single, field


def _array_from_lists(tokens: list[Any]) -> np.ndarray:
    try:
        array = np.asarray(tokens)
    except (ValueError, OverflowError) as error:
        raise Problem(
            422,
            "invalid-tokens",
            f"tokens: not a rectangular grid of integers (ragged rows or mixed types: {error})",
            field="tokens",
        ) from error
    if array.size == 0:
        raise Problem(
            422,
            "invalid-tokens",
            f"tokens: empty token grid, shape {list(array.shape)}",
            field="tokens",
            value=list(array.shape),
        )
    if array.dtype.kind == "f":
        fractional = array[array != np.round(array)]
        example = (fractional if fractional.size else array).flat[0].item()
        raise Problem(
            422,
            "invalid-tokens",
            f"tokens: must be integers, got a float ({example})",
            field="tokens",
            value=example,
        )
    if array.dtype.kind not in "iu" or array.dtype == np.bool_:
        raise Problem(
            422,
            "invalid-tokens",
            f"tokens: must be nested lists of integers, got elements of type {array.dtype}",
            field="tokens",
        )
    if array.ndim not in (2, 3):
        raise Problem(
            422,
            "invalid-tokens",
            f"tokens: need rank 2 [h][w] or 3 [n][h][w], got rank {array.ndim} "
            f"(shape {list(array.shape)})",
            field="tokens",
            limit=[2, 3],
            value=array.ndim,
        )
    return array


def _array_from_b64(encoded: str, shape: list[int] | None) -> np.ndarray:
    if shape is None:
        raise Problem(
            422, "invalid-tokens", "tokens_b64 needs `shape` ([h, w] or [n, h, w])", field="shape"
        )
    if len(shape) not in (2, 3) or any(side < 1 for side in shape):
        raise Problem(
            422,
            "invalid-tokens",
            f"shape: need [h, w] or [n, h, w] of positive integers, got {shape}",
            field="shape",
            value=shape,
        )
    try:
        raw = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as error:
        raise Problem(
            400,
            "malformed-base64",
            f"tokens_b64: not valid base64 ({error})",
            field="tokens_b64",
        ) from error
    expected = 2 * math.prod(shape)
    if len(raw) != expected:
        raise Problem(
            422,
            "invalid-tokens",
            f"tokens_b64: {len(raw)} bytes decoded, shape {shape} needs {expected} "
            f"(2 bytes per uint16 token)",
            field="tokens_b64",
            limit=expected,
            value=len(raw),
        )
    return np.frombuffer(raw, dtype="<u2").reshape(shape)


def crop_sizes(
    original_size: list[int] | list[list[int]] | None, n: int, full: tuple[int, int]
) -> list[tuple[int, int]]:
    """The [H0, W0] each decoded image is cropped to (default: the full decoded size)."""
    if original_size is None:
        return [full] * n
    pairs: list[Any] = (
        [original_size] * n
        if original_size and not isinstance(original_size[0], list)
        else list(original_size)
    )
    if len(pairs) != n:
        raise Problem(
            422,
            "invalid-original-size",
            f"original_size: {len(pairs)} sizes for {n} token grids",
            field="original_size",
            limit=n,
            value=len(pairs),
        )
    sizes = []
    for pair in pairs:
        if (
            not isinstance(pair, list)
            or len(pair) != 2
            or not 1 <= pair[0] <= full[0]
            or not 1 <= pair[1] <= full[1]
        ):
            raise Problem(
                422,
                "invalid-original-size",
                f"original_size: {pair} must be [H0, W0] with 1 <= H0 <= {full[0]} and "
                f"1 <= W0 <= {full[1]} (the decoded size)",
                field="original_size",
                limit=list(full),
                value=pair,
            )
        sizes.append((int(pair[0]), int(pair[1])))
    return sizes
