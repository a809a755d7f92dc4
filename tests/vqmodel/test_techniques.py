"""Affine re-parameterisation, k-means++, dead-code replacement, in-place and two-pass
alternating optimisation, usage accounting. Each test fails if its technique were silently off."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

from vqmodel import QuantizerConfig, UsageAccumulator, VectorQuantizer, kmeans, kmeans_plus_plus


# -- learned affine ----------------------------------------------------------------------------
def test_learned_affine_is_identity_at_init() -> None:
    vq = VectorQuantizer(num_codes=16, dim=4, affine="learned", affine_lr=5.0, affine_groups=4)
    book = vq.codebooks[0]
    assert torch.equal(book.effective(), book.weight)


def _affine_grads(lr: float) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    vq = VectorQuantizer(num_codes=16, dim=4, affine="learned", affine_lr=lr)
    z = torch.randn(2, 4, 3, 3)
    out, info = vq(z)
    (out.square().sum() + info["loss"]).backward()
    affine = vq.codebooks[0].affine
    return affine.scale.grad.clone(), affine.bias.grad.clone()


def test_learned_affine_gradients_are_scaled_by_affine_lr() -> None:
    scale_1, bias_1 = _affine_grads(1.0)
    scale_3, bias_3 = _affine_grads(3.0)
    assert scale_1.abs().sum() > 0
    torch.testing.assert_close(scale_3, 3.0 * scale_1)
    torch.testing.assert_close(bias_3, 3.0 * bias_1)


@pytest.mark.parametrize("affine", ["off", "learned"])
def test_unselected_codes_move_only_with_affine(affine: str) -> None:
    torch.manual_seed(1)
    vq = VectorQuantizer(num_codes=64, dim=4, affine=affine, init_std=3.0)
    z = torch.randn(1, 4, 2, 2) * 0.1  # few vectors: most codes are never selected
    opt = torch.optim.SGD(vq.parameters(), lr=0.5)
    before = vq.codebooks[0].effective().detach().clone()
    _, info = vq(z)
    info["loss"].backward()
    opt.step()
    after = vq.codebooks[0].effective().detach()
    unused = torch.ones(64, dtype=torch.bool)
    unused[info["indices"].flatten()] = False
    moved = (after[unused] - before[unused]).abs().amax(1) > 1e-6
    if affine == "learned":
        assert moved.all()
    else:
        assert not moved.any()


def test_affine_groups_are_independent() -> None:
    torch.manual_seed(2)
    vq = VectorQuantizer(num_codes=8, dim=4, affine="learned", affine_groups=2)
    with torch.no_grad():  # make codes 4..7 (group 1) unreachable
        vq.codebooks[0].weight[4:] += 100.0
    out, info = vq(torch.randn(2, 4, 3, 3))
    assert info["indices"].max() < 4
    (out.square().sum() + info["loss"]).backward()
    affine = vq.codebooks[0].affine
    assert affine.scale.grad[0].abs().sum() > 0
    assert torch.equal(affine.scale.grad[1], torch.zeros_like(affine.scale.grad[1]))
    assert torch.equal(affine.bias.grad[1], torch.zeros_like(affine.bias.grad[1]))


# -- running-statistics affine -----------------------------------------------------------------
def test_running_affine_matches_the_input_moments() -> None:
    torch.manual_seed(3)
    mean = torch.tensor([2.0, -1.0, 0.5, 0.0])
    std = torch.tensor([0.1, 3.0, 1.0, 0.01])
    vq = VectorQuantizer(num_codes=256, dim=4, affine="running", affine_momentum=0.2, init_std=8.0)
    for _ in range(30):
        vq(torch.randn(64, 4, 4, 4) * std[None, :, None, None] + mean[None, :, None, None])
    codebook = vq.codebooks[0].effective()
    torch.testing.assert_close(codebook.mean(0), mean, atol=0.15 * std.max(), rtol=0)
    torch.testing.assert_close(codebook.std(0) / std, torch.ones(4), atol=0.15, rtol=0)


def test_running_affine_does_not_update_in_eval_mode() -> None:
    vq = VectorQuantizer(num_codes=16, dim=4, affine="running")
    vq(torch.randn(4, 4, 2, 2))
    vq.eval()
    before = {k: v.clone() for k, v in vq.state_dict().items()}
    vq(torch.randn(4, 4, 2, 2) * 10 + 5)
    for key, value in vq.state_dict().items():
        assert torch.equal(value, before[key]), key


# -- k-means++ ---------------------------------------------------------------------------------
def test_kmeans_recovers_well_separated_centres() -> None:
    gen = torch.Generator().manual_seed(4)
    centres = torch.randn(8, 3, generator=gen) * 20
    x = centres.repeat_interleave(200, 0) + torch.randn(1600, 3, generator=gen) * 0.1
    found = kmeans(x, 8, iters=10, generator=torch.Generator().manual_seed(0))
    nearest = torch.cdist(centres, found).min(1).values
    assert nearest.max() < 0.1
    assert torch.cdist(found, centres).argmin(1).unique().numel() == 8


def test_kmeans_keeps_all_rows_with_fewer_samples_than_codes() -> None:
    x = torch.randn(5, 4)
    out = kmeans(x, 32, iters=5, generator=torch.Generator().manual_seed(0))
    assert out.shape == (32, 4)
    assert torch.equal(out[:5], x)
    assert torch.unique(out, dim=0).shape[0] == 32


def test_kmeans_is_reproducible_under_a_seed() -> None:
    x = torch.randn(500, 6)
    a = kmeans_plus_plus(x, 20, torch.Generator().manual_seed(7))
    b = kmeans_plus_plus(x, 20, torch.Generator().manual_seed(7))
    c = kmeans_plus_plus(x, 20, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_kmeans_init_sets_the_effective_codebook_from_data() -> None:
    torch.manual_seed(5)
    vq = VectorQuantizer(
        num_codes=16, dim=4, kmeans_init=True, kmeans_samples=100, affine="learned", init_std=8.0
    )
    with torch.no_grad():
        vq.codebooks[0].affine.scale.fill_(0.5)  # a non-identity affine must be inverted
    z = torch.randn(2, 4, 8, 8) * 0.1 + 1.0
    vq(z)
    codebook = vq.codebooks[0].effective().detach()
    assert bool(vq.codebooks[0].kmeans_done)
    rows = z.movedim(1, -1).reshape(-1, 4)
    # every effective code lies inside the data cloud, not at the N(0, 8^2) init
    assert torch.cdist(codebook, rows).min(1).values.max() < 0.3


def test_kmeans_init_waits_for_enough_samples() -> None:
    vq = VectorQuantizer(num_codes=16, dim=4, kmeans_init=True, kmeans_samples=100)
    vq(torch.randn(1, 4, 5, 5))  # 25 vectors
    assert not bool(vq.codebooks[0].kmeans_done)
    vq(torch.randn(3, 4, 5, 5))  # 100 in total
    assert bool(vq.codebooks[0].kmeans_done)


def test_kmeans_init_restarts_the_usage_counters() -> None:
    # codes far from the data go unused while samples are collected; once k-means has placed
    # them, replacement must judge them from the k-means step on, not by the counts of the codes
    # they replaced (replace_freq=2 would otherwise overwrite centroids in the k-means step)
    torch.manual_seed(12)
    cfg = QuantizerConfig(
        num_codes=16, dim=4, kmeans_init=True, kmeans_samples=48, replace_freq=2, replace_noise=0.0
    )
    vq = VectorQuantizer(cfg)
    book = vq.codebooks[0]
    batches = [torch.randn(1, 4, 4, 4) * 0.5 + 5.0 for _ in range(4)]
    for z in batches[:3]:  # 16 vectors each: k-means runs in the third step
        vq(z)
    assert bool(book.kmeans_done)
    samples = torch.cat([z.movedim(1, -1).reshape(-1, 4) for z in batches[:3]])
    centroids = kmeans(samples, 16, cfg.kmeans_iters, torch.Generator().manual_seed(cfg.seed))
    assert torch.equal(book.effective().detach(), centroids)
    assert int(book.unused_steps.max()) == 1  # unused in the k-means step only
    vq(batches[3])
    assert torch.equal(book.effective().detach(), centroids)  # nothing judged dead yet


def test_kmeans_step_moves_the_running_statistics_once() -> None:
    # EMA(m): the k-means step moves the running moments once, towards the samples k-means
    # clusters, and the effective codebook the step searches is exactly the centroids
    m = 0.5
    cfg = QuantizerConfig(
        num_codes=8, dim=2, kmeans_init=True, kmeans_samples=32, affine="running", affine_momentum=m
    )
    vq = VectorQuantizer(cfg)
    book = vq.codebooks[0]
    gen = torch.Generator().manual_seed(13)
    first = torch.randn(1, 2, 4, 4, generator=gen)  # 16 vectors: collected
    second = torch.randn(1, 2, 4, 4, generator=gen) * 3.0 + 10.0  # 32 in total: k-means
    vq(first)
    vq(second)
    assert bool(book.kmeans_done)
    samples = torch.cat([z.movedim(1, -1).reshape(-1, 2) for z in (first, second)])
    expected = first.movedim(1, -1).reshape(-1, 2).mean(0).lerp(samples.mean(0), m)
    torch.testing.assert_close(book.affine.z_mean, expected)
    centroids = kmeans(samples, 8, cfg.kmeans_iters, torch.Generator().manual_seed(cfg.seed))
    torch.testing.assert_close(book.effective().detach(), centroids, rtol=0, atol=1e-4)


def test_kmeans_samples_survive_a_training_checkpoint() -> None:
    # a run interrupted while collecting k-means samples resumes to the same codebook
    cfg = QuantizerConfig(
        num_codes=16,
        dim=4,
        kmeans_init=True,
        kmeans_samples=48,
        affine="running",
        groups=2,
        shared_codebook=False,
    )
    gen = torch.Generator().manual_seed(14)
    batches = [torch.randn(2, 4, 3, 3, generator=gen) for _ in range(3)]
    original = VectorQuantizer(cfg)
    for z in batches[:2]:
        original(z)
    assert not bool(original.codebooks[0].kmeans_done)
    buffer = io.BytesIO()
    kmeans_state = [book.kmeans_state() for book in original.codebooks]
    torch.save({"weights": original.state_dict(), "kmeans": kmeans_state}, buffer)
    saved = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    resumed = VectorQuantizer(cfg)
    resumed.load_state_dict(saved["weights"])
    for book, samples in zip(resumed.codebooks, saved["kmeans"]):
        book.load_kmeans_state(samples)
    original(batches[2])
    resumed(batches[2])
    for a, b in zip(original.codebooks, resumed.codebooks):
        assert bool(b.kmeans_done)
        assert torch.equal(a.effective(), b.effective())
        assert a.kmeans_state() == b.kmeans_state() == []


def test_loading_kmeans_samples_of_another_shape_names_it() -> None:
    book = VectorQuantizer(num_codes=16, dim=8, groups=2, kmeans_init=True).codebooks[0]
    with pytest.raises(ValueError, match=r"block 1 has shape \(5, 8\).*\[n, 4\]"):
        book.load_kmeans_state([torch.zeros(3, 4), torch.zeros(5, 8)])


# -- dead-code replacement ---------------------------------------------------------------------
def test_dead_codes_are_replaced_at_their_effective_value_with_state_reset() -> None:
    torch.manual_seed(6)
    vq = VectorQuantizer(num_codes=32, dim=4, affine="learned", replace_freq=3, replace_noise=0.0)
    book = vq.codebooks[0]
    with torch.no_grad():
        book.affine.scale.fill_(0.7)
        book.affine.bias.fill_(0.3)
        book.weight[:4] = torch.eye(4) * 0.01  # codes 0-3 near the data, 4-31 far away
        book.weight[4:] += 50.0
    opt = torch.optim.Adam(vq.parameters(), lr=1e-3)
    vq.attach_optimizer(opt)
    z = torch.randn(1, 4, 4, 4) * 0.1
    for _ in range(3):
        opt.zero_grad()
        _, info = vq(z)
        info["loss"].backward()
        opt.step()
    used = info["indices"].unique()
    assert used.max() < 4
    before_used = book.effective()[used].detach().clone()
    assert opt.state[book.weight]["exp_avg"][4:].abs().sum() == 0  # never selected yet
    opt.state[book.weight]["exp_avg"][4:] = 1.0  # pretend stale state, must be cleared
    with torch.no_grad():
        _, info = vq(z)  # step 4: codes 4..31 unused for 3 steps -> replaced before the search
    effective = book.effective().detach()
    rows = z.movedim(1, -1).reshape(-1, 4)
    dist_to_data = torch.cdist(effective[4:], rows).min(1).values
    assert dist_to_data.max() < 1e-5  # EFFECTIVE code equals an input vector (affine inverted)
    assert opt.state[book.weight]["exp_avg"][4:].abs().sum() == 0
    torch.testing.assert_close(effective[used], before_used)
    assert int(book.unused_steps[4:].max()) <= 1


def _distance_to_nearest(codes: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    # exact differences (cdist's matrix-product form rounds at ~1e-3 here)
    return (codes[:, None] - rows[None]).norm(dim=-1).min(1).values


@pytest.mark.parametrize("affine", ["learned", "running"])
def test_replacement_through_a_collapsed_affine_dimension_stays_finite(affine: str) -> None:
    # channel 0 of the data is constant: the running scale sigma_z / sigma_C is 0 there, as is
    # a learned scale 1 + lr * s driven to s = -1/lr. Every code maps to the bias in that
    # channel, which here equals the data's value, so the replaced codes can still equal the
    # chosen inputs; inverting the affine must not divide by the zero scale (inf/NaN codes).
    torch.manual_seed(15)
    vq = VectorQuantizer(num_codes=32, dim=4, affine=affine, replace_freq=2, replace_noise=0.0)
    book = vq.codebooks[0]
    if affine == "learned":
        with torch.no_grad():
            book.affine.scale[..., 0] = -1.0
    z = torch.randn(1, 4, 2, 2)
    z[:, 0] = 0.0
    for _ in range(2):
        vq(z)
    before = book.weight.detach().clone()
    vq(z)  # codes unused for 2 steps are replaced before this step's search
    replaced = (book.weight.detach() != before).any(1)
    assert replaced.sum() >= 20
    assert torch.isfinite(book.weight).all()
    effective = book.effective().detach()
    rows = z.movedim(1, -1).reshape(-1, 4)
    assert _distance_to_nearest(effective[replaced], rows).max() < 1e-5


@pytest.mark.parametrize("affine", ["off", "learned"])
def test_under_l2_codebook_norm_written_codes_are_the_normalised_inputs(affine: str) -> None:
    # the effective code is A(C)_k / ||A(C)_k||: "equals the input x" means equals x / ||x||
    torch.manual_seed(16)
    vq = VectorQuantizer(
        num_codes=16,
        dim=4,
        affine=affine,
        codebook_norm="l2",
        kmeans_init=True,
        kmeans_samples=8,
        kmeans_iters=0,
        replace_freq=1,
        replace_noise=0.0,
    )
    book = vq.codebooks[0]
    if affine == "learned":
        with torch.no_grad():
            book.affine.scale.fill_(-0.6)
            book.affine.bias.fill_(0.2)
    z = torch.randn(1, 4, 2, 4) * 3.0 + 1.0  # 8 vectors of norm ~4: fewer than the 16 codes
    vq(z)  # k-means with fewer samples than codes keeps every sample as a code
    rows = F.normalize(z.movedim(1, -1).reshape(-1, 4), dim=1)
    torch.testing.assert_close(book.effective().detach()[:8], rows)
    z2 = torch.randn(1, 4, 2, 4) * 3.0 - 2.0
    vq(z2)
    before = book.weight.detach().clone()
    vq(z2)  # codes unused in the previous step are replaced by rows of z2
    replaced = (book.weight.detach() != before).any(1)
    assert replaced.any()
    rows2 = F.normalize(z2.movedim(1, -1).reshape(-1, 4), dim=1)
    assert _distance_to_nearest(book.effective().detach()[replaced], rows2).max() < 1e-5
    norms = book.effective().detach().norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms))


def test_replacement_off_leaves_dead_codes_alone() -> None:
    vq = VectorQuantizer(num_codes=32, dim=4, replace_freq=0)
    with torch.no_grad():
        vq.codebooks[0].weight[4:] += 50.0
    before = vq.codebooks[0].weight.detach().clone()
    for _ in range(5):
        vq(torch.randn(1, 4, 4, 4) * 0.1)
    assert torch.equal(vq.codebooks[0].weight[4:], before[4:])


# -- in-place alternating ----------------------------------------------------------------------
def test_inplace_returns_codes_from_the_updated_codebook_without_leaking_gradients() -> None:
    torch.manual_seed(7)
    vq = VectorQuantizer(
        num_codes=16,
        dim=4,
        affine="learned",
        inplace=True,
        inplace_optimizer="sgd",
        inplace_lr=1.0,
        sync_nu=0.0,
    )
    book = vq.codebooks[0]
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    before = book.effective().detach().clone()
    out, info = vq(z)
    after = book.effective().detach()
    assert not torch.equal(before, after)  # the inner step moved the codebook
    torch.testing.assert_close(out, after[info["indices"]].movedim(-1, 1), rtol=0, atol=0)
    assert all(p.grad is None for p in vq.parameters())  # nothing left for the outer optimizer
    (out.sum() + info["loss"]).backward()
    assert all(p.grad is None for p in vq.parameters())  # loss = commitment only, nu = 0
    assert z.grad is not None


def test_inplace_is_a_plain_quantizer_under_no_grad_and_in_eval() -> None:
    vq = VectorQuantizer(num_codes=16, dim=4, inplace=True, inplace_lr=1.0)
    z = torch.randn(2, 4, 3, 3)
    before = vq.codebooks[0].weight.detach().clone()
    with torch.no_grad():
        vq(z)
    assert torch.equal(vq.codebooks[0].weight, before)
    vq.eval()
    vq(z)
    assert torch.equal(vq.codebooks[0].weight, before)


def test_inplace_keeps_existing_outer_gradients() -> None:
    vq = VectorQuantizer(num_codes=16, dim=4, inplace=True, inplace_lr=1.0)
    weight = vq.codebooks[0].weight
    weight.grad = torch.full_like(weight, 0.25)
    vq(torch.randn(2, 4, 3, 3))
    assert torch.equal(weight.grad, torch.full_like(weight, 0.25))


# -- two-pass alternating ----------------------------------------------------------------------
def test_codebook_step_lowers_the_codebook_loss_and_only_touches_the_codebook() -> None:
    torch.manual_seed(8)
    encoder = torch.nn.Conv2d(3, 4, 1)
    vq = VectorQuantizer(num_codes=16, dim=4, affine="learned")
    opt = torch.optim.Adam(vq.codebook_parameters(), lr=0.05)
    x = torch.randn(4, 3, 4, 4)
    z = encoder(x)
    losses = [vq.codebook_step(z, opt) for _ in range(20)]
    assert losses[-1] < 0.7 * losses[0]
    assert encoder.weight.grad is None  # the codebook step sees sg(z)
    assert all(p.grad is None for p in vq.parameters())  # cleared after the step
    assert int(vq.codebooks[0].steps) == 0  # no training-mode side effects


# -- usage ------------------------------------------------------------------------------------
def test_usage_accumulator_pools_the_whole_set() -> None:
    acc = UsageAccumulator(8)
    acc.update(torch.tensor([0, 0, 1, 1]))
    acc.update(torch.tensor([2, 2, 3, 3]))
    assert acc.usage == 0.5
    assert acc.dead_codes == 4
    assert acc.perplexity == pytest.approx(4.0)
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        acc.update(torch.tensor([8]))


def test_config_round_trips_through_json() -> None:
    cfg = QuantizerConfig(num_codes=64, dim=8, affine="running", sync_nu=0.2, groups=2)
    assert QuantizerConfig.model_validate_json(cfg.model_dump_json()) == cfg
