"""Every op refuses, by name, what its definition does not cover (issue #15): integer tensors (they used to return
truncated int64 output), tensors on different devices, and a key stream of the wrong length (reported as k1, not k2)."""

import pytest
import torch

from hf_tensor_attn.ops import four_cache_decode, naive_tensor_attention, tensor_attention

OPS = [naive_tensor_attention, tensor_attention, four_cache_decode]


def streams(T=5, D=4, dtype=torch.float32):
    return [torch.randn(1, 2, T, D).to(dtype) for _ in range(4)]


def query(op, T=5, D=4, dtype=torch.float32):
    return torch.randn(1, 2, 1 if op is four_cache_decode else T, D).to(dtype)


@pytest.mark.parametrize("op", OPS)
def test_integer_tensors_are_refused(op):
    with pytest.raises(ValueError, match=r"`q` has dtype torch.int64; .*floating-point"):
        op(query(op, dtype=torch.int64), *streams(dtype=torch.int64), scale=1.0)


@pytest.mark.parametrize("op", OPS)
def test_tensors_on_another_device_are_refused_by_name(op):
    k1, k2, v1, v2 = streams()
    with pytest.raises(ValueError, match=r"`v1` is on meta but `q` is on cpu"):
        op(query(op), k1, k2, v1.to("meta"), v2, scale=1.0)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("wrong", ["k1", "k2", "v1", "v2"])
def test_a_stream_of_the_wrong_length_is_the_one_named(op, wrong):
    named = dict(zip(("k1", "k2", "v1", "v2"), streams()))
    named[wrong] = named[wrong][:, :, :4]
    with pytest.raises(ValueError, match=rf"`{wrong}` has shape \(1, 2, 4, 4\); expected \(1, 2, 5, 4\)"):
        op(query(op), **named, scale=1.0)


def test_naive_op_without_queries_or_keys_returns_an_empty_output():
    """Tq = Tk = 0 was an IndexError in the softmax; the fast op returned [B, H, 0, D]."""
    q, k1, k2, v1, v2 = (torch.randn(1, 2, 0, 4) for _ in range(5))
    for op in (naive_tensor_attention, tensor_attention):
        assert op(q, k1, k2, v1, v2, scale=0.5).shape == (1, 2, 0, 4)
