"""The HTTP API against the ASGI app with a fake engine: answers, errors, limits, auth, drain."""

from __future__ import annotations

import asyncio
import base64
import io
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from service_fakes import FakeEngine, bomb_png, gradient_image, make_client, png_bytes

from service.app import create_app
from service.engine import InputError
from service.settings import Settings

K = 16  # the fake engine's codebook size


def grey_png(level: int, size: tuple[int, int] = (32, 32)) -> bytes:
    """A uniform image; the fake engine's tokens for it are all `level`."""
    value = round((level + 0.5) / K * 255)
    return png_bytes(np.full((*size, 3), value, dtype=np.uint8))


def files(*uploads: bytes, field: str = "images") -> list[tuple[str, tuple[str, bytes, str]]]:
    return [(field, (f"{i}.png", data, "image/png")) for i, data in enumerate(uploads)]


def problem(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["status"] == status and body["title"] and body["type"].startswith("https://")
    return body


# -- answers --------------------------------------------------------------------------------


def test_health_and_model(client: TestClient) -> None:
    assert client.get("/health/live").json() == {"status": "ok", "model": None}
    assert client.get("/health/ready").json()["model"] == "fake-f8-k16-000000000000"
    assert client.get("/v1/model").json()["codebook_size"] == K


def test_not_ready_before_the_model_is_loaded(fake_engine: FakeEngine) -> None:
    client = make_client(fake_engine)  # not entered: the lifespan has not loaded the engine
    assert client.get("/health/live").status_code == 200
    ready = client.get("/health/ready")
    assert ready.status_code == 503 and ready.headers["retry-after"] == "1"
    body = problem(client.post("/v1/encode", files=files(grey_png(3))), 503)
    assert "not loaded" in body["detail"]


def test_encode_many_images_keeps_upload_order_and_names_the_model(client: TestClient) -> None:
    response = client.post("/v1/encode", files=files(grey_png(3), grey_png(9), grey_png(12)))
    assert response.status_code == 200
    body = response.json()
    assert body["model"] == {"id": "fake-f8-k16-000000000000", "codebook_size": K, "downsample": 8}
    assert response.headers["x-model-id"] == body["model"]["id"]
    assert [item["tokens"] for item in body["items"]] == [
        [[level] * 4 for _ in range(4)] for level in (3, 9, 12)
    ]
    assert body["items"][0]["shape"] == [4, 4] and body["items"][0]["image_size"] == [32, 32]


def test_base64_tokens_are_little_endian_uint16_row_major(client: TestClient) -> None:
    upload = files(png_bytes(gradient_image(24, 40)))
    as_json = client.post("/v1/encode", files=upload, data={"resize": "none"}).json()["items"][0]
    as_b64 = client.post(
        "/v1/encode", files=upload, data={"resize": "none", "format": "base64"}
    ).json()["items"][0]
    decoded = np.frombuffer(base64.b64decode(as_b64["tokens"]), dtype="<u2").reshape(3, 5)
    assert as_b64["shape"] == [3, 5]
    np.testing.assert_array_equal(decoded, as_json["tokens"])


def test_pad_then_decode_with_original_size_gives_the_original_size(client: TestClient) -> None:
    item = client.post(
        "/v1/encode", files=files(png_bytes(gradient_image(13, 21))), data={"resize": "pad"}
    ).json()["items"][0]
    assert item["image_size"] == [16, 24] and item["original_size"] == [13, 21]
    response = client.post(
        "/v1/decode", json={"tokens": item["tokens"], "original_size": item["original_size"]}
    )
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(response.content)).size == (21, 13)


def test_decode_single_is_png_and_batch_is_json(client: TestClient) -> None:
    grid = [[5, 5], [5, 5]]
    single = client.post(
        "/v1/decode", json={"tokens": grid, "model_id": "fake-f8-k16-000000000000"}
    )
    assert single.headers["content-type"] == "image/png"
    assert single.headers["x-model-id"] == "fake-f8-k16-000000000000"
    pixels = np.asarray(Image.open(io.BytesIO(single.content)))
    assert pixels.shape == (16, 16, 3)
    assert np.all(pixels == round((5 + 0.5) / K * 255))
    batch = client.post("/v1/decode", json={"tokens": [grid, [[1, 2], [3, 4]]]})
    body = batch.json()
    assert batch.status_code == 200 and len(body["items"]) == 2
    second = Image.open(io.BytesIO(base64.b64decode(body["items"][1]["png_b64"])))
    assert second.size == (16, 16) and body["items"][1]["size"] == [16, 16]
    b64 = base64.b64encode(np.array(grid, dtype="<u2").tobytes()).decode()
    again = client.post("/v1/decode", json={"tokens_b64": b64, "shape": [2, 2]})
    assert again.content == single.content


