"""Under torch.distributed (2 CPU processes, gloo) every rank must end with the same codebook even
though each rank sees different data: k-means init, dead-code replacement, running statistics and
the in-place step are computed once / averaged and shared."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vqmodel import QuantizerConfig, VectorQuantizer

CONFIGS = {
    "kmeans+replace+running": QuantizerConfig(
        num_codes=64, dim=8, kmeans_init=True, kmeans_samples=200, replace_freq=2,
        affine="running", sync_nu=0.2,
    ),
    "inplace+learned": QuantizerConfig(
        num_codes=64, dim=8, inplace=True, inplace_lr=0.05, affine="learned", replace_freq=3,
    ),
}


def _worker(rank: int, world: int, init_file: str, name: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # same initial weights on every rank, as DDP guarantees
        vq = VectorQuantizer(CONFIGS[name])
        gen = torch.Generator().manual_seed(100 + rank)  # different data on every rank
        for step in range(8):
            scale = 3.0 if step < 4 else 0.2  # shrink the data so codes die and get replaced
            z = torch.randn(4, 8, 4, 4, generator=gen) * scale + rank
            vq(z)
        torch.save(vq.state_dict(), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_ranks_end_with_identical_codebooks(name: str, tmp_path: Path) -> None:
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), name, str(tmp_path)), nprocs=2, join=True)
    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    book = states[0]["codebooks.0.weight"]
    assert not torch.equal(book, VectorQuantizer(CONFIGS[name]).codebooks[0].weight.detach())
    if CONFIGS[name].kmeans_init:
        assert bool(states[0]["codebooks.0.kmeans_done"])
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
    # the techniques really ran: something was replaced (counters were reset at some point)
    assert int(states[0]["codebooks.0.steps"]) == 8
