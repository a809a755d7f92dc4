"""service.client against a real vqtok-serve (the small test model), and its retry of 503s."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import httpx
import numpy as np
import pytest
from e2e_support import Server, bomb_png, png
from PIL import Image

from service.client import AsyncClient, Client, ModelMismatch, ServiceError, Unavailable


def _photo(seed: int, size: tuple[int, int] = (64, 96)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (*size, 3), dtype=np.uint8)


def test_encode_takes_paths_bytes_pil_and_arrays(server: Server, tmp_path: Path) -> None:
    rgb = _photo(0)
    path = tmp_path / "photo.png"
    path.write_bytes(png(rgb))
    with Client(server.base_url) as client:
        model = client.model()
        grids = client.encode([path, png(rgb), Image.fromarray(rgb), rgb], resize="pad")
    f = model["downsample"]
    assert len(grids) == 4 and {g.model_id for g in grids} == {model["id"]}
    for grid in grids:  # the same pixels in four forms: the same tokens
        np.testing.assert_array_equal(grid.tokens, grids[0].tokens)
        assert grid.tokens.shape == (64 // f, 96 // f)
        assert grid.original_size == (64, 96) and grid.image_size == (64, 96)


def test_more_images_than_one_request_takes_are_split(server: Server) -> None:
    photos = [_photo(seed, (32, 32)) for seed in range(20)]
    with Client(server.base_url) as client:
        grids = client.encode(photos, resize="none")
        alone = [client.encode([rgb], resize="none")[0] for rgb in photos]
        images = client.decode(grids)
    assert [g.tokens.tolist() for g in grids] == [g.tokens.tolist() for g in alone]
    assert [image.size for image in images] == [(32, 32)] * 20


def test_reconstruct_and_decode_agree(server: Server) -> None:
    rgb = _photo(1)
    with Client(server.base_url) as client:
        image, psnr = client.reconstruct(rgb, resize="none")
        (grid,) = client.encode([rgb], resize="none")
        (decoded,) = client.decode([grid])
    assert image.size == (96, 64) and np.isfinite(psnr)
    np.testing.assert_array_equal(np.asarray(image), np.asarray(decoded))


def test_errors_are_typed_and_name_the_field(server: Server) -> None:
    with Client(server.base_url) as client:
        with pytest.raises(ServiceError) as caught:
            client.encode([bomb_png()])
        assert caught.value.status == 413 and caught.value.field == "images"
        (grid,) = client.encode([_photo(2)], resize="none")
        foreign = dataclasses.replace(grid, model_id="vqtok-f8-k64-000000000000")
        with pytest.raises(ModelMismatch) as mismatch:
            client.decode([foreign])
        assert mismatch.value.status == 409 and mismatch.value.field == "model_id"


def test_async_client_round_trip(server: Server) -> None:
    async def round_trip() -> tuple[list, list]:
        async with AsyncClient(server.base_url) as client:
            grids = await client.encode([_photo(3)], resize="none")
            return grids, await client.decode(grids)

    grids, images = asyncio.run(round_trip())
    assert len(grids) == 1 and images[0].size == (96, 64)


def test_503_is_retried_after_its_retry_after_then_raised() -> None:
    calls: list[str] = []

    def busy(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        body = {"type": "x", "title": "Service Unavailable", "status": 503, "detail": "full"}
        return httpx.Response(503, json=body, headers={"Retry-After": "0"})

    client = Client("http://vqtok.test", retries=2, transport=httpx.MockTransport(busy))
    with pytest.raises(Unavailable) as caught:
        client.reconstruct(_photo(4))
    assert calls == ["/v1/reconstruct"] * 3 and caught.value.detail == "full"


def test_a_503_then_an_answer_is_one_success() -> None:
    answers = iter([503, 200])

    def flaky(request: httpx.Request) -> httpx.Response:
        if next(answers) == 503:
            return httpx.Response(503, json={"title": "busy"}, headers={"Retry-After": "0"})
        return httpx.Response(200, content=png(_photo(5)), headers={"X-PSNR-dB": "31.5"})

    with Client("http://vqtok.test", transport=httpx.MockTransport(flaky)) as client:
        image, psnr = client.reconstruct(_photo(5))
    assert psnr == 31.5 and image.size == (96, 64)


def test_the_readme_example_runs_as_written(server: Server, tmp_path: Path, monkeypatch) -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    start = readme.index("```python\nfrom service.client import Client")
    code = readme[start + len("```python\n") : readme.index("```", start + 10)]
    (tmp_path / "photo.jpg").write_bytes(png(_photo(6)))  # Pillow reads it by content
    monkeypatch.chdir(tmp_path)
    exec(compile(code.replace("http://127.0.0.1:8000", server.base_url), "README.md", "exec"), {})
