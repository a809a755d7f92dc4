"""The model folder contract: model.json may only name files inside its own folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from service.model_dir import ModelDirError, read_manifest, read_verified, sha256_bytes


def _folder(tmp_path: Path, files: dict[str, str]) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    manifest = {"format": "vqtok-model", "version": 1, "id": "x", "files": files, "io": {}}
    manifest.update(image_size=64, downsample=8)
    (folder / "model.json").write_text(json.dumps(manifest))
    return folder


@pytest.mark.parametrize("name", ["../secret.bin", "/etc/hostname", "sub/encoder.onnx", "..", ""])
def test_file_names_outside_the_folder_are_refused(tmp_path: Path, name: str) -> None:
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"not yours")
    folder = _folder(tmp_path, {name: sha256_bytes(b"not yours")})
    with pytest.raises(ModelDirError, match="plain name inside the model folder"):
        read_verified(folder, read_manifest(folder))


def test_symlink_out_of_the_folder_is_refused(tmp_path: Path) -> None:
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"not yours")
    folder = _folder(tmp_path, {"encoder.onnx": sha256_bytes(b"not yours")})
    os.symlink(secret, folder / "encoder.onnx")
    with pytest.raises(ModelDirError, match="points outside the model folder"):
        read_verified(folder, read_manifest(folder))


def test_plain_names_are_read(tmp_path: Path) -> None:
    files = {"encoder.onnx": b"e", "decoder.onnx": b"d"}
    folder = _folder(tmp_path, {name: sha256_bytes(data) for name, data in files.items()})
    for name, data in files.items():
        (folder / name).write_bytes(data)
    assert read_verified(folder, read_manifest(folder)) == files
