"""The polynomial-state layout (Alman & Song's factorisation as a recurrence): per layer and head the running
feature sums of `ops.poly.chunk.PolyState`, O(r d) numbers with r = C(d + g, g), whatever the sequence length.

Two uses:
- `cache_implementation="poly"` (`cache_config={"degree": g, "score_bound": R}`) for the `"tensor_attention"` layers
  of any model: the softmax's exp is replaced by the degree-g polynomial at decode time, an approximation whose
  error grows sharply with the score magnitude (docs/bench_poly.md). r grows like d^g / g!: with head_dim 64,
  degree 2 is 2,145 features per head; degree 4 would be 814,385.
- the `"poly_tensor_attention"` layers always get this layer with their own degree and scale, whatever layout
  the tensor layers use: they are trained with the polynomial kernel, so the state is exact for them.

The prefill and every decode step continue the held state with `ops.poly.chunk.poly_attention_continue` (the op's
own recurrence; through the attention door, which picks the decode step's compiled loop on CPU), so a cached decode
equals one `poly_tensor_attention` call over the whole sequence.
"""

from __future__ import annotations

import torch

from ..ops.dispatch import poly_attention_continue
from ..ops.poly.chunk import PolyState
from ..ops.poly.common import check_degree, check_feature_count, check_score_bound, key_mask
from .base import TensorAttnCacheLayer, TensorAttnConstants, register_layer_type_cache, register_layout
from .two import default_memory_budget

# While a step runs, the state it continues, the new state and at least one position of prefix sums are alive.
STATES_ALIVE_IN_A_STEP = 3


class PolyCacheMemoryError(MemoryError):
    """The poly state of this degree and width would not fit the memory guard."""


