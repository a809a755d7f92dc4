"""Admission: every limit decided from headers, before a pixel is decoded; the memory budgets."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from service_fakes import FakeEngine, bomb_png, gradient_image, make_client, png_bytes

from service.admission import Limits, MemoryBudget, ModelGeometry, admit_uploads
from service.cpu import cpu_quota
from service.problems import Problem

MODEL = ModelGeometry(native_size=32, downsample=8, engine_bytes_per_pixel=700)
LIMITS = Limits(
    max_body_bytes=1 << 25,
    max_pixels=4096 * 4096,
    max_images=16,
    max_token_grid=64 * 64,
    max_request_bytes=256 << 20,
)


def files(*uploads: bytes, field: str = "images") -> list[tuple[str, tuple[str, bytes, str]]]:
    return [(field, (f"{i}.png", data, "image/png")) for i, data in enumerate(uploads)]


def problem(response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    return response.json()


def test_pad_and_none_over_the_token_grid_are_refused_from_the_header_alone() -> None:
    # 4000 x 4000 declared, almost no pixel data: decoding would fail with 400 "truncated";
    # a 413 proves the decision was made from the header.
    header_only = bomb_png(4000, 4000)
    for policy in ("pad", "none"):
        with pytest.raises(Problem) as caught:
            admit_uploads([header_only], policy=policy, model=MODEL, limits=LIMITS)
        assert caught.value.status == 413 and caught.value.kind == "token-grid-too-large"
        assert caught.value.value == 500 * 500 and caught.value.field == "images"
    # fit gives a 4x4 grid: admitted (decoding it later is the image policy's business)
    admitted = admit_uploads([header_only], policy="fit", model=MODEL, limits=LIMITS)
    assert [image.model_size for image in admitted.images] == [(32, 32)]


def test_none_needs_multiples_of_f_before_decoding() -> None:
    with pytest.raises(Problem) as caught:
        admit_uploads([bomb_png(20, 24)], policy="none", model=MODEL, limits=LIMITS)
    assert caught.value.status == 422 and caught.value.value == [24, 20]


def test_request_cost_counts_raster_inputs_and_engine() -> None:
    admitted = admit_uploads([bomb_png(512, 512)] * 4, policy="pad", model=MODEL, limits=LIMITS)
    inputs = 4 * 512 * 512 * 12
    engine = 512 * 512 * 700
    raster = 512 * 512 * (4 + 4 + 6)  # RGB: raster, one copy, the uint8 arrays
    assert admitted.cost_bytes == raster + inputs + engine
    tight = Limits(**{**LIMITS.__dict__, "max_request_bytes": admitted.cost_bytes - 1})
    with pytest.raises(Problem) as caught:
        admit_uploads([bomb_png(512, 512)] * 4, policy="pad", model=MODEL, limits=tight)
    assert caught.value.status == 413 and caught.value.kind == "request-too-costly"
    assert caught.value.value == admitted.cost_bytes
    assert f"{admitted.cost_bytes / 2**20:.1f} MiB" in caught.value.detail


def test_memory_budget_waits_then_refuses_with_retry_after() -> None:
    async def scenario() -> tuple[list[str], Problem]:
        budget = MemoryBudget(capacity=100, wait_s=0.2, retry_after_s=3)
        order: list[str] = []

        async def holder() -> None:
            async with budget.reserve(60):
                order.append("a in")
                await asyncio.sleep(0.05)
            order.append("a out")

        async def waiter() -> None:
            await asyncio.sleep(0.01)
            async with budget.reserve(60):  # fits only once the holder leaves
                order.append("b in")

        await asyncio.gather(holder(), waiter())
        async with budget.reserve(100):
            try:
                async with budget.reserve(1):
                    pass
            except Problem as refused:
                assert budget.in_use == 100
                return order, refused
        raise AssertionError("the second reservation should not fit")

    order, refused = asyncio.run(scenario())
    assert order == ["a in", "a out", "b in"]
    assert refused.status == 503 and refused.headers["Retry-After"] == "3"
    assert refused.kind == "memory-busy"


def test_decode_body_is_capped_by_the_largest_valid_batch(fake_engine: FakeEngine) -> None:
    with make_client(fake_engine, max_images=2, max_token_grid=16) as client:
        limit = 2 * 16 * 8 + 64 * 1024
        body = json.dumps({"tokens": [[0] * 4] * 4, "model_id": "x" * limit}).encode()
        answer = problem(
            client.post("/v1/decode", content=body, headers={"Content-Type": "application/json"}),
            413,
        )
        assert answer["limit"] == limit and answer["field"] == "body"
        assert "max_images x max_token_grid" in answer["detail"]


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_in_decode_are_a_4xx_problem(client: TestClient, literal: str) -> None:
    body = '{"tokens": [[0, LITERAL], [1, 2]]}'.replace("LITERAL", literal)
    response = client.post("/v1/decode", content=body, headers={"Content-Type": "application/json"})
    assert 400 <= response.status_code < 500, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["field"] == "tokens"


def test_reconstruct_errors_name_the_image_field(client: TestClient) -> None:
    answer = problem(
        client.post("/v1/reconstruct", files=files(b"not an image", field="image")), 415
    )
    assert answer["field"] == "image" and answer["detail"].startswith("image:")
    answer = problem(
        client.post(
            "/v1/reconstruct",
            files=files(bomb_png(4000, 4000), field="image"),
            data={"resize": "pad"},
        ),
        413,
    )
    assert answer["field"] == "image"


def test_encode_refuses_a_request_over_its_memory_budget(fake_engine: FakeEngine) -> None:
    settings = {"max_inflight_bytes": 1 << 20, "max_request_bytes": 1 << 20}
    with make_client(fake_engine, admission_wait_s=0, **settings) as client:
        # 16 x 64 x 64 pad: inputs 16 x 48 KiB + engine 4 KiB x 704 B: over 1 MiB -> 413
        big = [png_bytes(gradient_image(64, 64, seed)) for seed in range(16)]
        answer = problem(client.post("/v1/encode", files=files(*big), data={"resize": "pad"}), 413)
        assert answer["type"].endswith("/request-too-costly") and answer["field"] == "images"
        ok = client.post("/v1/encode", files=files(png_bytes(gradient_image(32, 32))))
        assert ok.status_code == 200, ok.text


def test_cpu_quota_reads_cgroup_v2_and_v1(tmp_path: Path) -> None:
    cpu_max = tmp_path / "cpu.max"
    missing = tmp_path / "absent"
    cpu_max.write_text("150000 100000\n")
    assert cpu_quota(cpu_max, missing, missing) == min(2, cpu_quota(missing, missing, missing))
    cpu_max.write_text("max 100000\n")
    assert cpu_quota(cpu_max, missing, missing) == cpu_quota(missing, missing, missing)
    quota, period = tmp_path / "quota", tmp_path / "period"
    quota.write_text("50000\n")
    period.write_text("100000\n")
    assert cpu_quota(missing, quota, period) == 1
