"""`vqtok-tokenize --distributor ray`: the same run on Ray Data, from a laptop to a cluster.

    driver: list the part, skip finished shards (service.tokenize_run)
      -> Ray tasks: read + decode runs of items with the service's image policy (CPU)
      -> Ray actor pool: one Engine per actor (one GPU each when onnxruntime has CUDA)
      -> driver: each shard written atomically as soon as its last item arrives

The shards, the manifest and the tokens are those of the single-process run (the same listing,
the same ``ImagePreparer``, the same ``Engine``, one image per onnxruntime call), so a run can
switch distributors between an interruption and its resume. On a laptop this starts a local Ray
(``--ray-cpus``); with ``RAY_ADDRESS`` set it joins that cluster, whose workers need vqtok
installed and the input and model paths readable at the same paths; the driver writes ``--out``.
``import ray`` happens here only: the service and the plain CLI never need it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from service.admission import ModelGeometry
from service.cpu import cpu_quota
from service.engine import CUDA, Engine
from service.tokenize_inputs import InputSpec, Item, TokenizeError, UsageError, read_items
from service.tokenize_outputs import EncodedShard
from service.tokenize_run import ImagePreparer, TokenizeOptions, TokenizeRun

READ_RUN = 256  # items one decode task reads in a row (a tar or row group is opened once per run)


@dataclass(frozen=True)
class RayOptions:
    """How to run on Ray; zeros mean "size it from the cluster"."""

    model_dir: str
    providers: str = "auto"
    threads: int = 0  # intra-op threads per actor; 0: the actor's share of the CPUs
    actors: int = 0  # 0: one per GPU, else one per 2 CPUs (at least one)
    local_cpus: int = 0  # CPUs of a local Ray; 0: this machine's quota


def tokenize_with_ray(
    spec: InputSpec, out: Any, options: TokenizeOptions, ray_options: RayOptions
) -> dict[str, Any]:
    """Tokenize one part of ``spec`` into ``out`` on Ray; returns the manifest."""
    ray = _import_ray()
    # the model facts (and its sha256 check) on the driver; CPU only: the driver needs no GPU
    info = Engine(ray_options.model_dir, providers="cpu", intra_op_threads=1, warmup=False).info
    run = TokenizeRun.start(spec, out, info, options)
    if not run.todo:
        return run.finish()
    started = _connect(ray, ray_options)
    try:
        _execute(ray, run, ray_options)
    except ray.exceptions.RayError as err:  # a worker failed: what is written stays written
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TokenizeError(
            f"the Ray run stopped ({first}); {len(run.records)} of {len(run.shards)} shards are "
            "written: re-run the same command to resume"
        ) from err
    finally:
        if started:
            ray.shutdown()
    return run.finish()


def _import_ray() -> Any:
    try:
        import ray
        import ray.data
    except ImportError as err:
        raise TokenizeError(
            f"--distributor ray needs Ray Data ({err}): pip install 'vqtok[tokenize]'"
        ) from err
    return ray


def _connect(ray: Any, ray_options: RayOptions) -> bool:
    """Join RAY_ADDRESS's cluster or an initialised Ray, else start a local one (returns True)."""
    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init(logging_level="warning")
        return False
    cpus = ray_options.local_cpus or cpu_quota()
    ray.init(num_cpus=cpus, include_dashboard=False, logging_level="warning")
    return True


def _use_gpu(providers: str) -> bool:
    import onnxruntime as ort

    return providers in ("cuda", "tensorrt") or (
        providers == "auto" and CUDA in ort.get_available_providers()
    )


