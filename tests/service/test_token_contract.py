"""The token contract on models/default: the same pixels give the same tokens at any batch size,
grouping and intra-op thread count, and the same tokens give the same image.

The comparison lives in benchmarks/token_contract.py (which runs it on 2,000,000 tokens); here it
runs on 200,000 tokens of random real-photo crops, and on a known near-tie crop to show it fails
when the engine hands onnxruntime whole batches.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

import service.engine
from benchmarks.token_contract import (
    BATCH_SIZES,
    DEFAULT_MODEL,
    ContractReport,
    Crop,
    compare_group,
    contract_engines,
    contract_photos,
    run_contract,
)

STRESS_TOKENS = 200_000
# decoding costs ~1.7x encoding, so every 8th group is decoded (8 and the 3-size batch cycle
# are coprime: every batch size is decoded); ~60 CPU-s in all, the two sides run in parallel
DECODE_EVERY = 8

# A crop of china.jpg where two codes nearly tie: under onnxruntime 1.32.0 (CPU) the shipped
# encoder gives token (18, 6) = 990 when the crop runs alone and 854 when it shares a run with
# other images (ReduceMean over channels switches kernels at N > 1). Found by the seed-0 search
# that first measured the flip; another onnxruntime may round differently.
NEAR_TIE = Crop("china", 112, 118, 232, 176)
NEAR_TIE_ORT = "1.32.0"
NEIGHBOURS = (Crop("china", 0, 0, 232, 176), Crop("china", 150, 400, 232, 176))


@pytest.fixture(scope="module")
def photos() -> tuple[dict[str, np.ndarray], str | None]:
    return contract_photos()


@pytest.mark.slow
def test_tokens_and_images_do_not_depend_on_the_batch(photos: tuple) -> None:
    pool, _ = photos
    report = run_contract(DEFAULT_MODEL, pool, STRESS_TOKENS, decode_every=DECODE_EVERY)
    assert report.tokens >= STRESS_TOKENS
    assert sorted(report.by_batch) == sorted(BATCH_SIZES)
    assert report.image_values > 0
    assert (report.differing_tokens, report.differing_values) == (0, 0), "\n".join(
        [f"{report.differing_tokens} of {report.tokens:,} tokens differ", *report.mismatches]
    )


def test_the_stress_set_includes_the_debian_photos(photos: tuple) -> None:
    pool, missing = photos
    if missing is not None:
        pytest.skip(f"the stress test ran on the {len(pool)} pip photos only: {missing}")
    assert sum(name.startswith("/usr/share/backgrounds/") for name in pool) >= 20


def _whole_batch_per_run(session: ort.InferenceSession, name: str, batch: np.ndarray) -> np.ndarray:
    return session.run(None, {name: batch})[0]


def test_the_comparison_fails_when_the_engine_runs_whole_batches(
    photos: tuple, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service.engine, "_one_image_per_run", _whole_batch_per_run)
    reference, batched = contract_engines(DEFAULT_MODEL)
    report = ContractReport()
    compare_group(reference, batched, [NEAR_TIE, *NEIGHBOURS], photos[0], report, decode=True)
    # decoding: the channel means of a batch differ in the last bit from most single-image ones
    assert report.differing_values > 0
    if report.differing_tokens == 0 and ort.__version__ != NEAR_TIE_ORT:
        pytest.skip(f"onnxruntime {ort.__version__} does not flip {NEAR_TIE} (1.32.0 does)")
    assert report.differing_tokens >= 1
    assert f"{NEAR_TIE} in a batch of 3: token (18, 6)" in report.mismatches[0]
