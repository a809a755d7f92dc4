"""service.engine: verified loading, provider checks, input validation, batch-size invariance."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from service.engine import Engine, EngineError, InputError


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Engine:
    return Engine(tiny_model_dir, providers="cpu", intra_op_threads=1)


@pytest.fixture
def model_copy(tiny_model_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    return copy


def test_info_comes_from_model_json(engine: Engine, tiny_model_dir: Path) -> None:
    manifest = json.loads((tiny_model_dir / "model.json").read_text())
    assert engine.info.id == manifest["id"]
    assert engine.info.id.startswith("vqtok-f8-k64-")
    info = engine.info
    assert (info.codebook_size, info.downsample, info.image_size) == (64, 8, 64)
    assert "files" not in engine.info.public  # host details stay private
    assert engine.info.public["io"]["encoder"]["inputs"][0]["name"] == "images"
    assert engine.active_providers == ["CPUExecutionProvider"]


def test_encode_decode_shapes_and_ranges(engine: Engine, photo_images: list) -> None:
    for photo in photo_images:
        h, w = photo.shape[1:]
        tokens = engine.encode(photo[None])
        assert tokens.dtype == np.int64 and tokens.shape == (1, h // 8, w // 8)
        assert tokens.min() >= 0 and tokens.max() < 64
        images = engine.decode(tokens)
        assert images.dtype == np.float32 and images.shape == (1, 3, h, w)
        assert images.min() >= 0.0 and images.max() <= 1.0


def test_photos_use_many_codes(engine: Engine, photo_images: list) -> None:
    # the fixture's k-means codebook is what makes token comparisons meaningful
    used = np.unique(np.concatenate([engine.encode(p[None]).ravel() for p in photo_images]))
    assert used.size >= 32


def test_same_tokens_at_batch_1_and_inside_a_batch_of_8(engine: Engine, photo_images: list) -> None:
    rng = np.random.default_rng(0)
    for photo in photo_images:
        others = rng.random((7, *photo.shape), dtype=np.float32)
        batch = np.concatenate([others[:3], photo[None], others[3:]])
        alone = engine.encode(photo[None])[0]
        in_batch = engine.encode(batch)[3]
        np.testing.assert_array_equal(alone, in_batch)
        np.testing.assert_allclose(
            engine.decode(alone[None])[0], engine.decode(engine.encode(batch))[3], atol=1e-5
        )


def test_integer_token_dtypes_are_accepted(engine: Engine) -> None:
    tokens = np.arange(64).reshape(1, 8, 8)
    reference = engine.decode(tokens.astype(np.int64))
    for dtype in (np.uint16, np.int32, np.uint8):
        np.testing.assert_array_equal(engine.decode(tokens.astype(dtype)), reference)


# -- startup errors ----------------------------------------------------------------------------
def test_corrupt_file_is_named(model_copy: Path) -> None:
    data = bytearray((model_copy / "encoder.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (model_copy / "encoder.onnx").write_bytes(bytes(data))
    with pytest.raises(EngineError, match=r"encoder\.onnx: sha256 .* does not match model\.json"):
        Engine(model_copy, providers="cpu", warmup=False)


def test_missing_file_is_named(model_copy: Path) -> None:
    (model_copy / "decoder.onnx").unlink()
    with pytest.raises(EngineError, match=r"decoder\.onnx is missing"):
        Engine(model_copy, providers="cpu", warmup=False)


def test_missing_model_json(model_copy: Path) -> None:
    (model_copy / "model.json").unlink()
    with pytest.raises(EngineError, match=r"model\.json is missing"):
        Engine(model_copy, providers="cpu", warmup=False)
    with pytest.raises(EngineError, match="does not exist"):
        Engine(model_copy / "nope", providers="cpu", warmup=False)


def test_explicit_gpu_request_without_gpu_fails(tiny_model_dir: Path) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA: the CPU-only failure cannot be provoked")
    for providers in ("cuda", "tensorrt"):
        with pytest.raises(EngineError, match=f"providers='{providers}'.*only has"):
            Engine(tiny_model_dir, providers=providers, warmup=False)
    with pytest.raises(EngineError, match="is not one of"):
        Engine(tiny_model_dir, providers="gpu", warmup=False)


def test_auto_runs_on_what_is_available(tiny_model_dir: Path) -> None:
    engine = Engine(tiny_model_dir, providers="auto", warmup=False)
    assert engine.active_providers[-1] == "CPUExecutionProvider"


def test_engine_module_never_imports_torch() -> None:
    code = (
        "import sys, service.engine, service.model_dir; "
        "sys.exit(1 if 'torch' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# -- input validation --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("images", "field", "limit"),
    [
        (np.zeros((3, 64, 64), np.float32), "images.shape", "[N,3,H,W]"),
        (np.zeros((1, 1, 64, 64), np.float32), "images.shape", "[N,3,H,W]"),
        (np.zeros((1, 3, 64, 64), np.float64), "images.dtype", "float32"),
        (np.zeros((1, 3, 64, 64), np.uint8), "images.dtype", "float32"),
        (np.zeros((1, 3, 60, 64), np.float32), "images.shape[2]", "multiple of 8"),
        (np.zeros((1, 3, 64, 36), np.float32), "images.shape[3]", "multiple of 8"),
        (np.zeros((0, 3, 64, 64), np.float32), "images.shape[0]", ">= 1"),
        (np.full((1, 3, 64, 64), 1.5, np.float32), "images", "[0, 1]"),
        (np.full((1, 3, 64, 64), np.nan, np.float32), "images", "[0, 1]"),
        ([[0.0]], "images", "numpy.ndarray"),
    ],
)
def test_bad_images_are_rejected(engine: Engine, images: object, field: str, limit: str) -> None:
    with pytest.raises(InputError) as caught:
        engine.encode(images)  # type: ignore[arg-type]
    assert caught.value.field == field
    assert caught.value.limit == limit


def test_bad_image_reports_value(engine: Engine) -> None:
    with pytest.raises(InputError) as caught:
        engine.encode(np.zeros((1, 3, 60, 64), np.float32))
    assert caught.value.value == 60
    assert "60" in str(caught.value) and "f=8" in str(caught.value)


@pytest.mark.parametrize(
    ("tokens", "field", "limit", "value"),
    [
        (np.full((1, 8, 8), -1, np.int64), "tokens", "[0, 64)", -1),
        (np.full((1, 8, 8), 64, np.int64), "tokens", "[0, 64)", 64),
        (np.full((1, 8, 8), 70000, np.int32), "tokens", "[0, 64)", 70000),
        (np.zeros((1, 8, 8), np.float32), "tokens.dtype", "integer", "float32"),
        (np.zeros((1, 8, 8), bool), "tokens.dtype", "integer", "bool"),
        (np.zeros((8, 8), np.int64), "tokens.shape", "[N,h,w]", [8, 8]),
        (np.zeros((1, 0, 8), np.int64), "tokens.shape", "[N,h,w]", [1, 0, 8]),
    ],
)
def test_bad_tokens_are_rejected(
    engine: Engine, tokens: np.ndarray, field: str, limit: str, value: object
) -> None:
    with pytest.raises(InputError) as caught:
        engine.decode(tokens)
    assert (caught.value.field, caught.value.limit, caught.value.value) == (field, limit, value)
    assert isinstance(caught.value, ValueError)