def test_reconstruct_returns_png_and_psnr(client: TestClient) -> None:
    response = client.post("/v1/reconstruct", files=files(grey_png(6, (40, 48)), field="image"))
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(response.content)).size == (32, 32)
    # A uniform image at a level's centre comes back within PNG rounding.
    assert float(response.headers["x-psnr-db"]) > 40


# -- bad input ------------------------------------------------------------------------------

BAD_TOKENS = [
    ({"tokens": [[1, -1], [2, 3]]}, 422, "token -1 at index [0, 1]"),
    ({"tokens": [[1, 2], [3, 16]]}, 422, "outside [0, 16)"),
    ({"tokens": [[1, 2.5], [3, 4]]}, 422, "must be integers, got a float (2.5)"),
    ({"tokens": [[1, 2], [3]]}, 422, "not a rectangular grid"),
    ({"tokens": [[]]}, 422, "empty token grid"),
    ({"tokens": []}, 422, "empty token grid"),
    ({"tokens": [[1.0]]}, 422, "must be integers, got a float (1.0)"),
    ({"tokens": [1, 2, 3]}, 422, "got rank 1"),
    ({"tokens": [[[[1]]]]}, 422, "got rank 4"),
    ({"tokens": [["a", "b"]]}, 422, "nested lists of integers"),
    ({"tokens": [[0] * 200] * 200}, 413, "40000 tokens; the limit is 16384"),
    ({"tokens": [[[0]]] * 17}, 413, "batch of 17 grids; the limit is 16"),
    ({"tokens_b64": "%%%not-base64", "shape": [2, 2]}, 400, "not valid base64"),
    ({"tokens_b64": "AAAA", "shape": [2, 2]}, 422, "3 bytes decoded, shape [2, 2] needs 8"),
    ({"tokens_b64": "AAAAAAAAAAA=", "shape": [2]}, 422, "need [h, w] or [n, h, w]"),
    ({"tokens_b64": "AAAAAAAAAAA="}, 422, "needs `shape`"),
    ({}, 422, "exactly one of"),
    ({"tokens": [[1]], "model_id": "vqtok-other"}, 409, "this service runs"),
    ({"tokens": [[1, 1]], "original_size": [9, 4]}, 422, "original_size"),
    ({"tokens": [[1]], "colour": "blue"}, 422, "colour"),
]


@pytest.mark.parametrize(("body", "status", "message"), BAD_TOKENS)
def test_bad_tokens(client: TestClient, body: dict, status: int, message: str) -> None:
    assert message in problem(client.post("/v1/decode", json=body), status)["detail"]


def test_bad_token_problems_name_field_limit_and_value(client: TestClient) -> None:
    body = problem(client.post("/v1/decode", json={"tokens": [[1, 99]]}), 422)
    assert (body["field"], body["limit"], body["value"]) == ("tokens", [0, 15], 99)
    body = problem(client.post("/v1/decode", json={"tokens": [[1]], "model_id": "x"}), 409)
    assert (body["field"], body["value"]) == ("model_id", "x")


def test_malformed_json_and_wrong_media_type(client: TestClient) -> None:
    headers = {"content-type": "application/json"}
    assert (
        "not valid JSON"
        in problem(client.post("/v1/decode", content=b'{"tokens": [[1', headers=headers), 400)[
            "detail"
        ]
    )
    body = problem(
        client.post("/v1/decode", content=b"tokens", headers={"content-type": "text/plain"}), 415
    )
    assert body["value"] == "text/plain"
    assert (
        "multipart/form-data"
        in problem(client.post("/v1/encode", json={"images": []}), 415)["detail"]
    )


