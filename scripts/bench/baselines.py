"""Baselines that only benchmarks use: computations the package deliberately does not do, kept to measure the
package's paths against them."""

from __future__ import annotations

import torch

from hf_tensor_attn.ops.common import check_inputs


def kronecker_decode(q, k1, k2, v1, v2, *, scale, rows_per_chunk=1 << 14):
    """One decode step the way the paper's Theorem 4.3 accounts for the four-matrix layout: form the Kronecker
    rows K1 ⊘ K2 and V1 ⊘ V2 explicitly (i^2 x d each, `rows_per_chunk` rows per head at a time, written into one
    reused buffer so the scratch stays cache-sized), then `(V1 ⊘ V2)ᵀ softmax((K1 ⊘ K2) q)`. No autograd. The
    package's factorized `four_cache_decode` does the same score and value flops without writing i^2 x d rows.

    q is [B, H, 1, D]; k1, k2, v1, v2 are [B, H, Tk, D]; no windows or padding (every pair allowed).
    """
    check_inputs(q, k1, k2, v1, v2, scale=scale)
    if q.shape[2] != 1:
        raise ValueError(f"`q` must hold one decode position (shape [B, H, 1, D]), got shape {tuple(q.shape)}")
    B, H, Tk, D = k1.shape
    compute = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    qs = (q * scale).transpose(-1, -2)  # [B, H, D, 1]
    a_chunk = max(1, min(Tk, rows_per_chunk // Tk))  # rows (a, b) for a block of a and every b
    rows_buffer = k1.new_empty(B, H, a_chunk * Tk, D)
    scores = torch.empty(B, H, Tk, Tk, dtype=compute, device=q.device)  # [B, H, a, b]
    for a0 in range(0, Tk, a_chunk):
        a1 = min(a0 + a_chunk, Tk)
        rows = rows_buffer[:, :, : (a1 - a0) * Tk]  # [B, H, (a1 - a0) * Tk, D]
        torch.mul(k1[:, :, a0:a1, None, :], k2[:, :, None, :, :], out=rows.view(B, H, a1 - a0, Tk, D))  # K1 ⊘ K2
        scores[:, :, a0:a1] = torch.matmul(rows, qs).view(B, H, a1 - a0, Tk)
    probs = torch.softmax(scores.view(B, H, Tk * Tk), dim=-1).view(B, H, Tk, Tk)
    out = torch.zeros(B, H, 1, D, dtype=compute, device=q.device)
    for a0 in range(0, Tk, a_chunk):
        a1 = min(a0 + a_chunk, Tk)
        rows = rows_buffer[:, :, : (a1 - a0) * Tk]
        torch.mul(v1[:, :, a0:a1, None, :], v2[:, :, None, :, :], out=rows.view(B, H, a1 - a0, Tk, D))  # V1 ⊘ V2
        out += torch.matmul(probs[:, :, a0:a1].reshape(B, H, 1, (a1 - a0) * Tk).to(rows.dtype), rows).to(compute)
    return out.to(q.dtype)
