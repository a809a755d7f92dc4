"""HTTP routes: validate, delegate to TokenizerService (service/tokenizer.py), shape the answer."""

from __future__ import annotations

import base64
import math
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Response, UploadFile
from fastapi.responses import JSONResponse

from service.deps import ServiceDep
from service.images import ResizePolicy
from service.problems import PROBLEM_MEDIA_TYPE
from service.schemas import DecodeBatchResponse, DecodeRequest, EncodeResponse, Health, TokenFormat

router = APIRouter()

_PROBLEM = {"schema": {"$ref": "#/components/schemas/ProblemDetails"}}
_WHY = {
    400: "malformed request (bad JSON, broken base64, corrupt image data)",
    401: "missing or wrong API key (only when the service has one)",
    409: "model_id names a different model than the one served",
    413: "body, pixels, images per request or token grid over the limit",
    415: "not an image, or the wrong request media type",
    422: "invalid tokens or form fields (names the field, the limit and the value)",
    503: "model not loaded, draining, or queue full (see Retry-After)",
}
_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait", "schema": {"type": "string"}}}


def problems(*statuses: int) -> dict[int | str, dict[str, Any]]:
    responses: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        entry: dict[str, Any] = {
            "description": _WHY[status],
            "content": {PROBLEM_MEDIA_TYPE: _PROBLEM},
        }
        if status == 503:
            entry["headers"] = _RETRY_AFTER
        responses[status] = entry
    return responses


_PNG = {"image/png": {"schema": {"type": "string", "format": "binary"}}}
_MODEL_HEADER = {
    "X-Model-Id": {
        "description": "id of the model that made the image",
        "schema": {"type": "string"},
    }
}


@router.get("/health/live", response_model=Health, tags=["health"])
async def live(service: ServiceDep) -> dict[str, Any]:
    """The process is up (says nothing about the model)."""
    return {"status": "draining" if service.draining else "ok"}


@router.get("/health/ready", response_model=Health, tags=["health"], responses=problems(503))
async def ready(service: ServiceDep) -> dict[str, Any]:
    """200 once the model is loaded and warm; 503 while loading or draining (SIGTERM)."""
    if not service.ready:
        raise service.not_ready()
    return {"status": "ok", "model": service.model_ref()["id"]}


@router.get(
    "/metrics",
    tags=["health"],
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    response_class=Response,
)
async def metrics(service: ServiceDep) -> Response:
    """Prometheus text format."""
    body, content_type = service.metrics.render()
    return Response(body, media_type=content_type)


@router.get(
    "/v1/model", tags=["model"], response_model=dict[str, Any], responses=problems(401, 503)
)
async def model(service: ServiceDep) -> dict[str, Any]:
    """The served model's card: model.json's public part (id, codebook, sizes, metrics)."""
    return service.model_card()


@router.post(
    "/v1/encode",
    tags=["tokens"],
    response_model=EncodeResponse,
    responses=problems(400, 401, 413, 415, 422, 503),
)
async def encode(
    service: ServiceDep,
    response: Response,
    images: Annotated[list[UploadFile], File(description="one or more image files")],
    resize: Annotated[
        ResizePolicy,
        Form(
            description="fit: shorter side → native size, centre crop; pad: pad to a "
            "multiple of f; none: must already be a multiple of f"
        ),
    ] = "fit",
    format: Annotated[
        TokenFormat, Form(description="json: nested lists; base64: little-endian uint16")
    ] = "json",
) -> dict[str, Any]:
    """Images → token grids, one item per file, in upload order."""
    uploads = [await image.read() for image in images]
    body = await service.encode(uploads, resize, format)
    response.headers["X-Model-Id"] = body["model"]["id"]
    return body


@router.post(
    "/v1/decode",
    tags=["tokens"],
    response_class=Response,
    responses={
        200: {
            "description": "[h][w] tokens → one PNG; [n][h][w] → JSON with base64 PNGs",
            "content": {
                **_PNG,
                "application/json": {
                    "schema": {"$ref": "#/components/schemas/DecodeBatchResponse"}
                },
            },
            "headers": _MODEL_HEADER,
        },
        **problems(400, 401, 409, 413, 415, 422, 503),
    },
)
async def decode(service: ServiceDep, body: DecodeRequest) -> Response:
    """Tokens → image(s)."""
    decoded = await service.decode(body)
    model = service.model_ref()
    headers = {"X-Model-Id": model["id"]}
    if decoded.single:
        return Response(decoded.pngs[0], media_type="image/png", headers=headers)
    answer = DecodeBatchResponse(
        model=model,
        items=[
            {"png_b64": base64.b64encode(png).decode(), "size": list(size)}
            for png, size in zip(decoded.pngs, decoded.sizes)
        ],
    )
    return JSONResponse(answer.model_dump(), headers=headers)


@router.post(
    "/v1/reconstruct",
    tags=["tokens"],
    response_class=Response,
    responses={
        200: {
            "description": "the image after encode + decode",
            "content": _PNG,
            "headers": {
                **_MODEL_HEADER,
                "X-PSNR-dB": {
                    "description": "PSNR of the reconstruction against the model input, dB",
                    "schema": {"type": "string"},
                },
            },
        },
        **problems(400, 401, 413, 415, 422, 503),
    },
)
async def reconstruct(
    service: ServiceDep,
    image: Annotated[UploadFile, File(description="one image file")],
    resize: Annotated[ResizePolicy, Form(description="as for /v1/encode")] = "fit",
) -> Response:
    """Image → tokens → image, to see what the tokenizer keeps."""
    result = await service.reconstruct(await image.read(), resize)
    psnr = "inf" if math.isinf(result.psnr_db) else f"{result.psnr_db:.3f}"
    headers = {"X-Model-Id": service.model_ref()["id"], "X-PSNR-dB": psnr}
    return Response(result.png, media_type="image/png", headers=headers)
