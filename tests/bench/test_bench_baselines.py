"""The benchmark-only baselines and metrics compute what they claim, against the package's naive reference."""

import pytest
import torch

from hf_tensor_attn.ops import naive_tensor_attention
from scripts.bench.baselines import kronecker_decode
from scripts.bench.metrics import kron_value_op_norm


def one_query(B=2, H=3, T=9, D=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, 1, D, generator=g, dtype=torch.float64)
    return q, [torch.randn(B, H, T, D, generator=g, dtype=torch.float64) for _ in range(4)]


def test_kronecker_decode_matches_naive_for_one_query():
    q, (k1, k2, v1, v2) = one_query()
    ref = naive_tensor_attention(q, k1, k2, v1, v2, scale=0.3)
    # 20 rows per chunk: two rows a (of 9 pairs each) at a time, so the chunked loops and the ragged last chunk run.
    out = kronecker_decode(q, k1, k2, v1, v2, scale=0.3, rows_per_chunk=20)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_kronecker_decode_rejects_more_than_one_query():
    q, streams = one_query()
    with pytest.raises(ValueError, match="`q` must hold one decode position"):
        kronecker_decode(q.expand(-1, -1, 2, -1), *streams, scale=0.3)


def test_kron_value_op_norm_matches_the_formed_matrix():
    _, (_, _, v1, v2) = one_query(B=1, H=1)
    kron = (v1[..., :, None, :] * v2[..., None, :, :]).flatten(-3, -2)  # [1, 1, T*T, D]: row (a, b) = v1_a * v2_b
    torch.testing.assert_close(kron_value_op_norm(v1, v2), torch.linalg.matrix_norm(kron, ord=2))
