"""The model directory format: what ``vqtok-export`` writes and the service reads (no torch).

    models/NAME/
      model.json            this module's manifest: id, sha256 of every file, model config,
                            io contract, native size, f, K, training record, eval metrics
      encoder.onnx          float32 [N,3,H,W] in [0,1] -> int64 [N,H/f,W/f]   (one file)
      decoder.onnx          int64 [N,h,w] in [0,K) -> float32 [N,3,h*f,w*f] in [0,1]
      weights.safetensors   torch weights (+ config.json, checkpoint.json): the directory is
      config.json           also a vqmodel checkpoint, so ``vqmodel.load_model(dir)`` fine-tunes it
      checkpoint.json

The writer (``training.export``) and the readers (``service.engine``, Triton configs) share the
constants and helpers below, so the format is written down once.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

MODEL_FILE = "model.json"
ENCODER_FILE = "encoder.onnx"
DECODER_FILE = "decoder.onnx"
FORMAT = "vqtok-model"
FORMAT_VERSION = 1

# io contract: tensor names inside the ONNX graphs (and the Triton configs)
ENCODER_INPUT = "images"
ENCODER_OUTPUT = "tokens"
DECODER_INPUT = "tokens"
DECODER_OUTPUT = "images"

# model.json keys that describe files on the serving host rather than the model
INTERNAL_KEYS = ("files", "source")
REQUIRED_KEYS = ("format", "version", "id", "files", "io", "image_size", "downsample")


class ModelDirError(RuntimeError):
    """The model directory is missing, incomplete, corrupt or of another format; names the file."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def model_id(downsample: int, codebook_size: int, file_hashes: dict[str, str]) -> str:
    """``vqtok-f8-k1024-<sha12>``: the hash covers every file's sha256 (sorted by name), so two
    directories share an id exactly when they hold the same bytes."""
    digest = hashlib.sha256()
    for name in sorted(file_hashes):
        digest.update(f"{name}\0{file_hashes[name]}\n".encode())
    return f"vqtok-f{downsample}-k{codebook_size}-{digest.hexdigest()[:12]}"


def io_contract(downsample: int, codebook_size: int) -> dict[str, Any]:
    """The tensors of both graphs as model.json lists them (symbolic dims as strings)."""
    f = downsample
    return {
        "encoder": {
            "file": ENCODER_FILE,
            "inputs": [
                {
                    "name": ENCODER_INPUT,
                    "dtype": "float32",
                    "layout": "NCHW",
                    "shape": ["N", 3, "H", "W"],
                    "range": [0.0, 1.0],
                    "channels": "RGB",
                    "constraint": f"H and W multiples of {f}",
                }
            ],
            "outputs": [
                {
                    "name": ENCODER_OUTPUT,
                    "dtype": "int64",
                    "layout": "NHW",
                    "shape": ["N", f"H/{f}", f"W/{f}"],
                    "range": [0, codebook_size - 1],
                }
            ],
        },
        "decoder": {
            "file": DECODER_FILE,
            "inputs": [
                {
                    "name": DECODER_INPUT,
                    "dtype": "int64",
                    "layout": "NHW",
                    "shape": ["N", "h", "w"],
                    "range": [0, codebook_size - 1],
                }
            ],
            "outputs": [
                {
                    "name": DECODER_OUTPUT,
                    "dtype": "float32",
                    "layout": "NCHW",
                    "shape": ["N", 3, f"h*{f}", f"w*{f}"],
                    "range": [0.0, 1.0],
                    "channels": "RGB",
                }
            ],
        },
    }


def read_manifest(model_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse and sanity-check ``model_dir/model.json`` (files are not hashed here)."""
    model_dir = Path(model_dir)
    path = model_dir / MODEL_FILE
    if not model_dir.is_dir():
        raise ModelDirError(f"model directory {model_dir} does not exist")
    try:
        manifest = json.loads(path.read_bytes())
    except FileNotFoundError as err:
        raise ModelDirError(
            f"{path} is missing: {model_dir} is not a model directory (create one with "
            "vqtok-export CHECKPOINT --out DIR)"
        ) from err
    except ValueError as err:
        raise ModelDirError(f"{path}: not valid JSON: {err}") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ModelDirError(f"{path}: not a {FORMAT} manifest (format={manifest.get('format')!r})")
    if manifest.get("version") != FORMAT_VERSION:
        raise ModelDirError(
            f"{path}: format version {manifest.get('version')!r} is not supported "
            f"(this build reads version {FORMAT_VERSION})"
        )
    missing = [key for key in REQUIRED_KEYS if key not in manifest]
    if missing:
        raise ModelDirError(f"{path}: missing keys {missing}")
    return manifest


def read_verified(model_dir: str | os.PathLike[str], manifest: dict[str, Any]) -> dict[str, bytes]:
    """Read every file model.json lists and check its sha256; returns {name: bytes}.

    The bytes returned are the bytes that were hashed: callers load sessions from them, so a file
    swapped between the check and the load cannot slip through.
    """
    model_dir = Path(model_dir)
    contents: dict[str, bytes] = {}
    if not isinstance(manifest["files"], dict):
        raise ModelDirError(f"{model_dir / MODEL_FILE}: `files` must map file names to sha256")
    for name, expected in manifest["files"].items():
        path = _inside(model_dir, name)
        try:
            data = path.read_bytes()
        except FileNotFoundError as err:
            raise ModelDirError(f"{path} is missing (listed in {MODEL_FILE})") from err
        actual = sha256_bytes(data)
        if actual != expected:
            raise ModelDirError(
                f"{path}: sha256 {actual[:12]}… ({len(data)} bytes) does not match "
                f"{MODEL_FILE} ({expected[:12]}…): the file is corrupt or from another export"
            )
        contents[name] = data
    for name in (ENCODER_FILE, DECODER_FILE):
        if name not in contents:
            raise ModelDirError(f"{model_dir / MODEL_FILE} does not list {name}")
    return contents


def _inside(model_dir: Path, name: object) -> Path:
    # model.json is data from wherever the model came from: a name like "../../etc/passwd" or
    # an absolute path must not make the service read (and hash) files outside the folder
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
        raise ModelDirError(
            f"{model_dir / MODEL_FILE}: file name {name!r} must be a plain name inside the "
            "model folder (no directories, no '..')"
        )
    path = model_dir / name
    if path.resolve().parent != model_dir.resolve():  # a symlink pointing out of the folder
        raise ModelDirError(f"{path} points outside the model folder {model_dir}")
    return path


def public_view(manifest: dict[str, Any]) -> dict[str, Any]:
    """model.json without host-side details (file hashes, source checkpoint path)."""
    return {key: value for key, value in manifest.items() if key not in INTERNAL_KEYS}
