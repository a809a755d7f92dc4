"""Tokens on the wire: nested JSON integer lists or base64 of little-endian uint16.

    tokens_to_wire(grid, "base64")          # one [h, w] grid -> str
    batch, single, field = tokens_from_request(request)   # -> int64 [n, h, w]

base64 is row-major (C order), 2 bytes per token instead of ~5 for JSON text, and a zero-copy
`np.frombuffer(b, "<u2").reshape(shape)` for the client. Limits on the grid and batch are
service.admission's; this module checks form (rank, dtype, lengths) and the code range.
"""

from __future__ import annotations

import base64
import binascii
import math
from typing import Any

import numpy as np

from service.problems import Problem
from service.schemas import DecodeRequest, TokenFormat


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


def check_codes(batch: np.ndarray, codebook_size: int, field: str, single: bool) -> None:
    """422 naming the first token outside [0, codebook_size) and where it is."""
    low, high = int(batch.min()), int(batch.max())
    if low < 0 or high >= codebook_size:
        bad = low if low < 0 else high
        where = [int(i) for i in np.argwhere(batch == bad)[0]]
        where = where[1:] if single else where
        raise Problem(
            422,
            "token-out-of-range",
            f"{field}: token {bad} at index {where} is outside [0, {codebook_size}) "
            f"for this model's codebook",
            field=field,
            limit=[0, codebook_size - 1],
            value=bad,
        )
