"""Under torch.distributed (2 CPU processes, gloo) every rank must end with the same codebook even
though each rank sees different data: k-means init, dead-code replacement, running statistics and
the in-place step are computed once / averaged and shared. A fake one-process world checks that
every collective gets tensors on the codebook's device, as NCCL (the GPU backend) requires."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.distributed.nn.functional  # before any process group: see _run
import torch.multiprocessing as mp

from vqmodel import QuantizerConfig, VectorQuantizer

CONFIGS = {
    "kmeans+replace+running": QuantizerConfig(
        num_codes=64,
        dim=8,
        kmeans_init=True,
        kmeans_samples=200,
        replace_freq=2,
        affine="running",
        sync_nu=0.2,
    ),
    "inplace+learned": QuantizerConfig(
        num_codes=64,
        dim=8,
        inplace=True,
        inplace_lr=0.05,
        affine="learned",
        replace_freq=3,
    ),
}


def _spawn(worker: Callable[..., None], tmp_path: Path, *args: Any) -> list[Any]:
    """Run ``worker(rank, *args, out_file)`` on 2 gloo ranks; returns what each rank pickled."""
    init = f"file://{tmp_path / 'init'}"
    mp.spawn(_run, args=(init, worker, args, str(tmp_path)), nprocs=2, join=True)
    return [pickle.loads((tmp_path / f"rank{r}.pkl").read_bytes()) for r in range(2)]


def _run(rank: int, init: str, worker: Callable[..., Any], args: tuple, out_dir: str) -> None:
    # torch.distributed.nn.functional (imported by the first torch.optim optimizer, e.g. the
    # in-place codebook step's) binds the WORLD group as default arguments when imported after
    # init: the group then outlives destroy_process_group and gloo's threads abort the process at
    # exit ("terminate called without an active exception"). This module imports it first, as
    # training/ddp.py's setup does.
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        torch.manual_seed(0)  # same initial weights on every rank, as DDP guarantees
        result = worker(rank, *args)
        (Path(out_dir) / f"rank{rank}.pkl").write_bytes(pickle.dumps(result))
    finally:
        dist.destroy_process_group()


def _train_with_replacement_log(rank: int, name: str) -> dict[str, Any]:
    vq = VectorQuantizer(CONFIGS[name])
    book = vq.codebooks[0]
    replacements: list[tuple[int, list[int], bytes]] = []
    replace_codes = book.replace_codes

    def logged(rows: torch.Tensor, z: torch.Tensor) -> None:
        replace_codes(rows, z)
        replacements.append(
            (int(book.steps), rows.tolist(), book.weight.detach().numpy().tobytes())
        )

    book.replace_codes = logged  # type: ignore[method-assign]
    gen = torch.Generator().manual_seed(100 + rank)  # different data on every rank
    for step in range(8):
        scale = 3.0 if step < 4 else 0.2  # shrink the data so codes die and get replaced
        vq(torch.randn(4, 8, 4, 4, generator=gen) * scale + rank)
    return {"state": vq.state_dict(), "replacements": replacements}


@pytest.mark.timeout(180)
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_ranks_end_with_identical_codebooks(name: str, tmp_path: Path) -> None:
    ranks = _spawn(_train_with_replacement_log, tmp_path, name)
    # codes really were replaced, at the same steps, the same rows, to the same codebook bytes,
    # although every rank drew from different data
    replacements = [r["replacements"] for r in ranks]
    assert replacements[0], "no code was replaced: the test data no longer kills codes"
    assert [(step, rows) for step, rows, _ in replacements[0]] == [
        (step, rows) for step, rows, _ in replacements[1]
    ]
    for (step, _, bytes_0), (_, _, bytes_1) in zip(*replacements):
        assert bytes_0 == bytes_1, f"ranks replaced differently at step {step}"
    states = [r["state"] for r in ranks]
    book = states[0]["codebooks.0.weight"]
    assert not torch.equal(book, VectorQuantizer(CONFIGS[name]).codebooks[0].weight.detach())
    if CONFIGS[name].kmeans_init:
        assert bool(states[0]["codebooks.0.kmeans_done"])
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
    assert int(states[0]["codebooks.0.steps"]) == 8


def _kmeans_on_separate_clouds(rank: int) -> dict[str, torch.Tensor]:
    cfg = QuantizerConfig(num_codes=8, dim=4, kmeans_init=True, kmeans_samples=64)
    vq = VectorQuantizer(cfg)
    gen = torch.Generator().manual_seed(rank)
    data = torch.randn(2, 4, 4, 4, generator=gen) * 0.5 + 20.0 * rank  # rank r's cloud at 20r
    for _ in range(2):  # 32 vectors per rank and step: 64 over both ranks after the first step
        vq(data)
    return {"codebook": vq.codebooks[0].effective().detach(), "done": vq.codebooks[0].kmeans_done}


@pytest.mark.timeout(180)
def test_kmeans_clusters_the_samples_of_every_rank(tmp_path: Path) -> None:
    # rank 0 clusters what ALL ranks collected: both ranks' data clouds get codes
    ranks = _spawn(_kmeans_on_separate_clouds, tmp_path)
    assert all(bool(r["done"]) for r in ranks)
    codebook = ranks[0]["codebook"]
    assert torch.equal(codebook, ranks[1]["codebook"])
    for rank in range(2):
        near = (codebook - 20.0 * rank).norm(dim=1) < 4.0
        assert near.sum() >= 2, f"no k-means code near rank {rank}'s data"


# -- a fake one-process world that checks devices as NCCL does ---------------------------------
class _DeviceCheckingWorld:
    """Collectives of a 1-rank world (identities) that, like NCCL, refuse a tensor that is not
    on the expected device; they record which collectives ran."""

    def __init__(self) -> None:
        self.device = torch.device("cpu")
        self.ops: list[str] = []

    def _check(self, op: str, *tensors: torch.Tensor) -> None:
        self.ops.append(op)
        for t in tensors:
            assert t.device == self.device, (
                f"{op} got a tensor {tuple(t.shape)} on {t.device}; the codebook is on "
                f"{self.device} (NCCL raises here)"
            )

    def all_reduce(self, tensor: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        self._check("all_reduce", tensor)

    def broadcast(self, tensor: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        self._check("broadcast", tensor)

    def all_gather(self, out: list[torch.Tensor], tensor: torch.Tensor, *a: Any, **k: Any) -> None:
        self._check("all_gather", tensor, *out)
        out[0].copy_(tensor)

    def all_gather_into_tensor(self, out: torch.Tensor, tensor: torch.Tensor, *a: Any, **k: Any):
        self._check("all_gather_into_tensor", out, tensor)
        out.copy_(tensor)

    def unexpected(self, *args: Any, **kwargs: Any) -> None:
        raise AssertionError("a collective this fake world does not check; add it here")


@pytest.fixture
def device_checking_world(monkeypatch: pytest.MonkeyPatch) -> _DeviceCheckingWorld:
    world = _DeviceCheckingWorld()
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 1)
    for name in ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor"):
        monkeypatch.setattr(dist, name, getattr(world, name))
    for name in (
        "reduce",
        "gather",
        "scatter",
        "reduce_scatter",
        "reduce_scatter_tensor",
        "all_to_all",
        "all_to_all_single",
        "all_gather_object",
        "broadcast_object_list",
    ):
        monkeypatch.setattr(dist, name, world.unexpected)
    return world


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_collective_gets_tensors_on_the_codebook_device(
    name: str, device_checking_world: _DeviceCheckingWorld
) -> None:
    vq = VectorQuantizer(CONFIGS[name])
    device_checking_world.device = vq.codebooks[0].weight.device
    opt = torch.optim.SGD(vq.codebook_parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(4, 8, 4, 4, generator=gen) * (3.0 if i < 4 else 0.2) for i in range(8)]
    # A tensor made without an explicit device lands on the default device: on a GPU run the
    # CPU, which NCCL refuses. Here the default is "meta", so such a tensor cannot pass (nor can
    # any other use of the default device: the quantizer places everything it makes itself).
    with torch.device("meta"):
        for z in batches:
            vq(z)  # k-means init, replacement, statistics, in-place step: all collectives
            vq.codebook_step(z, opt)
    ops = set(device_checking_world.ops)
    assert {"all_reduce", "broadcast"} <= ops
    if CONFIGS[name].kmeans_init:
        assert "all_gather" in ops
