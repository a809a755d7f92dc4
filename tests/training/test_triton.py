"""Triton model repository: configs parse with Triton's own protobuf and match model.json."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import onnx
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from training.triton import write_triton_repository

TYPES = {"float32": model_config_pb2.TYPE_FP32, "int64": model_config_pb2.TYPE_INT64}


def parse(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


@pytest.fixture(scope="module")
def repository(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("triton")
    return write_triton_repository(tiny_model_dir, repo, max_batch_size=16, instances=2)


@pytest.mark.parametrize(("name", "graph"), [("vq_encoder", "encoder"), ("vq_decoder", "decoder")])
def test_config_parses_and_matches_model_json(
    repository: Path, tiny_model_dir: Path, name: str, graph: str
) -> None:
    manifest = json.loads((tiny_model_dir / "model.json").read_text())
    io = manifest["io"][graph]
    config = parse(repository / name / "config.pbtxt")

    assert config.name == name
    assert config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 16
    assert config.dynamic_batching.default_queue_policy.timeout_action == (
        model_config_pb2.ModelQueuePolicy.REJECT
    )
    assert config.dynamic_batching.default_queue_policy.max_queue_size > 0
    assert [(g.count, g.kind) for g in config.instance_group] == [
        (2, model_config_pb2.ModelInstanceGroup.KIND_CPU)
    ]
    for declared, expected in ((config.input, io["inputs"]), (config.output, io["outputs"])):
        assert [t.name for t in declared] == [t["name"] for t in expected]
        for tensor, spec in zip(declared, expected):
            assert tensor.data_type == TYPES[spec["dtype"]]
            # Triton owns the batch axis; symbolic sides are -1
            assert list(tensor.dims) == [d if isinstance(d, int) else -1 for d in spec["shape"][1:]]


@pytest.mark.parametrize(("name", "graph"), [("vq_encoder", "encoder"), ("vq_decoder", "decoder")])
def test_model_file_is_the_exported_graph(
    repository: Path, tiny_model_dir: Path, name: str, graph: str
) -> None:
    manifest = json.loads((tiny_model_dir / "model.json").read_text())
    onnx_path = repository / name / "1" / "model.onnx"
    file_name = manifest["io"][graph]["file"]
    assert hashlib.sha256(onnx_path.read_bytes()).hexdigest() == manifest["files"][file_name]
    # the names Triton will bind are the names inside the graph
    proto = onnx.load(str(onnx_path))
    config = parse(repository / name / "config.pbtxt")
    assert [i.name for i in proto.graph.input] == [t.name for t in config.input]
    assert [o.name for o in proto.graph.output] == [t.name for t in config.output]


def test_rewriting_replaces_the_models(repository: Path, tiny_model_dir: Path) -> None:
    write_triton_repository(tiny_model_dir, repository, max_batch_size=4)
    assert parse(repository / "vq_encoder" / "config.pbtxt").max_batch_size == 4
    assert sorted(p.name for p in repository.iterdir()) == ["vq_decoder", "vq_encoder"]


def test_bad_settings_are_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_batch_size=0"):
        write_triton_repository(tiny_model_dir, tmp_path, max_batch_size=0)
