"""The straight-through estimator, synchronised commitment, loss weights, variants, determinism."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from vqmodel import QuantizerConfig, VectorQuantizer, nearest_codes
from vqmodel.search import SERVED_DTYPE, CodebookTerms


def _rows(x: torch.Tensor, dim: int) -> torch.Tensor:
    return x.movedim(1, -1).reshape(-1, dim)


def test_forward_value_is_exactly_the_effective_code() -> None:
    torch.manual_seed(0)
    vq = VectorQuantizer(num_codes=32, dim=8, affine="learned", sync_nu=0.3)
    with torch.no_grad():
        vq.codebooks[0].affine.scale.normal_()
        vq.codebooks[0].affine.bias.normal_()
    z = torch.randn(2, 8, 5, 3)
    out, info = vq(z)
    codebook = vq.codebooks[0].effective().detach()
    expected = codebook[info["indices"]].movedim(-1, 1)
    assert torch.equal(out, expected)
    # and it really is the nearest effective code
    brute = torch.cdist(_rows(z, 8), codebook).argmin(1)
    assert torch.equal(info["indices"].flatten(), brute)


@pytest.mark.parametrize("nu", [0.0, 0.5])
def test_gradient_to_z_is_identity(nu: float) -> None:
    torch.manual_seed(1)
    vq = VectorQuantizer(num_codes=16, dim=4, sync_nu=nu)
    z = torch.randn(3, 4, 2, 2, requires_grad=True)
    upstream = torch.randn(3, 4, 2, 2)
    out, _ = vq(z)
    (out * upstream).sum().backward()
    assert torch.equal(z.grad, upstream)


@pytest.mark.parametrize("beta", [0.0, 0.25, 0.8, 0.95, 1.0])
def test_loss_matches_formula(beta: float) -> None:
    torch.manual_seed(2)
    vq = VectorQuantizer(num_codes=16, dim=4, beta=beta, affine="learned")
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    _, info = vq(z)
    codes = vq.codebooks[0].effective()[info["indices"]].movedim(-1, 1)
    mse = F.mse_loss(z, codes).item()
    assert info["loss_codebook"].item() == pytest.approx(mse, rel=1e-6)
    assert info["loss_commitment"].item() == pytest.approx(mse, rel=1e-6)
    assert info["loss"].item() == pytest.approx(mse, rel=1e-6)  # beta*m + (1-beta)*m
    # both terms have the same value, so only the gradients tell beta from 1 - beta:
    # L_vq = beta * mean||sg(z) - C_q||^2 + (1 - beta) * mean||z - sg(C_q)||^2
    formula = beta * F.mse_loss(z.detach(), codes) + (1 - beta) * F.mse_loss(z, codes.detach())
    inputs = [z, *vq.parameters()]
    got = torch.autograd.grad(info["loss"], inputs, retain_graph=True, allow_unused=True)
    want = torch.autograd.grad(formula, inputs, allow_unused=True)
    for x, g, w in zip(inputs, got, want):
        zero = torch.zeros_like(x)
        torch.testing.assert_close(zero if g is None else g, zero if w is None else w)
    assert want[0].abs().sum() > 0 if beta < 1 else want[1].abs().sum() > 0


@pytest.mark.parametrize("nu", [0.0, 0.2, 1.0])
@pytest.mark.parametrize("beta", [0.25, 0.95])
def test_codebook_gradient_is_nu_times_task_gradient_plus_beta_term(nu: float, beta: float) -> None:
    torch.manual_seed(3)
    k, d = 8, 4
    vq = VectorQuantizer(num_codes=k, dim=d, beta=beta, sync_nu=nu)
    z = torch.randn(4, d, 3, 3, requires_grad=True)
    upstream = torch.randn(4, d, 3, 3)
    out, info = vq(z)
    ((out * upstream).sum() + info["loss"]).backward()

    rows, g = _rows(z.detach(), d), _rows(upstream, d)
    idx = info["indices"].flatten()
    codebook = vq.codebooks[0].weight.detach()
    # d/dC_k [beta * mean||sg(z) - C_q||^2] = beta * 2/numel * sum_{i: q_i = k} (C_k - z_i)
    beta_term = torch.zeros(k, d).index_add_(0, idx, codebook[idx] - rows)
    beta_term *= 2 * beta / rows.numel()
    sync_term = torch.zeros(k, d).index_add_(0, idx, g) * nu
    torch.testing.assert_close(vq.codebooks[0].weight.grad, beta_term + sync_term)


def test_z_gradient_includes_the_commitment_term() -> None:
    torch.manual_seed(4)
    beta, d = 0.75, 4
    vq = VectorQuantizer(num_codes=8, dim=d, beta=beta)
    z = torch.randn(2, d, 2, 2, requires_grad=True)
    _, info = vq(z)
    info["loss"].backward()
    codes = vq.codebooks[0].effective().detach()[info["indices"]].movedim(-1, 1)
    expected = (1 - beta) * 2 * (z.detach() - codes) / z.numel()
    torch.testing.assert_close(z.grad, expected)


def test_sequence_layout_with_channel_last() -> None:
    vq = VectorQuantizer(num_codes=16, dim=6, channel_dim=-1)
    z = torch.randn(2, 7, 6)
    out, info = vq(z)
    assert out.shape == z.shape
    assert info["indices"].shape == (2, 7)


def test_wrong_feature_size_names_the_axis() -> None:
    vq = VectorQuantizer(num_codes=16, dim=6)
    with pytest.raises(ValueError, match="expected 6 features on axis 1"):
        vq(torch.randn(2, 5, 3, 3))


# -- determinism -------------------------------------------------------------------------------
def test_same_vector_same_index_at_any_batch_size() -> None:
    torch.manual_seed(5)
    codebook = torch.randn(1024, 64)
    z = torch.randn(3000, 64)
    full, _ = nearest_codes(z, codebook, chunk_size=1024)
    for batch in (1, 7, 64, 999):
        parts = [nearest_codes(z[s : s + batch], codebook, 1024)[0] for s in range(0, 1500, batch)]
        assert torch.equal(torch.cat(parts)[:1500], full[:1500])
    for chunk in (1, 33, 4096):
        assert torch.equal(nearest_codes(z, codebook, chunk)[0], full)


def test_exact_ties_go_to_the_smallest_index() -> None:
    codebook = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    idx, _ = nearest_codes(z, codebook)
    assert idx.tolist() == [0, 1, 0]


def test_one_block_search_is_the_chunked_search() -> None:
    # the exported encoder scores all rows in one block (chunk_size=None): the same tokens,
    # exact ties included, as the chunked search VQVAE.encode runs, in both precisions
    torch.manual_seed(11)
    codebook = torch.randn(300, 16).round(decimals=1)
    codebook[150] = codebook[20]  # an exact duplicate: ties go to 20
    z = torch.cat([torch.randn(700, 16), codebook[[20, 150, 7]]])
    for dtype in (torch.float32, SERVED_DTYPE):
        chunked, dist_chunked = nearest_codes(z, codebook, chunk_size=64, dtype=dtype)
        terms = CodebookTerms.of(codebook, dtype)
        block, dist_block = nearest_codes(z, terms, chunk_size=None, dtype=dtype)
        assert torch.equal(block, chunked)
        assert block[-3:].tolist() == [20, 20, 7]
        torch.testing.assert_close(dist_block, dist_chunked)


def test_search_is_fp32_under_autocast() -> None:
    torch.manual_seed(6)
    codebook = torch.randn(256, 32)
    z = torch.randn(500, 32)
    expected, _ = nearest_codes(z, codebook)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, dist = nearest_codes(z.bfloat16(), codebook)
    assert dist.dtype == torch.float32
    # the inputs were rounded to bf16 by the caller, the search itself stays fp32
    assert torch.equal(got, nearest_codes(z.bfloat16().float(), codebook)[0])
    assert (got == expected).float().mean() > 0.9


def test_reported_distance_is_the_squared_distance() -> None:
    torch.manual_seed(7)
    codebook, z = torch.randn(50, 8), torch.randn(40, 8)
    idx, dist = nearest_codes(z, codebook, chunk_size=16)
    torch.testing.assert_close(dist, (z - codebook[idx]).pow(2).sum(1), rtol=1e-5, atol=1e-5)


# -- variants ----------------------------------------------------------------------------------
def test_groups_shared_and_separate_give_per_group_indices() -> None:
    torch.manual_seed(8)
    z = torch.randn(2, 12, 4, 4)
    for shared in (True, False):
        vq = VectorQuantizer(num_codes=16, dim=12, groups=3, shared_codebook=shared)
        out, info = vq(z)
        assert out.shape == z.shape
        assert info["indices"].shape == (2, 4, 4, 3)
        assert len(vq.codebooks) == (1 if shared else 3)
        # group j's index is the nearest code of sub-vector j in its own codebook
        sub = z.movedim(1, -1).reshape(-1, 3, 4)
        for j in range(3):
            book = vq.codebooks[0 if shared else j].effective().detach()
            brute = torch.cdist(sub[:, j], book).argmin(1)
            assert torch.equal(info["indices"][..., j].flatten(), brute)


def test_residual_error_falls_with_each_stage() -> None:
    torch.manual_seed(9)
    z = torch.randn(4, 8, 8, 8)
    errors = []
    for stages in (1, 2, 3, 4):
        vq = VectorQuantizer(
            num_codes=64, dim=8, residual_stages=stages, kmeans_init=True, kmeans_samples=256
        )
        vq(z)  # first training forward runs k-means on z's own residuals
        vq.eval()
        out, info = vq(z)
        assert info["indices"].shape == ((4, 8, 8, stages) if stages > 1 else (4, 8, 8))
        errors.append(F.mse_loss(out, z).item())
    assert all(later < 0.9 * earlier for earlier, later in itertools.pairwise(errors)), errors


def test_state_dict_round_trip_restores_identical_outputs() -> None:
    torch.manual_seed(10)
    cfg = QuantizerConfig(
        num_codes=32,
        dim=8,
        groups=2,
        residual_stages=2,
        affine="running",
        replace_freq=2,
        kmeans_init=True,
        kmeans_samples=64,
    )
    vq = VectorQuantizer(cfg)
    for _ in range(4):
        vq(torch.randn(2, 8, 4, 4) * 3 + 1)
    clone = VectorQuantizer(cfg)
    clone.load_state_dict(vq.state_dict())
    vq.eval()
    clone.eval()
    z = torch.randn(2, 8, 4, 4)
    out_a, info_a = vq(z)
    out_b, info_b = clone(z)
    assert torch.equal(out_a, out_b)
    assert torch.equal(info_a["indices"], info_b["indices"])


def test_config_rejects_bad_values_naming_the_field() -> None:
    with pytest.raises(ValueError, match="num_cods"):
        QuantizerConfig(num_cods=4)
    with pytest.raises(ValueError, match="beta"):
        QuantizerConfig(beta=1.5)
    with pytest.raises(ValueError, match="groups=5"):
        QuantizerConfig(dim=64, groups=5)
    with pytest.raises(ValueError, match="affine"):
        QuantizerConfig(affine="sometimes")


def test_output_keeps_the_rows_layout_without_a_copy() -> None:
    # NCHW in: the quantized map comes back as a channels-last view of the rows (no transposing
    # copy), the layout the convolutions around the layer run fastest in
    layer = VectorQuantizer(num_codes=16, dim=8)
    z = torch.randn(2, 8, 5, 6, requires_grad=True)
    z_q, info = layer(z)
    assert z_q.shape == z.shape
    assert z_q.is_contiguous(memory_format=torch.channels_last)
    codes = layer.codebooks[0].effective().detach()
    expected = codes[info["indices"]].permute(0, 3, 1, 2)
    torch.testing.assert_close(z_q.detach(), expected, rtol=0, atol=0)
    z_q.sum().backward()  # the straight-through gradient is still the identity for z
    torch.testing.assert_close(z.grad, torch.ones_like(z))