def test_bad_uploads(client: TestClient) -> None:
    body = problem(client.post("/v1/encode", files=files(b"%PDF-1.4 not an image")), 415)
    assert "not an image" in body["detail"] and body["field"] == "images"
    png = png_bytes(gradient_image(64, 64))
    assert "truncated" in problem(client.post("/v1/encode", files=files(png[:300])), 400)["detail"]
    body = problem(client.post("/v1/encode", files=files(grey_png(1), bomb_png())), 413)
    assert (body["field"], body["limit"], body["value"]) == ("images[1]", 4096 * 4096, 50_000**2)
    body = problem(client.post("/v1/encode", files=files(*[grey_png(1)] * 17)), 413)
    assert (body["limit"], body["value"]) == (16, 17)
    body = problem(
        client.post("/v1/encode", files=files(grey_png(1)), data={"resize": "stretch"}), 422
    )
    assert body["field"] == "resize"
    body = problem(
        client.post(
            "/v1/encode", files=files(png_bytes(gradient_image(20, 20))), data={"resize": "none"}
        ),
        422,
    )
    assert body["value"] == [20, 20]
    assert problem(
        client.post("/v1/encode", data={"resize": "fit"}, files={"other": ("x", b"1")}), 422
    )


def test_token_grid_limit_applies_to_uploads(fake_engine: FakeEngine) -> None:
    with make_client(fake_engine, max_token_grid=16) as client:
        upload = files(png_bytes(gradient_image(40, 32)))
        body = problem(client.post("/v1/encode", files=upload, data={"resize": "pad"}), 413)
        assert (body["limit"], body["value"]) == (16, 20)


def test_body_limit_by_content_length_and_while_streaming(fake_engine: FakeEngine) -> None:
    with make_client(fake_engine, max_body_bytes=4096) as client:
        big = png_bytes(gradient_image(64, 64))  # ~12 kB of noise
        body = problem(client.post("/v1/encode", files=files(big)), 413)
        assert body["field"] == "body" and body["limit"] == 4096 and body["value"] > 4096

        def chunks():  # no Content-Length: the gate must count
            for _ in range(10):
                yield b"x" * 1000

        response = client.post(
            "/v1/decode", content=chunks(), headers={"content-type": "application/json"}
        )
        body = problem(response, 413)
        assert body["limit"] == 4096 and body["value"] > 4096


def test_api_key(fake_engine: FakeEngine) -> None:
    with make_client(fake_engine, api_key="s3cret") as client:
        missing = client.post("/v1/decode", json={"tokens": [[1]]})
        assert "API key" in problem(missing, 401)["detail"]
        assert missing.headers["www-authenticate"].startswith("Bearer")
        wrong = client.post("/v1/decode", json={"tokens": [[1]]}, headers={"x-api-key": "s3cre"})
        problem(wrong, 401)
        problem(client.get("/v1/model", headers={"authorization": "Bearer nope"}), 401)
        ok = client.post("/v1/decode", json={"tokens": [[1]]}, headers={"x-api-key": "s3cret"})
        assert ok.status_code == 200
        assert (
            client.get("/v1/model", headers={"authorization": "Bearer s3cret"}).status_code == 200
        )
        assert client.get("/health/ready").status_code == 200  # probes need no key
        assert client.get("/metrics").status_code == 200
        schema = client.get("/openapi.json").json()
        assert schema["paths"]["/v1/encode"]["post"]["security"] == [{"bearer": []}, {"apiKey": []}]
        assert "security" not in schema["paths"]["/health/ready"]["get"]


def test_engine_input_errors_are_422_and_other_failures_500(fake_engine: FakeEngine) -> None:
    def picky(images: np.ndarray) -> np.ndarray:
        raise InputError(
            "images: height 8 is below the minimum 16", field="images", limit=16, value=8
        )

    fake_engine.encode = picky  # type: ignore[method-assign]
    fake_engine.decode = lambda tokens: 1 / 0  # type: ignore[method-assign]
    with make_client(fake_engine) as client:
        body = problem(client.post("/v1/encode", files=files(grey_png(1))), 422)
        assert (body["field"], body["limit"], body["value"]) == ("images", 16, 8)
        body = problem(client.post("/v1/decode", json={"tokens": [[1]]}), 500)
        assert "logged" in body["detail"]
        assert client.get("/health/ready").status_code == 200  # still serving


# -- concurrency: overload and drain (async client, lifespan run by hand) -----------------


@asynccontextmanager
async def running(engine: FakeEngine, **overrides: object) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(Settings(model_dir="unused", **overrides), engine=engine)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            client.app = app  # type: ignore[attr-defined]
            yield client


