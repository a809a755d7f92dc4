"""Wire models: the request and response bodies of the HTTP API (service/token_codec.py turns
tokens into and out of them)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

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
