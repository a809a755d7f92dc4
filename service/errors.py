"""Problem details over HTTP: the exception handlers that answer every error as
`application/problem+json` (`Problem`s, FastAPI's validation errors, Starlette's HTTP errors).
The `Problem` itself lives in service/problems.py, free of FastAPI."""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.problems import PROBLEM_MEDIA_TYPE, Problem

log = logging.getLogger("vqtok.service")


def problem_response(problem: Problem, instance: str | None = None) -> JSONResponse:
    return JSONResponse(
        problem.body(instance),
        status_code=problem.status,
        headers=problem.headers,
        media_type=PROBLEM_MEDIA_TYPE,
    )


def _location(loc: tuple[Any, ...]) -> str:
    # FastAPI locations look like ("body", "tokens", 0): drop the "body"/"query" source prefix.
    parts = [str(part) for part in loc[1:]] if len(loc) > 1 else [str(part) for part in loc]
    return ".".join(parts)


def validation_problem(exc: RequestValidationError) -> Problem:
    errors = exc.errors()
    # An unparseable JSON body is malformed (400), not a semantically invalid one (422).
    for error in errors:
        if error.get("type") == "json_invalid":
            ctx = error.get("ctx") or {}
            return Problem(
                400,
                "malformed-json",
                f"request body is not valid JSON: {ctx.get('error', error.get('msg'))}",
                field="body",
            )
    first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request"}
    field = _location(tuple(first.get("loc", ())))
    detail = "; ".join(f"{_location(tuple(e.get('loc', ())))}: {e.get('msg')}" for e in errors[:5])
    value = first.get("input")
    if isinstance(value, dict | list) or (isinstance(value, str | bytes) and len(value) > 200):
        value = None  # never echo whole bodies or uploads back
    return Problem(422, "invalid-request", detail, field=field, value=value)


def install_problem_handlers(app: FastAPI) -> None:
    """Answer every error the app raises as problem+json."""

    async def on_problem(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, Problem)
        return problem_response(exc, request.url.path)

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return problem_response(validation_problem(exc), request.url.path)

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        kind = {404: "not-found", 405: "method-not-allowed"}.get(exc.status_code, "http-error")
        detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        if exc.status_code == 400 and exc.__cause__ is not None:
            # FastAPI's "error parsing the body": say what was wrong with it.
            detail = f"{detail}: {exc.__cause__}"
            kind = "malformed-body"
        problem = Problem(exc.status_code, kind, detail, headers=exc.headers)
        return problem_response(problem, request.url.path)

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        problem = Problem(500, "internal-error", "the server failed; the error was logged")
        return problem_response(problem, request.url.path)

    app.add_exception_handler(Problem, on_problem)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_unexpected)