@register_layout("poly")
class PolyCacheLayer(TensorAttnCacheLayer):
    """Holds a `PolyState` per sequence and head. `keys` / `values` stay empty ([B, H, 0, 2Dk] / [B, H, 0, 2Dv]):
    no token is kept, only its features' sums."""

    why_not_croppable = "its state is a sum over every token's features and a token cannot be taken back out of it"
    changes_the_kernel = True

    def __init__(self, constants, *, degree: int = 2, score_bound: float | None = None):
        checks = (("degree", lambda: check_degree(degree, even=True)),
                  ("score_bound", lambda: check_score_bound(score_bound, degree)))
        for name, check in checks:
            try:
                check()
            except ValueError as e:
                raise ValueError(f"`cache_config['{name}']`: {e}") from None
        if isinstance(constants, TensorAttnConstants) and (constants.w1 is not None or constants.w2 is not None):
            raise ValueError(
                f"cache_implementation='poly' sums every past token into its state and cannot apply the model's "
                f"windows w1={constants.w1}, w2={constants.w2}; use 'four_cache' (exact) or a model without windows"
            )
        super().__init__(constants, degree=degree, score_bound=score_bound)
        self.degree, self.score_bound = degree, score_bound

    def allocate(self, key_states, value_states) -> None:
        B, H, _, Dk2 = key_states.shape
        Dv2 = value_states.shape[3]
        self.keys, self.values = key_states[:, :, :0], value_states[:, :, :0]  # [B, H, 0, 2Dk], [B, H, 0, 2Dv]
        compute = torch.float64 if key_states.dtype == torch.float64 else torch.float32
        try:
            r = check_feature_count(Dk2 // 2, self.degree)
        except ValueError as e:
            raise PolyCacheMemoryError(f"cache_implementation='poly': {e}") from None
        if not torch.compiler.is_compiling():  # a traced graph cannot ask the machine for its memory
            self._check_memory(B, H, r, Dk2 // 2, Dv2 // 2, compute, key_states.device)
        self.state = PolyState.zeros(B, H, r, Dk2 // 2, Dv2 // 2, dtype=compute, device=key_states.device)
        self.pending = None  # tokens appended but not yet attended: (keys, values, [B, 1, T, 1] mask)
        self.scratch = {}  # the torch-ops decode step's buffer (`poly_attention_continue`), none on the compiled path

    def _check_memory(self, B, H, r, Dk, Dv, dtype, device) -> None:
        """Refuse, before allocating, a state that would pass a quarter of the device's memory (as two_cache)."""
        state = B * H * (2 * r * Dv + 2 * r + 2 * Dk) * torch.finfo(dtype).bits // 8
        need, budget = STATES_ALIVE_IN_A_STEP * state, default_memory_budget(torch.device(device))
        if need > budget:
            raise PolyCacheMemoryError(
                f"cache_implementation='poly' with degree={self.degree} holds r = {r:,} features per head: a batch of "
                f"{B} x {H} heads needs {state:,} bytes of state and {need:,} while a step updates it, past the guard "
                f"of {budget:,} bytes (a quarter of the device's memory); lower the degree or the batch"
            )

    def check_states(self, key_states, value_states) -> None:
        # Keys and values may differ in width here (poly layers project q, k to a small feature dimension).
        for name, t, held in (("key_states", key_states, self.keys), ("value_states", value_states, self.values)):
            expected = (held.shape[0], held.shape[1], held.shape[3])
            if not isinstance(t, torch.Tensor) or t.dim() != 4 or (t.shape[0], t.shape[1], t.shape[3]) != expected:
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"`{name}` must be [B, H, T, width] with (B, H, width) = {expected}, got {shape}")

    def append(self, key_states, value_states, attention_mask) -> None:
        if self.pending is not None:  # appended twice without a read: fold the earlier tokens in, no query
            self._advance(None)
        B, _, T, _ = key_states.shape
        mask = None if attention_mask is None else attention_mask[:, -T:]
        self.pending = (key_states, value_states, key_mask(mask, B, T, self.state.S1.dtype, key_states.device))

    def _advance(self, query):
        """Continue the state over the pending tokens; the attention of `query` (None: no query) over them."""
        keys, values, real = self.pending
        dtype = self.state.S1.dtype
        k1, k2 = keys.to(dtype).chunk(2, dim=-1)  # [B, H, T, Dk] each
        v1, v2 = values.to(dtype).chunk(2, dim=-1)  # [B, H, T, Dv] each
        q = k1[:, :, :0] if query is None else query.to(dtype)
        B, H_kv = k1.shape[:2]
        groups = q.shape[1] // H_kv  # grouped key/value heads: each state head serves `groups` query heads
        out, self.state = poly_attention_continue(self.state, q.view(B, H_kv, groups, *q.shape[2:]), k1, k2, v1, v2,
                                                  real, scale=self.constants.scale, degree=self.degree,
                                                  score_bound=self.score_bound, scratch=self.scratch)
        self.pending = None
        return out.flatten(1, 2)  # [B, H, Tq, Dv]

    def read(self, query, attention_mask):
        if self.pending is None:
            raise ValueError("cache_implementation='poly' answers queries of the tokens just appended only: its state "
                             "cannot attend again over tokens it has already summed")
        if query.shape[2] > self.pending[0].shape[2]:
            raise ValueError(f"`query` has {query.shape[2]} positions but only {self.pending[0].shape[2]} new tokens "
                             "were appended; the poly state answers queries among the newest tokens only")
        return self._advance(query).to(query.dtype)

    def map_batch(self, fn) -> None:
        self.state = PolyState(*(fn(t) for t in self.state))
        self.scratch = {}
        self.keys, self.values = fn(self.keys), fn(self.values)
        if self.pending is not None:
            self.pending = tuple(fn(t) for t in self.pending)

    def move(self, device) -> None:
        self.map_batch(lambda t: t.to(device, non_blocking=True))

    def memory_bytes(self) -> int:
        """Bytes of the state: O(B H r (Dv + 1)), constant in the number of tokens seen."""
        if not self.is_initialized:
            return 0
        return sum(t.numel() * t.element_size() for t in self.state)


def poly_layer_cache(config) -> PolyCacheLayer:
    """The cache layer of a `"poly_tensor_attention"` layer: exact for it, whatever layout the tensor layers use."""
    return PolyCacheLayer(TensorAttnConstants(scale=config.poly_score_scale), degree=config.poly_degree)


register_layer_type_cache("poly_tensor_attention", poly_layer_cache)
