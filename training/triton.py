"""A Triton Inference Server model repository for an exported model directory.

    vqtok-export CHECKPOINT --out models/default --triton triton_repo

    triton_repo/
      vq_encoder/config.pbtxt   platform onnxruntime_onnx, dynamic batching, bounded queue
      vq_encoder/1/model.onnx   = models/default/encoder.onnx
      vq_decoder/config.pbtxt
      vq_decoder/1/model.onnx   = models/default/decoder.onnx

Tensor names, dtypes and shapes come from model.json's io contract (one source of truth). With
``max_batch_size > 0`` Triton owns the batch axis, so ``dims`` list the per-image shape with -1
for the dynamic H and W. Triton's dynamic batcher only joins requests of equal shape, which is
what the encoder needs (one H x W per batch). A full queue or a request that waited longer than
``queue_timeout_us`` is rejected (REJECT), so overload shows as fast errors instead of latency.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from service.files import replace_directory
from service.model_dir import MODEL_FILE, read_manifest

ENCODER_MODEL = "vq_encoder"
DECODER_MODEL = "vq_decoder"
_TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64"}


def _tensor(spec: dict[str, Any]) -> str:
    # drop the batch axis (Triton's), symbolic sides become -1
    dims = [d if isinstance(d, int) else -1 for d in spec["shape"][1:]]
    return (
        f'  {{\n    name: "{spec["name"]}"\n    data_type: {_TRITON_TYPES[spec["dtype"]]}\n'
        f"    dims: [ {', '.join(str(d) for d in dims)} ]\n  }}"
    )


def model_config_text(
    name: str,
    graph: dict[str, Any],
    model_id: str,
    *,
    max_batch_size: int = 32,
    max_queue_size: int = 64,
    max_queue_delay_us: int = 2000,
    queue_timeout_us: int = 1_000_000,
    instances: int = 1,
    kind: str = "KIND_CPU",
) -> str:
    """config.pbtxt text for one graph of model.json's ``io`` section."""
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size={max_batch_size} must be >= 1")
    if instances < 1:
        raise ValueError(f"instances={instances} must be >= 1")
    if kind not in ("KIND_CPU", "KIND_GPU"):
        raise ValueError(f"kind={kind!r} must be KIND_CPU or KIND_GPU")
    inputs = ",\n".join(_tensor(t) for t in graph["inputs"])
    outputs = ",\n".join(_tensor(t) for t in graph["outputs"])
    return f"""# {model_id}: written by vqtok-export from {MODEL_FILE}; regenerate, do not edit
name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: {max_batch_size}
input [
{inputs}
]
output [
{outputs}
]
dynamic_batching {{
  max_queue_delay_microseconds: {max_queue_delay_us}
  default_queue_policy {{
    timeout_action: REJECT
    default_timeout_microseconds: {queue_timeout_us}
    allow_timeout_override: true
    max_queue_size: {max_queue_size}
  }}
}}
instance_group [
  {{
    count: {instances}
    kind: {kind}
  }}
]
"""


def write_triton_repository(
    model_dir: str | os.PathLike[str],
    repository: str | os.PathLike[str],
    **config: Any,
) -> Path:
    """Write (or replace) vq_encoder/ and vq_decoder/ in ``repository`` from ``model_dir``.

    ``config`` goes to :func:`model_config_text` (max_batch_size, max_queue_size, instances,
    kind...). Each model folder is assembled beside its final place and renamed into it; other
    models in the repository are left alone.
    """
    model_dir, repository = Path(model_dir), Path(repository)
    manifest = read_manifest(model_dir)
    repository.mkdir(parents=True, exist_ok=True)
    for name, graph_key in ((ENCODER_MODEL, "encoder"), (DECODER_MODEL, "decoder")):
        graph = manifest["io"][graph_key]
        text = model_config_text(name, graph, manifest["id"], **config)
        tmp = repository / f".{name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "1").mkdir(parents=True)
        try:
            (tmp / "config.pbtxt").write_text(text)
            shutil.copyfile(model_dir / graph["file"], tmp / "1" / "model.onnx")
            (tmp / "vqtok.json").write_text(
                json.dumps({"id": manifest["id"], "graph": graph_key, "io": graph}, indent=2)
            )
            replace_directory(tmp, repository / name)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return repository
