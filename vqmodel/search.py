"""Nearest-code search: the rule that makes tokens deterministic."""

from __future__ import annotations

import torch


@torch.no_grad()
def nearest_codes(
    z: torch.Tensor,
    codebook: torch.Tensor,
    chunk_size: int = 512,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the nearest code for every row of ``z`` and its squared distance.

    q = argmin_k ||z - C_k||^2 = argmin_k (||C_k||^2 - 2 z.C_k); ||z||^2 is the same for every k,
    so it only enters the reported distance. Always fp32 (also under autocast), rows processed in
    chunks so at most ``chunk_size x K`` distances exist at once, ties go to the smallest index
    (the first minimum, as ``argmin`` and ONNX ArgMin choose).

    ``dtype=torch.float64`` is the served token rule (``VQVAE.encode`` and the exported encoder):
    the same expression, rounded so finely that two GEMM implementations (torch, onnxruntime,
    CPU or GPU) pick the same code; in fp32 their rounding differs by a few ulps of |z|·|C|,
    which flips near-ties when features are large (measured: 1-6 tokens per 10^4).

    Args:
        z: [N, D] vectors.
        codebook: [K, D] effective codebook.
        chunk_size: rows per chunk.

    Returns:
        (indices int64 [N], squared distances [N] in ``dtype``).
    """
    with torch.autocast(device_type=z.device.type, enabled=False):
        z = z.to(dtype)
        codebook = codebook.to(dtype)
        code_sq = codebook.pow(2).sum(1)
        codebook_t = codebook.t()
        n, k = z.shape[0], codebook.shape[0]
        if k > 2**24:  # K - k below must be exact in fp32
            raise ValueError(f"nearest_codes supports at most 2**24 codes, got {k}")
        indices = torch.empty(n, dtype=torch.long, device=z.device)
        best = torch.empty(n, dtype=dtype, device=z.device)
        # one chunk-sized score buffer reused for every chunk: no per-chunk allocation/page faults
        buffer = torch.empty(min(chunk_size, n), k, dtype=dtype, device=z.device)
        reversed_k = torch.arange(k, 0, -1, dtype=dtype, device=z.device)  # K - k
        for start in range(0, n, chunk_size):
            rows = z[start : start + chunk_size]
            stop = start + rows.shape[0]
            scores = buffer[: rows.shape[0]]
            # ||C_k||^2 - 2 z.C_k in one fused GEMM (no sqrt, no topk, no N x K copy)
            torch.addmm(code_sq, rows, codebook_t, beta=1.0, alpha=-2.0, out=scores)
            # argmin with ties to the smallest k, as three vectorised passes over the chunk
            # (values-only amin, then in place: 1 where the row minimum is, times K - k, row max)
            # instead of min(1)'s scalar value+index reduction: measured 8x faster on the
            # reduction, the search 20% faster. amin is exact, so "== minimum" marks precisely
            # the k that min(1) would choose among; a NaN row marks nothing and becomes index K,
            # clamped to K - 1 below (min(1) also returns an arbitrary index for NaN rows).
            row_min = torch.amin(scores, 1, out=best[start:stop])
            marks = scores.eq_(row_min[:, None]).mul_(reversed_k)
            indices[start:stop] = k - marks.amax(1).long()
        indices.clamp_(max=k - 1)
        best += torch.einsum("nd,nd->n", z, z)  # ||z||^2 without an [N, D] temporary
        return indices, best.clamp_min_(0.0)
