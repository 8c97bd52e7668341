"""NaN containment in the cache layouts' read paths (issue #15): a NaN in one token changes exactly the outputs the
naive op changes (exact layouts), and a padded token never contributes whatever it holds (every layout)."""

from __future__ import annotations

import pytest
import torch

from hf_tensor_attn.cache import TensorAttnCache
from hf_tensor_attn.configuration import TensorAttnConfig
from hf_tensor_attn.ops import naive_tensor_attention

from ..ops.test_nonfinite import D, T, assert_same_rows, inputs, poison


def run_cache(layout, q, k1, k2, v1, v2, mask, cache_config=None):
    """Prefill of 12 tokens, then single-token steps through a layout; [B, H, T, D]."""
    config = TensorAttnConfig(hidden_size=2 * D, num_attention_heads=2, num_hidden_layers=1, score_scale=0.5)
    cache = TensorAttnCache(config, layout, cache_config)
    keys, values = torch.cat([k1, k2], -1), torch.cat([v1, v2], -1)  # [B, H, T, 2D]: k1 | k2, v1 | v2
    outs = [cache.attend(0, q[:, :, :12], keys[:, :, :12], values[:, :, :12], mask[:, :12])]
    for t in range(12, T):
        outs.append(cache.attend(0, q[:, :, t : t + 1], keys[:, :, t : t + 1], values[:, :, t : t + 1], mask[:, : t + 1]))
    return torch.cat(outs, 2)


@pytest.mark.parametrize("layout", ["four_cache", "two_cache"])
@pytest.mark.parametrize("name, position", [("v1", 1), ("k2", 2), ("v2", 10), ("k1", 14)])
def test_exact_layouts_change_the_rows_naive_changes(layout, name, position):
    tensors, mask = inputs()
    poisoned = poison(tensors, name, position, float("nan"))
    ref = naive_tensor_attention(*poisoned, scale=0.5, attention_mask=mask)
    assert_same_rows(run_cache(layout, *poisoned, mask), ref)


@pytest.mark.parametrize("layout", ["subgen4", "subgen2"])
@pytest.mark.parametrize("name, position", [("v1", 1), ("v2", 0), ("k1", 2), ("k2", 1)])
def test_subgen_layouts_ignore_what_padded_tokens_hold(layout, name, position):
    """A NaN in a padded value row made every later decode step NaN."""
    tensors, mask = inputs()
    clean = run_cache(layout, *tensors, mask, {"recent_window": 4})
    dirty = run_cache(layout, *poison(tensors, name, position, float("nan")), mask, {"recent_window": 4})
    torch.testing.assert_close(dirty, clean, rtol=0, atol=0)
