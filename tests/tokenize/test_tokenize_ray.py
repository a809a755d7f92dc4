"""vqtok-tokenize --distributor ray: the single-process run's files, byte for byte, for every
input kind; parts and resumes work the same way. One local Ray (2 CPUs) for the module."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from tokenize_support import MODEL_DIR, manifests, read_tokens, unreadable

from service.tokenize import main

pytest.importorskip("ray.data", reason="Ray Data is not installed (pip install 'vqtok[tokenize]')")

FLAGS = ["--resize", "pad", "--shard-size", "4", "--batch-size", "3", "--quiet"]
RAY = ["--distributor", "ray", "--actors", "2", "--threads", "1"]


@pytest.fixture(scope="module", autouse=True)
def local_ray() -> Iterator[None]:
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning")
    try:
        yield
    finally:
        ray.shutdown()


def _run(inputs: list[str], out: Path, *flags: str) -> None:
    argv = [*inputs, "--out", str(out), "--model-dir", str(MODEL_DIR), *FLAGS, *flags]
    assert main(argv) == 0


def _paths(inputs, kind: str) -> list[str]:
    return {
        "folder": [str(inputs.folder)],
        "webdataset": [inputs.tar_pattern],
        "parquet": inputs.parquets,
    }[kind]


def _shard_files(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("shard-*"))}


@pytest.mark.parametrize(
    ("kind", "output_format"),
    [("folder", "npz"), ("webdataset", "npz"), ("parquet", "parquet")],
)
def test_ray_writes_the_single_process_files(
    inputs, tmp_path: Path, kind: str, output_format: str
) -> None:
    paths = _paths(inputs, kind)
    _run(paths, tmp_path / "single", "--output-format", output_format)
    _run(paths, tmp_path / "ray", "--output-format", output_format, *RAY)
    single, ray = _shard_files(tmp_path / "single"), _shard_files(tmp_path / "ray")
    assert len(single) >= 3 and single.keys() == ray.keys()
    assert single == ray  # same keys, same tokens, same unreadable lists, same bytes
    assert read_tokens(tmp_path / "ray").keys() == read_tokens(tmp_path / "single").keys()
    (one,), (other,) = manifests(tmp_path / "single"), manifests(tmp_path / "ray")
    for field in ("shards", "images", "tokens", "unreadable", "unreadable_inputs", "files"):
        assert one[field] == other[field], field
    assert other["complete"] and other["unreadable"]  # the damaged inputs are listed


def test_ray_parts_are_the_whole(inputs, tmp_path: Path) -> None:
    paths = _paths(inputs, "webdataset")
    _run(paths, tmp_path / "whole")
    for index in range(2):
        _run(paths, tmp_path / "parts", "--num-shards", "2", "--shard-index", str(index), *RAY)
    whole, parts = read_tokens(tmp_path / "whole"), read_tokens(tmp_path / "parts")
    assert whole.keys() == parts.keys()
    assert all((whole[key] == parts[key]).all() for key in whole)
    assert unreadable(tmp_path / "parts") == unreadable(tmp_path / "whole")


def test_ray_resumes_an_interrupted_run(inputs, tmp_path: Path, capsys) -> None:
    paths = _paths(inputs, "folder")
    out = tmp_path / "out"
    _run(paths, out, *RAY)
    done = _shard_files(out)
    names = sorted(done)
    assert len(names) >= 3
    # what a killed run leaves: a shard missing, one cut short, the manifest not complete
    (out / names[0]).unlink()
    (out / names[1]).write_bytes(done[names[1]][:200])
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    stamps = {name: (out / name).stat().st_mtime_ns for name in names[2:]}
    capsys.readouterr()

    _run(paths, out, *RAY)
    assert f"({len(names) - 2} already done" in capsys.readouterr().out
    assert _shard_files(out) == done
    assert all((out / name).stat().st_mtime_ns == stamp for name, stamp in stamps.items())
    (resumed,) = manifests(out)
    assert resumed["complete"] and resumed["report"]["encoded_this_run"] == sum(
        r["images"] + len(r["unreadable"]) for r in resumed["shards"][:2]
    )


def test_a_gpu_request_without_gpus_is_refused_not_left_waiting(inputs, tmp_path, capsys) -> None:
    # onnxruntime here is the CPU build: actors asking one GPU each would wait forever
    argv = [str(inputs.folder), "--out", str(tmp_path / "o"), "--model-dir", str(MODEL_DIR)]
    assert main([*argv, *FLAGS, "--distributor", "ray", "--providers", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--providers=cuda asks one GPU per actor" in err and "no GPU" in err
