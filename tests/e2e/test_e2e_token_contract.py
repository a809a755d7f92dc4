"""The token contract end to end, on models/default: random photo crops (64–384 px) encoded by a
real vqtok-serve alone, inside multi-image requests and by 16 concurrent clients, and by
`vqtok-tokenize`, give exactly the tokens the engine gives each crop alone (≥ 200,000 tokens)."""

from __future__ import annotations

import base64
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from e2e_support import png, start_server

from benchmarks.token_contract import Crop, contract_photos, crop_groups
from service.engine import Engine
from service.images import unit_pixels
from service.tokenize import main as tokenize_main

DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "models" / "default"
TOKENS = 200_000


@pytest.fixture(scope="module")
def crops() -> list[tuple[np.ndarray, np.ndarray]]:
    """(uint8 crop, the engine's tokens for it alone) for ≥ TOKENS tokens."""
    photos, _ = contract_photos()
    engine = Engine(DEFAULT_MODEL, providers="cpu", intra_op_threads=1)
    pairs = []
    for group in crop_groups(photos, 8, TOKENS, seed=11):
        for crop in group:
            rgb = _rgb(crop, photos)
            pairs.append((rgb, engine.encode(unit_pixels(rgb)[None])[0]))
    return pairs


def _rgb(crop: Crop, photos: dict[str, np.ndarray]) -> np.ndarray:
    rgb = photos[crop.photo][crop.top : crop.top + crop.height, crop.left : crop.left + crop.width]
    return np.ascontiguousarray(rgb)


def _encode(client: httpx.Client, images: list[np.ndarray]) -> list[np.ndarray]:
    files = [("images", (f"{i}.png", png(rgb), "image/png")) for i, rgb in enumerate(images)]
    answer = client.post("/v1/encode", files=files, data={"resize": "none", "format": "base64"})
    assert answer.status_code == 200, answer.text
    return [
        np.frombuffer(base64.b64decode(item["tokens"]), "<u2").reshape(item["shape"])
        for item in answer.json()["items"]
    ]


def _differing(expected: list[np.ndarray], got: list[np.ndarray]) -> int:
    return sum(int((a != b).sum()) for a, b in zip(expected, got, strict=True))


@pytest.mark.slow
def test_http_and_tokenize_give_the_engines_tokens(crops: list, tmp_path: Path) -> None:
    expected = [tokens for _, tokens in crops]
    assert sum(t.size for t in expected) >= TOKENS
    server = start_server(DEFAULT_MODEL, env={"VQTOK_INTRA_OP_THREADS": "2"})
    try:
        with httpx.Client(base_url=server.base_url, timeout=300) as client:
            alone = [_encode(client, [rgb])[0] for rgb, _ in crops]
            # multi-image requests of same-shape crops (the batcher stacks only equal shapes)
            grouped = []
            for start in range(0, len(crops), 8):
                grouped += _encode(client, [rgb for rgb, _ in crops[start : start + 8]])
        with (
            ThreadPoolExecutor(16) as pool,
            httpx.Client(
                base_url=server.base_url, timeout=300, limits=httpx.Limits(max_connections=16)
            ) as client,
        ):
            concurrent = list(pool.map(lambda pair: _encode(client, [pair[0]])[0], crops))
    finally:
        server.stop()
    assert (_differing(expected, alone), _differing(expected, grouped)) == (0, 0)
    assert _differing(expected, concurrent) == 0

    folder = tmp_path / "crops"
    folder.mkdir()
    for index, (rgb, _) in enumerate(crops):
        (folder / f"{index:05d}.png").write_bytes(png(rgb))
    out = tmp_path / "tokens"
    args = [str(folder), "--out", str(out), "--model-dir", str(DEFAULT_MODEL), "--quiet"]
    assert tokenize_main([*args, "--resize", "pad", "--batch-size", "16"]) == 0
    offline = _read_shards(out)
    assert _differing(expected, [offline[f"{i:05d}.png"] for i in range(len(crops))]) == 0


def _read_shards(out: Path) -> dict[str, np.ndarray]:
    grids = {}
    manifest = json.loads((out / "manifest.json").read_text())
    for record in manifest["shards"]:
        with np.load(out / record["file"]) as shard:
            for i, name in enumerate(shard["names"].tolist()):
                start, end = shard["offsets"][i], shard["offsets"][i + 1]
                grids[name] = shard["tokens"][start:end].reshape(shard["token_shapes"][i])
    return grids
