"""A real vqtok-serve process: round trips of real photos, batching invariance, concurrency,
bad input over the wire, and the CLI's refusal of a bad model directory."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from e2e_support import DEFAULT_MODEL, REPO, Server, bomb_png, png, read_png, start_server

from service.engine import Engine
from service.images import psnr_from_mse, unit_pixels
from training.data import pip_photos

TIMEOUT = httpx.Timeout(120.0)


def upload(*images: bytes, field: str = "images") -> list[tuple[str, tuple[str, bytes, str]]]:
    return [(field, (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return psnr_from_mse(float(np.mean((a.astype(np.float64) / 255 - b / 255) ** 2)))


@pytest.fixture(scope="module")
def model(server: Server) -> dict[str, Any]:
    return httpx.get(server.base_url + "/v1/model").json()


def round_trip_photos(base_url: str) -> list[dict[str, Any]]:
    """Every pip photo at native size: encode (pad, base64) → decode (crop) → PSNR."""
    results = []
    with httpx.Client(base_url=base_url, timeout=httpx.Timeout(600.0)) as client:
        for name, rgb in pip_photos().images():
            encoded = client.post(
                "/v1/encode", files=upload(png(rgb)), data={"resize": "pad", "format": "base64"}
            )
            assert encoded.status_code == 200, encoded.text
            body = encoded.json()
            item = body["items"][0]
            decoded = client.post(
                "/v1/decode",
                json={
                    "tokens_b64": item["tokens"],
                    "shape": item["shape"],
                    "model_id": body["model"]["id"],
                    "original_size": item["original_size"],
                },
            )
            assert decoded.status_code == 200, decoded.text
            assert decoded.headers["x-model-id"] == body["model"]["id"]
            out = read_png(decoded.content)
            results.append(
                {"name": name, "rgb": rgb, "out": out, "item": item, "psnr": psnr(rgb, out)}
            )
    return results


@pytest.fixture(scope="module")
def photo_round_trips(server: Server) -> list[dict[str, Any]]:
    return round_trip_photos(server.base_url)


def test_photo_round_trip_is_what_the_engine_computes(
    e2e_model_dir: Path, model: dict[str, Any], photo_round_trips: list[dict]
) -> None:
    # The HTTP path (PNG upload, pad, batching, base64 tokens, decode, crop, PNG) must add
    # nothing to the model's own answer: compare with the engine called in this process.
    engine = Engine(e2e_model_dir, providers="cpu", intra_op_threads=1, warmup=False)
    f = model["downsample"]
    for result in photo_round_trips:
        rgb = result["rgb"]
        h, w = rgb.shape[:2]
        padded = np.pad(rgb, ((0, -h % f), (0, -w % f), (0, 0)), mode="edge")
        tokens = engine.encode(unit_pixels(padded)[None])[0]
        item = result["item"]
        got = np.frombuffer(base64.b64decode(item["tokens"]), "<u2").reshape(item["shape"])
        np.testing.assert_array_equal(got, tokens, err_msg=result["name"])
        expected = engine.decode(tokens[None])[0][:, :h, :w].transpose(1, 2, 0)
        expected = np.clip(expected * 255 + 0.5, 0, 255).astype(np.uint8)
        assert result["out"].shape == rgb.shape, result["name"]
        np.testing.assert_array_equal(result["out"], expected, err_msg=result["name"])


def test_default_model_round_trip_psnr_matches_the_model_card() -> None:
    card = json.loads((DEFAULT_MODEL / "model.json").read_text())
    metrics = card.get("metrics") or {}
    stated = metrics.get("psnr")
    if stated is None:
        pytest.skip("models/default/model.json states no metrics.psnr")
    if metrics.get("data", "pip-photos") != "pip-photos":
        pytest.skip(f"the card's PSNR is measured on {metrics['data']!r}, not the pip photos")
    server = start_server(DEFAULT_MODEL, env={"VQTOK_INTRA_OP_THREADS": "0"}, timeout=300)
    try:
        results = round_trip_photos(server.base_url)
    finally:
        server.stop()
    # Same convention as training/evaluate.py: native size, per-image PSNR, mean over images
    # (it reflect-pads where the service edge-pads: a border-only difference).
    measured = float(np.mean([r["psnr"] for r in results]))
    assert abs(measured - stated) <= 0.5, (measured, stated)


def test_reconstruct_header_agrees_with_the_round_trip(
    server: Server, photo_round_trips: list[dict]
) -> None:
    result = photo_round_trips[0]
    response = httpx.post(
        server.base_url + "/v1/reconstruct",
        files=upload(png(result["rgb"]), field="image"),
        data={"resize": "pad"},
        timeout=TIMEOUT,
    )
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert abs(float(response.headers["x-psnr-db"]) - result["psnr"]) < 0.1
    np.testing.assert_array_equal(read_png(response.content), result["out"])


def crops(count: int, size: int = 64) -> list[bytes]:
    photos = [rgb for _, rgb in pip_photos().images()]
    return [
        png(photos[i % len(photos)][8 * i : 8 * i + size, 16 * i : 16 * i + size])
        for i in range(count)
    ]


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def test_same_tokens_alone_and_inside_a_batch_of_8(server: Server) -> None:
    images = crops(8)
    count, total = (
        'vqtok_batch_size_count{operation="encode"}',
        'vqtok_batch_size_sum{operation="encode"}',
    )

    def encode(client: httpx.Client, *batch: bytes) -> list[Any]:
        response = client.post("/v1/encode", files=upload(*batch), data={"resize": "none"})
        assert response.status_code == 200, response.text
        return [item["tokens"] for item in response.json()["items"]]

    def batches(client: httpx.Client) -> tuple[float, float]:
        text = client.get("/metrics").text
        return metric(text, count), metric(text, total)

    with httpx.Client(base_url=server.base_url, timeout=TIMEOUT) as client:
        alone = [encode(client, image)[0] for image in images]
        # No wait needed: the batcher counts a batch before it answers any request in it, so
        # each scrape sees every batch whose response already arrived.
        calls_before, images_before = batches(client)
        together = encode(client, *images)
        calls_after, images_after = batches(client)
    assert alone == together
    # ...and the 8 really went through the engine as one batch.
    assert (calls_after - calls_before, images_after - images_before) == (1, 8)


def test_concurrent_clients_get_their_own_results(server: Server) -> None:
    images = crops(24, size=32)
    with httpx.Client(base_url=server.base_url, timeout=TIMEOUT) as client:
        expected = [
            client.post("/v1/encode", files=upload(i), data={"resize": "none"}).json()["items"][0][
                "tokens"
            ]
            for i in images
        ]
    assert len({json.dumps(t) for t in expected}) > 1  # distinct answers, so mix-ups would show

    async def run() -> list[Any]:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=TIMEOUT) as client:
            encodes = [
                client.post("/v1/encode", files=upload(i), data={"resize": "none"}) for i in images
            ]
            decodes = [client.post("/v1/decode", json={"tokens": t}) for t in expected]
            return await asyncio.gather(*encodes, *decodes)

    answers = asyncio.run(run())
    got = [a.json()["items"][0]["tokens"] for a in answers[: len(images)]]
    assert got == expected
    with httpx.Client(base_url=server.base_url, timeout=TIMEOUT) as client:
        for tokens, answer in zip(expected, answers[len(images) :]):
            alone = client.post("/v1/decode", json={"tokens": tokens})
            assert answer.content == alone.content


def problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    return response.json()


def test_bad_uploads_over_http(server: Server) -> None:
    good = crops(1)[0]
    with httpx.Client(base_url=server.base_url, timeout=TIMEOUT) as client:
        assert (
            "not an image"
            in problem(client.post("/v1/encode", files=upload(b"GIF? no")), 415)["detail"]
        )
        assert (
            "truncated"
            in problem(client.post("/v1/encode", files=upload(good[:200])), 400)["detail"]
        )
        rss_before = server.rss_bytes()
        body = problem(client.post("/v1/encode", files=upload(bomb_png())), 413)
        assert body["value"] == 50_000 * 50_000 and "pixels" in body["detail"]
        assert server.rss_bytes() - rss_before < 32 << 20  # decoding it would take 7.5 GB
        body = problem(client.post("/v1/encode", files=upload(*[good] * 17)), 413)
        assert (body["field"], body["limit"], body["value"]) == ("images", 16, 17)


def test_chunked_body_over_the_limit_is_cut_off(server: Server) -> None:
    # Raw socket: a chunked body with no Content-Length, 16 MiB against an 8 MiB limit.
    host, port = server.base_url.removeprefix("http://").split(":")
    chunk = b"x" * 65536
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/decode HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        try:
            for _ in range(256):
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server stopped reading: expected
        answer = b""
        try:
            while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
                data = sock.recv(65536)
                if not data:
                    break
                answer += data
        except ConnectionResetError:
            pass
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), answer[:300]
    problem_body = json.loads(body[body.index(b"{") :])
    # /v1/decode's cap: the largest valid token batch (16 grids of 128x128 at 8 bytes a token)
    limit = min(8 << 20, 16 * 128 * 128 * 8 + 64 * 1024)
    assert problem_body["limit"] == limit
    # Cut off soon after the limit (uvicorn hands over socket reads of a few chunks at a time),
    # long before the 16 MiB the client meant to send.
    assert limit < problem_body["value"] <= limit + (1 << 20)


def test_bad_tokens_over_http(server: Server, model: dict[str, Any]) -> None:
    k = model["codebook_size"]
    cases = [
        ({"tokens": [[0, -3]]}, 422, "token -3"),
        ({"tokens": [[0, k]]}, 422, f"outside [0, {k})"),
        ({"tokens": [[0, 0.5]]}, 422, "must be integers"),
        ({"tokens": [[0, 1], [2]]}, 422, "not a rectangular grid"),
        ({"tokens": [0, 1]}, 422, "got rank 1"),
        ({"tokens": [[0] * 200] * 200}, 413, "the limit is 16384"),
        ({"tokens_b64": "!!!", "shape": [1, 1]}, 400, "not valid base64"),
        ({"tokens_b64": "AAA=", "shape": [2, 2]}, 422, "needs 8"),
        ({"tokens": [[0]], "model_id": "vqtok-someone-else"}, 409, "vqtok-someone-else"),
    ]
    with httpx.Client(base_url=server.base_url, timeout=TIMEOUT) as client:
        for body, status, message in cases:
            assert message in problem(client.post("/v1/decode", json=body), status)["detail"], body
        response = client.post(
            "/v1/decode", content=b"{", headers={"content-type": "application/json"}
        )
        assert "not valid JSON" in problem(response, 400)["detail"]


def test_cli_refuses_a_bad_model_dir(tmp_path: Path) -> None:
    for model_dir, message in [
        (tmp_path / "missing", "not a model directory"),
        (tmp_path, "not a model directory"),
    ]:
        done = subprocess.run(
            [sys.executable, "-m", "service.cli", "--model-dir", str(model_dir), "--port", "1"],
            cwd=REPO, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 2 and message in done.stderr, done.stderr
    (tmp_path / "model.json").write_text("{not json")
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", "--model-dir", str(tmp_path), "--port", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2 and "cannot load" in done.stderr, done.stderr
