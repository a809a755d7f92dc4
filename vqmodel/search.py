"""Nearest-code search: the token rule, written once.

Every token in the project comes from :func:`nearest_codes`: the quantizer's training search
(fp32), ``VQVAE.encode`` (``SERVED_DTYPE``) and the exported encoder graph (``SERVED_DTYPE``,
one block, the codebook terms frozen as constants).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

# The served token rule's precision (VQVAE.encode and the exported encoder): fp32 scores from two
# GEMM implementations (torch, onnxruntime, CPU or GPU) differ by a few ulps of |z|.|C|, which
# flips near-ties when features are large (measured: 1-6 tokens per 10^4); fp64 settles them.
SERVED_DTYPE = torch.float64


class CodebookTerms(NamedTuple):
    """The half of the score that depends on the codebook only, in the search precision.

    Build it once with :meth:`of` where the codebook is a constant (the exported encoder freezes
    both tensors into the graph, so onnxruntime scores against torch's own values).
    """

    codebook_t: torch.Tensor  # C_hat^T [D, K]
    code_sq: torch.Tensor  # ||C_hat_k||^2 [K]

    @classmethod
    def of(cls, codebook: torch.Tensor, dtype: torch.dtype = torch.float32) -> CodebookTerms:
        codebook = codebook.detach().to(dtype)
        return cls(codebook.t(), codebook.pow(2).sum(1))


@torch.no_grad()
def nearest_codes(
    z: torch.Tensor,
    codebook: torch.Tensor | CodebookTerms,
    chunk_size: int | None = 512,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the nearest code for every row of ``z`` and its squared distance.

    q = argmin_k ||z - C_k||^2 = argmin_k (||C_k||^2 - 2 z.C_k); ||z||^2 is the same for every k,
    so it only enters the reported distance. Computed in ``dtype`` (fp32 by default, also under
    autocast; ``SERVED_DTYPE`` for served tokens), ties go to the smallest index (the first
    minimum, as ``argmin`` and ONNX ArgMin choose).

    Args:
        z: [N, D] vectors.
        codebook: [K, D] effective codebook, or its precomputed :class:`CodebookTerms`.
        chunk_size: rows per chunk, so at most ``chunk_size x K`` scores exist at once; ``None``
            scores all rows in one block (a traced/exported graph, whose N is symbolic).
        dtype: the precision of the scores.

    Returns:
        (indices int64 [N], squared distances [N] in ``dtype``).
    """
    with torch.autocast(device_type=z.device.type, enabled=False):
        z = z.to(dtype)
        if isinstance(codebook, CodebookTerms):
            terms = codebook
        else:
            terms = CodebookTerms.of(codebook, dtype)
        k = terms.code_sq.shape[0]
        if k > 2**24:  # K - k in _chunked_search must be exact in fp32
            raise ValueError(f"nearest_codes supports at most 2**24 codes, got {k}")
        if chunk_size is None:
            scores = _scores(z, terms)
            indices, best = scores.argmin(1), scores.amin(1)
        else:
            indices, best = _chunked_search(z, terms, chunk_size)
        best = best + torch.einsum("nd,nd->n", z, z)  # ||z||^2 without an [N, D] temporary
        return indices, best.clamp_min(0.0)


def _scores(
    rows: torch.Tensor, terms: CodebookTerms, out: torch.Tensor | None = None
) -> torch.Tensor:
    # ||C_k||^2 - 2 z.C_k in one fused GEMM (no sqrt, no topk, no [N, K, D] difference)
    return torch.addmm(terms.code_sq, rows, terms.codebook_t, beta=1.0, alpha=-2.0, out=out)


def _chunked_search(
    z: torch.Tensor, terms: CodebookTerms, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(argmin, min) of the scores, ``chunk_size`` rows at a time."""
    n, k = z.shape[0], terms.code_sq.shape[0]
    indices = torch.empty(n, dtype=torch.long, device=z.device)
    best = torch.empty(n, dtype=z.dtype, device=z.device)
    # one chunk-sized score buffer reused for every chunk: no per-chunk allocation/page faults
    buffer = torch.empty(min(chunk_size, n), k, dtype=z.dtype, device=z.device)
    reversed_k = torch.arange(k, 0, -1, dtype=z.dtype, device=z.device)  # K - k
    for start in range(0, n, chunk_size):
        rows = z[start : start + chunk_size]
        stop = start + rows.shape[0]
        scores = _scores(rows, terms, out=buffer[: rows.shape[0]])
        # argmin with ties to the smallest k, as three vectorised passes over the chunk
        # (values-only amin, then in place: 1 where the row minimum is, times K - k, row max)
        # instead of min(1)'s scalar value+index reduction: measured 8x faster on the
        # reduction, the search 20% faster. amin is exact, so "== minimum" marks precisely
        # the k that argmin would choose among; a NaN row marks nothing and becomes index K,
        # clamped to K - 1 below (argmin also returns an arbitrary index for NaN rows).
        row_min = torch.amin(scores, 1, out=best[start:stop])
        marks = scores.eq_(row_min[:, None]).mul_(reversed_k)
        indices[start:stop] = k - marks.amax(1).long()
    return indices.clamp_(max=k - 1), best
