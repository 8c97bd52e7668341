"""Exact tensor attention that never materialises the Tq x Tk x Tk scores.

Placeholder tiling (query blocks, each recomputed in backward through activation checkpointing): peak memory
is O(block * Tk^2). The fast kernel of issue #5 replaces the body of `tensor_attention`.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from .common import check_inputs
from .naive import naive_tensor_attention

QUERY_BLOCK = 16


def tensor_attention(q, k1, k2, v1, v2, *, scale, w1=None, w2=None, attention_mask=None):
    """Exact tensor attention with the signature of `naive_tensor_attention`; differentiable."""
    check_inputs(q, k1, k2, v1, v2, scale=scale, w1=w1, w2=w2, attention_mask=attention_mask)
    Tq, Tk = q.shape[2], k1.shape[2]
    outs = []
    for start in range(0, Tq, QUERY_BLOCK):
        stop = min(start + QUERY_BLOCK, Tq)
        # Keys after the block's last query are never used: trim them.
        kend = Tk - Tq + stop
        mask = attention_mask[:, :kend] if attention_mask is not None else None
        block = lambda qb, a, b, c, d: naive_tensor_attention(qb, a, b, c, d, scale=scale, w1=w1, w2=w2, attention_mask=mask)
        args = (q[:, :, start:stop], k1[:, :, :kend], k2[:, :, :kend], v1[:, :, :kend], v2[:, :, :kend])
        if torch.is_grad_enabled() and any(t.requires_grad for t in args):
            outs.append(checkpoint(block, *args, use_reentrant=False))
        else:
            outs.append(block(*args))
    return torch.cat(outs, dim=2)