async def wait_for(predicate, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


@pytest.mark.anyio
async def test_overload_answers_503_with_retry_after_then_recovers(fake_engine: FakeEngine) -> None:
    fake_engine.gate.clear()  # the engine hangs until released
    async with running(
        fake_engine, max_batch=1, max_wait_ms=0, max_queue=2, max_images=2
    ) as client:
        service = client.app.state.service  # type: ignore[attr-defined]
        first = asyncio.ensure_future(client.post("/v1/encode", files=files(grey_png(1))))
        await wait_for(fake_engine.entered.is_set)
        queued = [
            asyncio.ensure_future(client.post("/v1/encode", files=files(grey_png(level))))
            for level in (2, 3)
        ]
        await wait_for(lambda: service.batcher.queue_depth == 2)
        refused = await client.post("/v1/encode", files=files(grey_png(4)))
        body = problem(refused, 503)
        assert refused.headers["retry-after"] == "1"
        assert (body["limit"], body["value"]) == (2, 3)
        assert (await client.get("/health/ready")).status_code == 200
        assert "vqtok_queue_depth 2.0" in (await client.get("/metrics")).text
        fake_engine.gate.set()
        answers = [await first, *[await task for task in queued]]
        assert [a.json()["items"][0]["tokens"][0][0] for a in answers] == [1, 2, 3]
        again = await client.post("/v1/encode", files=files(grey_png(4)))
        assert again.status_code == 200


@pytest.mark.anyio
async def test_drain_finishes_accepted_requests_and_refuses_new_ones(
    fake_engine: FakeEngine,
) -> None:
    fake_engine.gate.clear()
    async with running(fake_engine, max_batch=8, max_wait_ms=0) as client:
        service = client.app.state.service  # type: ignore[attr-defined]
        accepted = [
            asyncio.ensure_future(client.post("/v1/encode", files=files(grey_png(level))))
            for level in range(1, 6)
        ]
        await wait_for(fake_engine.entered.is_set)
        service.begin_drain()
        assert (await client.get("/health/ready")).status_code == 503
        assert (await client.get("/health/live")).json()["status"] == "draining"
        shutdown = asyncio.ensure_future(service.shutdown())
        await asyncio.sleep(0.05)
        late = await client.post("/v1/encode", files=files(grey_png(7)))
        assert "shutting down" in problem(late, 503)["detail"]
        fake_engine.gate.set()
        await shutdown
        answers = [await task for task in accepted]
        assert [a.status_code for a in answers] == [200] * 5
        assert [a.json()["items"][0]["tokens"][0][0] for a in answers] == [1, 2, 3, 4, 5]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# -- documents: metrics and OpenAPI ---------------------------------------------------------


def test_metrics_count_requests_batches_and_codes(client: TestClient) -> None:
    client.post("/v1/encode", files=files(grey_png(3), grey_png(9)))
    client.post("/v1/decode", json={"tokens": [[99]]})
    text = client.get("/metrics").text
    assert 'vqtok_http_requests_total{method="POST",route="/v1/encode",status="200"} 1.0' in text
    assert 'vqtok_http_requests_total{method="POST",route="/v1/decode",status="422"} 1.0' in text
    assert 'vqtok_batch_size_sum{operation="encode"} 2.0' in text
    assert "vqtok_codebook_distinct_codes 2.0" in text
    assert "vqtok_codebook_usage_entropy_bits 1.0" in text  # two codes, equally often
    assert 'vqtok_engine_seconds_count{operation="encode"} 1.0' in text


def test_openapi_documents_problems_and_pngs(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    assert "ProblemDetails" in schema["components"]["schemas"]
    paths = schema["paths"]
    for path, statuses in {
        "/v1/encode": ["400", "401", "413", "415", "422", "503"],
        "/v1/decode": ["400", "401", "409", "413", "415", "422", "503"],
        "/v1/reconstruct": ["400", "401", "413", "415", "422", "503"],
    }.items():
        responses = paths[path]["post"]["responses"]
        for status in statuses:
            assert list(responses[status]["content"]) == ["application/problem+json"]
    assert "image/png" in paths["/v1/decode"]["post"]["responses"]["200"]["content"]
    assert "image/png" in paths["/v1/reconstruct"]["post"]["responses"]["200"]["content"]
    assert "X-PSNR-dB" in paths["/v1/reconstruct"]["post"]["responses"]["200"]["headers"]


def test_the_service_never_imports_torch() -> None:
    code = (
        "import sys, service.app, service.routes, service.cli; "
        "service.app.create_app; "
        "bad = [m for m in ('torch', 'vqmodel', 'training') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