def _pool(ray: Any, ray_options: RayOptions) -> tuple[int, int, int]:
    """(actors, intra-op threads per actor, GPUs per actor) for this cluster."""
    resources = ray.cluster_resources()
    cpus = max(1, int(resources.get("CPU", 1)))
    if _use_gpu(ray_options.providers):
        if resources.get("GPU", 0) < 1:  # the actors would wait for a GPU forever
            raise UsageError(
                f"--providers={ray_options.providers} asks one GPU per actor, but the Ray "
                f"cluster has {cpus} CPUs and no GPU: add GPU nodes, or use --providers cpu"
            )
        actors = ray_options.actors or int(resources["GPU"])
        return actors, ray_options.threads or 1, 1
    actors = ray_options.actors or max(1, cpus // 2)
    return actors, ray_options.threads or max(1, cpus // actors), 0


def _execute(ray: Any, run: TokenizeRun, ray_options: RayOptions) -> None:
    from tqdm import tqdm

    options = run.options
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # one bar: ours, counted in images
    if not options.show_progress:
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    actors, threads, gpus = _pool(ray, ray_options)
    preparer = ImagePreparer(ModelGeometry.from_model_info(run.info), options)
    work = _work(run)
    dataset = ray.data.from_items(work, override_num_blocks=len(work))
    decoded = dataset.map_batches(
        _decode_runs,
        batch_size=1,
        batch_format="numpy",
        # the workers need how to read, not the list of every input path
        fn_kwargs={
            "spec": replace(run.spec, paths=()),
            "preparer": preparer,
            "batch_size": options.batch_size,
        },
    )
    encoded = decoded.map_batches(
        _EncodeActor,
        batch_size=options.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        fn_constructor_kwargs={
            "model_dir": str(ray_options.model_dir),
            "providers": ray_options.providers,
            "threads": threads,
        },
        num_gpus=gpus,
    )
    total = sum(len(run.shards[index]) for index in run.todo)
    bar = tqdm(total=total, unit="img", disable=not options.show_progress, desc="tokenizing")
    assembler = _ShardAssembler(run)
    try:
        for batch in encoded.iter_batches(batch_format="numpy", batch_size=None):
            assembler.add(batch)
            bar.update(len(batch["key"]))
    finally:
        bar.close()
    if assembler.waiting:
        raise TokenizeError(f"Ray returned no result for shards {sorted(assembler.waiting)}")


def _work(run: TokenizeRun) -> list[dict[str, Any]]:
    """One row per run of consecutive items of one shard (the decode tasks' unit)."""
    rows = []
    for index in run.todo:
        items = run.shards[index]
        for start in range(0, len(items), READ_RUN):
            fields = [[i.key, i.source, i.start, i.length] for i in items[start : start + READ_RUN]]
            rows.append({"shard": index, "start": start, "items": json.dumps(fields)})
    return rows


def _decode_runs(
    batch: dict[str, np.ndarray], *, spec: InputSpec, preparer: ImagePreparer, batch_size: int
) -> Iterator[dict[str, np.ndarray]]:
    """Read and prepare each run's items; yields ``batch_size`` rows at a time (memory bound)."""
    for shard, start, fields in zip(batch["shard"], batch["start"], batch["items"]):
        items = [Item(*row) for row in json.loads(fields)]
        rows: list[dict[str, Any]] = []
        for offset, (item, data) in enumerate(read_items(spec, items)):
            prepared = preparer(item.key, data)
            row = {"shard": int(shard), "position": int(start) + offset, "key": item.key}
            if isinstance(prepared, str):
                row |= {"pixels": b"", "shape": (0, 0), "original": (0, 0), "error": prepared}
            else:
                row |= {
                    "pixels": prepared.pixels.tobytes(),
                    "shape": prepared.image_size,
                    "original": prepared.original_size,
                    "error": "",
                }
            rows.append(row)
            if len(rows) == batch_size:
                yield _columns(rows)
                rows = []
        if rows:
            yield _columns(rows)


def _columns(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    columns = {}
    for name in rows[0]:
        values = [row[name] for row in rows]
        if name in ("shard", "position"):
            columns[name] = np.array(values, np.int64)
        elif name in ("shape", "original", "token_shape"):
            columns[name] = np.array(values, np.int64).reshape(len(rows), 2)
        else:
            columns[name] = np.array(values, dtype=object)
    return columns


class _EncodeActor:
    """One Engine per actor: prepared pixels in, int32 token bytes out (errors passed along)."""

    def __init__(self, model_dir: str, providers: str, threads: int) -> None:
        self.engine = Engine(model_dir, providers=providers, intra_op_threads=threads)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        count = len(batch["key"])
        tokens = [b""] * count
        token_shape = [(0, 0)] * count
        by_shape: dict[tuple[int, int], list[int]] = {}
        for row in range(count):
            if not batch["error"][row]:
                by_shape.setdefault(tuple(int(v) for v in batch["shape"][row]), []).append(row)
        for (height, width), rows in by_shape.items():
            pixels = np.stack(
                [
                    np.frombuffer(batch["pixels"][r], np.float32).reshape(3, height, width)
                    for r in rows
                ]
            )
            for row, grid in zip(rows, self.engine.encode(pixels)):
                tokens[row] = grid.astype(np.int32).tobytes()
                token_shape[row] = grid.shape
        return {
            "shard": batch["shard"],
            "position": batch["position"],
            "key": batch["key"],
            "tokens": np.array(tokens, dtype=object),
            "token_shape": np.array(token_shape, np.int64).reshape(count, 2),
            "shape": batch["shape"],
            "original": batch["original"],
            "error": batch["error"],
        }


class _ShardAssembler:
    """Collects encoded rows per shard; writes a shard once all its items have arrived."""

    def __init__(self, run: TokenizeRun) -> None:
        self.run = run
        self.waiting: dict[int, dict[int, tuple[Any, ...]]] = {i: {} for i in run.todo}

    def add(self, batch: dict[str, np.ndarray]) -> None:
        for row in range(len(batch["key"])):
            index = int(batch["shard"][row])
            fields = tuple(batch[name][row] for name in _RESULT_FIELDS)
            self.waiting[index][int(batch["position"][row])] = fields
            if len(self.waiting[index]) == len(self.run.shards[index]):
                self.run.write_shard(index, self._shard(self.waiting.pop(index)))

    def _shard(self, results: dict[int, tuple[Any, ...]]) -> EncodedShard:
        shard = EncodedShard(self.run.info.id)
        for position in sorted(results):
            key, tokens, token_shape, shape, original, error = results[position]
            if error:
                shard.unreadable.append((str(key), str(error)))
                continue
            grid = np.frombuffer(tokens, np.int32).reshape(tuple(int(v) for v in token_shape))
            shard.add(str(key), grid, _pair(original), _pair(shape))
        return shard


_RESULT_FIELDS = ("key", "tokens", "token_shape", "shape", "original", "error")


def _pair(values: Any) -> tuple[int, int]:
    return int(values[0]), int(values[1])
