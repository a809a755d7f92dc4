"""The inference engine: a verified model directory run by onnxruntime (numpy only, no torch).

    engine = Engine("models/default", providers="auto", intra_op_threads=2)
    tokens = engine.encode(images)      # float32 [N,3,H,W] in [0,1] -> int64 [N,H/f,W/f]
    images = engine.decode(tokens)      # integer [N,h,w] in [0,K)   -> float32 [N,3,h*f,w*f]

Every input is validated before it reaches onnxruntime (:class:`InputError` names the field, the
limit and the value), so a bad request never turns into an opaque onnxruntime exception.

The token contract: the same model, execution provider and onnxruntime version give the same
tokens for the same pixels at any batch size, request grouping and thread count, and the same
image for the same tokens. Both methods hand onnxruntime one image per call (N=1 always) and
stack the results, so no kernel ever sees a batch (tests/service/test_token_contract.py).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from service.model_dir import (
    DECODER_FILE,
    DECODER_INPUT,
    ENCODER_FILE,
    ENCODER_INPUT,
    ModelDirError,
    public_view,
    read_manifest,
    read_verified,
)

log = logging.getLogger("vqtok.engine")

PROVIDER_CHOICES = ("auto", "cpu", "cuda", "tensorrt")
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
# what each explicit choice asks onnxruntime for, best first (CPU stays as the fallback for the
# few nodes a GPU provider does not take; a whole-graph fallback is detected and refused)
_REQUESTS = {"cpu": [CPU], "cuda": [CUDA, CPU], "tensorrt": [TENSORRT, CUDA, CPU]}


class EngineError(RuntimeError):
    """The engine cannot start: a model file is missing/corrupt or a provider is unavailable."""


class InputError(ValueError):
    """An encode/decode input breaks the io contract; ``field``, ``limit`` and ``value`` say how."""

    def __init__(self, message: str, *, field: str, limit: object, value: object) -> None:
        super().__init__(message)
        self.field = field
        self.limit = limit
        self.value = value


@dataclass(frozen=True)
class ModelInfo:
    """Facts about the loaded model, all read from model.json."""

    id: str
    codebook_size: int
    downsample: int
    image_size: int
    public: dict[str, Any] = field(repr=False)  # model.json minus host paths: GET /v1/model


class Engine:
    """Encoder and decoder onnxruntime sessions of one verified model directory.

    Args:
        model_dir: a directory written by ``vqtok-export``.
        providers: ``auto`` (CUDA when this onnxruntime build has it, else CPU; logged), ``cpu``,
            ``cuda`` or ``tensorrt``. An explicit GPU request that onnxruntime cannot honour is an
            :class:`EngineError`, never a silent CPU fallback.
        intra_op_threads: threads per operator, 0 = onnxruntime's default (one per core).
        inter_op_threads: threads running independent nodes in parallel.
        warmup: run one native-size encode and decode at load (first-call latency, kernel picks).

    Thread spinning is off: spinning workers would steal the event loop's CPU between requests.
    ``encode``/``decode`` are safe to call from several threads (onnxruntime sessions are).
    """

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        providers: str = "auto",
        intra_op_threads: int = 0,
        inter_op_threads: int = 1,
        warmup: bool = True,
    ) -> None:
        self.model_dir = Path(model_dir)
        try:
            manifest = read_manifest(self.model_dir)
            files = read_verified(self.model_dir, manifest)
        except ModelDirError as err:
            raise EngineError(str(err)) from err
        try:
            self.info = ModelInfo(
                id=str(manifest["id"]),
                codebook_size=int(manifest["codebook_size"]),
                downsample=int(manifest["downsample"]),
                image_size=int(manifest["image_size"]),
                public=public_view(manifest),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise EngineError(f"{self.model_dir / 'model.json'}: bad model facts: {err}") from err

        requested = _provider_request(providers)
        options = _session_options(intra_op_threads, inter_op_threads)
        self._encoder = _session(
            files[ENCODER_FILE], options, requested, self.model_dir / ENCODER_FILE
        )
        self._decoder = _session(
            files[DECODER_FILE], options, requested, self.model_dir / DECODER_FILE
        )
        self.active_providers: list[str] = self._encoder.get_providers()
        self._shrink = ort.RunOptions()
        arenas = ";".join(["cpu:0", *(["gpu:0"] if CUDA in self.active_providers else [])])
        self._shrink.add_run_config_entry("memory.enable_memory_arena_shrinkage", arenas)
        for session, name in ((self._encoder, ENCODER_FILE), (self._decoder, DECODER_FILE)):
            _check_providers(providers, requested, session.get_providers(), name)
        if providers == "auto":
            log.info("model %s runs on %s", self.info.id, self.active_providers[0])
        if warmup:
            size = self.info.image_size
            tokens = self.encode(np.zeros((1, 3, size, size), np.float32))
            self.decode(tokens)

    # -- inference -------------------------------------------------------------------------------
    def encode(self, images: np.ndarray) -> np.ndarray:
        """float32 [N,3,H,W] in [0,1] (H, W multiples of f) -> int64 tokens [N,H/f,W/f]."""
        images = self._check_images(images)
        pixels = images.shape[2] * images.shape[3]
        return _one_image_per_run(self._encoder, ENCODER_INPUT, images, self._options(pixels))

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        """Integer tokens [N,h,w] in [0,K) -> float32 images [N,3,h*f,w*f] in [0,1]."""
        tokens = self._check_tokens(tokens)
        pixels = tokens.shape[1] * tokens.shape[2] * self.info.downsample**2
        return _one_image_per_run(self._decoder, DECODER_INPUT, tokens, self._options(pixels))

    def _options(self, pixels: int) -> ort.RunOptions | None:
        # onnxruntime's arena keeps the largest working set it ever needed (~0.6 KB per pixel
        # for models/default: a 1024² image would pin ~0.7 GiB for good): runs above the native
        # size hand their extra memory back afterwards; native-size runs keep the fast path
        return self._shrink if pixels > self.info.image_size**2 else None

    # -- validation ------------------------------------------------------------------------------
    def _check_images(self, images: np.ndarray) -> np.ndarray:
        f = self.info.downsample
        _require_ndarray(images, "images")
        if images.dtype != np.float32:
            raise InputError(
                f"images must be float32 in [0, 1], got dtype {images.dtype}",
                field="images.dtype",
                limit="float32",
                value=str(images.dtype),
            )
        shape = tuple(images.shape)
        if images.ndim != 4 or shape[1] != 3:
            raise InputError(
                f"images must have shape [N,3,H,W], got {list(shape)}",
                field="images.shape",
                limit="[N,3,H,W]",
                value=list(shape),
            )
        if shape[0] < 1:
            raise InputError(
                "images holds no image (N=0)", field="images.shape[0]", limit=">= 1", value=0
            )
        for axis, name in ((2, "H"), (3, "W")):
            side = shape[axis]
            if side < f or side % f:
                raise InputError(
                    f"image {name}={side} must be a positive multiple of the model's "
                    f"downsampling factor f={f}",
                    field=f"images.shape[{axis}]",
                    limit=f"multiple of {f}",
                    value=side,
                )
        low, high = float(images.min()), float(images.max())
        if not (low >= 0.0 and high <= 1.0):  # also catches NaN
            bad = low if not low >= 0.0 else high
            raise InputError(
                f"image values must lie in [0, 1], found {bad}",
                field="images",
                limit="[0, 1]",
                value=bad,
            )
        return np.ascontiguousarray(images)

    def _check_tokens(self, tokens: np.ndarray) -> np.ndarray:
        k = self.info.codebook_size
        _require_ndarray(tokens, "tokens")
        if tokens.dtype.kind not in "iu":
            raise InputError(
                f"tokens must be integers, got dtype {tokens.dtype}",
                field="tokens.dtype",
                limit="integer",
                value=str(tokens.dtype),
            )
        shape = tuple(tokens.shape)
        if tokens.ndim != 3 or min(shape) < 1:
            raise InputError(
                f"tokens must have shape [N,h,w] with every side >= 1, got {list(shape)}",
                field="tokens.shape",
                limit="[N,h,w]",
                value=list(shape),
            )
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= k:
            bad = low if low < 0 else high
            raise InputError(
                f"token {bad} is outside the codebook [0, {k})",
                field="tokens",
                limit=f"[0, {k})",
                value=bad,
            )
        return np.ascontiguousarray(tokens, dtype=np.int64)


# -- inference -------------------------------------------------------------------------------------
def _one_image_per_run(
    session: ort.InferenceSession,
    name: str,
    batch: np.ndarray,
    options: ort.RunOptions | None = None,
) -> np.ndarray:
    # The token contract: an image's output must not depend on the batch it arrives in. Kernels
    # may choose their algorithm from the whole input shape (onnxruntime's CPU ReduceMean over
    # channels summed in order at N=1 and through an SGEMM at N>1; the last-bit difference
    # flipped near-tie codes), so every run sees exactly one image, whatever the graph holds.
    outputs = [session.run(None, {name: batch[i : i + 1]}, options)[0] for i in range(len(batch))]
    return outputs[0] if len(outputs) == 1 else np.concatenate(outputs)


# -- session construction --------------------------------------------------------------------------
def _provider_request(providers: str) -> list[str]:
    if providers not in PROVIDER_CHOICES:
        raise EngineError(f"providers={providers!r} is not one of {list(PROVIDER_CHOICES)}")
    available = ort.get_available_providers()
    if providers == "auto":
        return [CUDA, CPU] if CUDA in available else [CPU]
    wanted = _REQUESTS[providers][0]
    if wanted not in available:
        raise EngineError(
            f"providers={providers!r} needs onnxruntime's {wanted}, but this onnxruntime "
            f"{ort.__version__} build only has {available}; install the GPU build "
            "(pip install 'vqtok[gpu]', without the CPU onnxruntime) or use providers='cpu'"
        )
    return _REQUESTS[providers]


def _session_options(intra_op_threads: int, inter_op_threads: int) -> ort.SessionOptions:
    for name, value in (
        ("intra_op_threads", intra_op_threads),
        ("inter_op_threads", inter_op_threads),
    ):
        if value < 0:
            raise EngineError(f"{name}={value} must be >= 0 (0 = onnxruntime's default)")
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = inter_op_threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # idle workers sleep instead of spinning: the service's event loop shares these cores
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return options


def _session(
    model: bytes, options: ort.SessionOptions, providers: list[str], path: Path
) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(model, sess_options=options, providers=providers)
    except Exception as err:  # onnxruntime raises its own Fail/InvalidGraph/... types
        raise EngineError(f"{path}: onnxruntime cannot load it with {providers}: {err}") from err


def _check_providers(choice: str, requested: list[str], active: list[str], graph: str) -> None:
    # onnxruntime drops a GPU provider whose libraries (CUDA, cuDNN, TensorRT) fail to load with
    # only a warning and runs everything on CPU: an explicit GPU request must not pass that way,
    # for either graph.
    if choice in ("cuda", "tensorrt") and requested[0] not in active:
        raise EngineError(
            f"providers={choice!r}: onnxruntime runs {graph} on {active} (the {requested[0]} "
            "libraries did not load: check CUDA/cuDNN versions and LD_LIBRARY_PATH, or use "
            "providers='cpu')"
        )


def _require_ndarray(value: object, field: str) -> None:
    if not isinstance(value, np.ndarray):
        raise InputError(
            f"{field} must be a numpy array, got {type(value).__name__}",
            field=field,
            limit="numpy.ndarray",
            value=type(value).__name__,
        )
