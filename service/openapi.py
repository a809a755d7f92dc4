"""The OpenAPI document says what the server accepts: FastAPI's schema plus what it cannot
infer (problem+json bodies referenced from hand-written responses, upload counts and non-empty
files, the security schemes when an API key is set)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic.json_schema import models_json_schema

from service.schemas import DecodeBatchResponse, EncodeResponse, ProblemDetails
from service.settings import Settings


def _state_upload_limits(schemas: dict[str, Any], settings: Settings) -> None:
    # FastAPI describes `list[UploadFile]` as any array of strings; the server wants 1..max_images
    # non-empty files (an empty file is not an image: 415), so the document says so
    binary = {"type": "string", "format": "binary", "minLength": 1}
    for body, field, many in (
        ("Body_encode_v1_encode_post", "images", True),
        ("Body_reconstruct_v1_reconstruct_post", "image", False),
    ):
        properties = schemas.get(body, {}).get("properties", {})
        for option in ("resize", "format"):
            # an empty form value means "not given" to FastAPI: the default applies
            if "enum" in properties.get(option, {}):
                properties[option]["enum"] = [*properties[option]["enum"], ""]
        prop = properties.get(field)
        if prop is None:
            continue
        description = prop.get("description")
        prop.clear()
        if many:
            prop.update(type="array", items=binary, minItems=1, maxItems=settings.max_images)
        else:
            prop.update(binary)
        if description:
            prop["description"] = description


def openapi_document(app: FastAPI, settings: Settings) -> dict[str, Any]:
    """FastAPI's document, completed: problem+json schemas, upload limits, security schemes."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(
        title=app.title, version=app.version, summary=app.summary, routes=app.routes
    )
    # Schemas referenced only from hand-written `responses` entries (problem+json, the decode
    # batch answer) are not collected by FastAPI: add them to components.
    _, extra = models_json_schema(
        [
            (ProblemDetails, "serialization"),
            (DecodeBatchResponse, "serialization"),
            (EncodeResponse, "serialization"),
        ],
        ref_template="#/components/schemas/{model}",
    )
    components = schema.setdefault("components", {})
    for name, definition in extra.get("$defs", {}).items():
        components.setdefault("schemas", {}).setdefault(name, definition)
    _state_upload_limits(components["schemas"], settings)
    if settings.api_key is not None:
        components["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer"},
            "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
        }
        for path, operations in schema["paths"].items():
            if path.startswith("/v1/"):
                for operation in operations.values():
                    operation["security"] = [{"bearer": []}, {"apiKey": []}]
    app.openapi_schema = schema
    return schema
