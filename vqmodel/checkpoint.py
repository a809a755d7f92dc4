"""Checkpoint directories: weights as safetensors, config as JSON, training state loaded with
``weights_only=True``, every file written atomically. Loading never unpickles.

A checkpoint directory holds::

    config.json           ModelConfig.model_dump_json()
    weights.safetensors   model.state_dict(): parameters AND buffers (quantizer counters, k-means
                          flag, running statistics), so a resumed run continues where it stopped
    training_state.pt     optional: optimizer state dicts, step, RNG states... (plain types only)
    checkpoint.json       written last: sha256 of each file above and the user's metadata

Each file is replaced atomically, but the set is not: a crash between two files leaves a mix of
old and new files, which the sha256 list in ``checkpoint.json`` detects on load.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from pydantic import ValidationError

from vqmodel.vqvae import VQVAE, ModelConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.safetensors"
TRAINING_STATE_FILE = "training_state.pt"
MANIFEST_FILE = "checkpoint.json"
FORMAT = "vqtok-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, inconsistent or unsafe; the message names the file."""


# -- atomic files ----------------------------------------------------------------------------------
def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a part.

    Temp file in the same directory (os.replace is only atomic within one file system), fsync of
    the file before the rename and of the directory after it (so the rename itself survives a
    power cut). The temp file is removed if anything fails.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a served model dir must be world-readable
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if os.name == "posix":
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- save ------------------------------------------------------------------------------------------
def save_checkpoint(
    path_dir: str | os.PathLike[str],
    model: VQVAE,
    config: ModelConfig | None = None,
    training_state: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Save ``model`` (and optionally the training state) into directory ``path_dir``.

    Args:
        path_dir: directory, created if missing; existing checkpoint files are replaced.
        model: the VQ-VAE; its weights and buffers go to weights.safetensors.
        config: defaults to ``model.config``; if given it must equal it (one source of truth).
        training_state: plain tensors/dicts/lists/numbers/strings only (optimizer ``state_dict()``s,
            step, :func:`capture_rng_state`). Checked to load under ``weights_only=True`` BEFORE
            anything is written, so an unloadable state fails now rather than at resume time.
        metadata: JSON-serialisable dict stored in checkpoint.json (step, git rev, command...).

    Returns:
        The directory path.
    """
    if config is not None and config != model.config:
        raise ValueError("config differs from model.config; pass the model's own config or None")
    config = model.config
    path_dir = Path(path_dir)

    # serialise everything first: a bad training state or metadata must not leave a half save
    files: dict[str, bytes] = {CONFIG_FILE: config.model_dump_json(indent=2).encode()}
    # own CPU copies: safetensors refuses shared or non-contiguous storage
    tensors = {
        k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()
    }
    files[WEIGHTS_FILE] = safetensors.torch.save(tensors, metadata={"format": FORMAT})
    if training_state is not None:
        files[TRAINING_STATE_FILE] = _serialise_training_state(training_state)
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "files": {
            name: {"sha256": _sha256(data), "bytes": len(data)} for name, data in files.items()
        },
        "metadata": metadata or {},
    }
    try:
        manifest_bytes = json.dumps(manifest, indent=2, allow_nan=False).encode()
    except (TypeError, ValueError) as err:
        raise TypeError(f"metadata must be JSON-serialisable: {err}") from err

    path_dir.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        write_bytes_atomic(path_dir / name, data)
    write_bytes_atomic(path_dir / MANIFEST_FILE, manifest_bytes)  # last: it vouches for the rest
    return path_dir


def _serialise_training_state(state: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    try:
        torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:
        raise TypeError(
            "training_state would not load with torch.load(weights_only=True); store only "
            f"tensors, dicts, lists, tuples, numbers, strings and None: {err}"
        ) from err
    return data


# -- load ------------------------------------------------------------------------------------------
def load_model(
    path_dir: str | os.PathLike[str],
    map_location: str | torch.device = "cpu",
    verify: bool = True,
) -> tuple[VQVAE, ModelConfig]:
    """Rebuild the model from config.json + weights.safetensors; returned in eval mode.

    With ``verify`` (default) files are checked against checkpoint.json's sha256 when it exists.
    Raises :class:`CheckpointError` naming the file for corrupt, mismatched or inconsistent files.
    """
    path_dir = Path(path_dir)
    manifest = _read_manifest(path_dir) if verify else None
    config_path = path_dir / CONFIG_FILE
    try:
        config = ModelConfig.model_validate_json(_read_verified(config_path, manifest))
    except ValidationError as err:
        raise CheckpointError(f"{config_path}: invalid model config: {err}") from err

    weights_path = path_dir / WEIGHTS_FILE
    data = _read_verified(weights_path, manifest)
    try:
        state = safetensors.torch.load(data)
    except Exception as err:  # the Rust parser raises its own SafetensorError type
        raise CheckpointError(f"{weights_path}: not a readable safetensors file: {err}") from err

    model = VQVAE(config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{weights_path} does not match {config_path}: {err}") from err
    return model.to(map_location).eval(), config


def load_training_state(
    path_dir: str | os.PathLike[str],
    map_location: str | torch.device = "cpu",
    verify: bool = True,
) -> dict[str, Any]:
    """The training state dict saved with the checkpoint, via ``torch.load(weights_only=True)``."""
    path_dir = Path(path_dir)
    manifest = _read_manifest(path_dir) if verify else None
    path = path_dir / TRAINING_STATE_FILE
    if manifest is not None and TRAINING_STATE_FILE not in manifest["files"]:
        raise CheckpointError(f"{path_dir / MANIFEST_FILE}: this checkpoint has no training state")
    data = _read_verified(path, manifest)
    try:
        state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as err:
        raise CheckpointError(
            f"{path}: refused or unreadable under torch.load(weights_only=True): {err}"
        ) from err
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict, found {type(state).__name__}")
    return state


def load_metadata(path_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``metadata`` dict given to :func:`save_checkpoint`."""
    manifest = _read_manifest(Path(path_dir))
    return {} if manifest is None else manifest["metadata"]


def _read_manifest(path_dir: Path) -> dict[str, Any] | None:
    # a directory without checkpoint.json (hand-assembled, or written by another tool) still
    # loads, just without the consistency check
    path = path_dir / MANIFEST_FILE
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_bytes())
    except ValueError as err:
        raise CheckpointError(f"{path}: not valid JSON: {err}") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} manifest")
    if manifest.get("version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format version {manifest.get('version')} is not supported "
            f"(this library reads version {FORMAT_VERSION})"
        )
    return manifest


def _read_verified(path: Path, manifest: dict[str, Any] | None) -> bytes:
    data = path.read_bytes()
    if manifest is None:
        return data
    entry = manifest["files"].get(path.name)
    if entry is None:
        raise CheckpointError(f"{path} is not listed in {path.parent / MANIFEST_FILE}")
    actual = _sha256(data)
    if actual != entry["sha256"]:
        raise CheckpointError(
            f"{path}: sha256 {actual[:12]}… ({len(data)} bytes) does not match "
            f"{MANIFEST_FILE} ({entry['sha256'][:12]}…, {entry['bytes']} bytes): the file is "
            "corrupt or from a different save"
        )
    return data


# -- RNG state as plain tensors ------------------------------------------------------------------
def capture_rng_state() -> dict[str, Any]:
    """torch (CPU and CUDA), numpy and Python RNG states in a weights_only-loadable form."""
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        # numpy's state holds an ndarray, which weights_only refuses: store it as a tensor
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"].cpu())
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["kind"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
