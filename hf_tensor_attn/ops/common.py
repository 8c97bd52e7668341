"""What every tensor-attention op shares: input validation, the allowed-pair mask, the masked softmax and the limits
of exp.

Conventions (all ops): q is [B, H, Tq, D]; k1, k2, v1, v2 are [B, H_kv, Tk, D] with Tq <= Tk and H_kv dividing H
(grouped-query attention: key/value head j serves query heads j*G .. j*G+G-1, G = H / H_kv, as transformers'
`repeat_kv`). The queries are the
*last* Tq positions of the key sequence, so query i sits at absolute position t = Tk - Tq + i (prefill
continuation and decode). Query t may use the pair (a, b) when

    a <= t and b <= t                       (causal over pairs)
    t - a < w1 (if w1) and t - b < w2 (if w2)   (Roy et al. 2025 windows)
    attention_mask[a] and attention_mask[b]     (both tokens real)

A query with no allowed pair returns zeros.
"""

from __future__ import annotations

import torch


def check_inputs(q, k1, k2, v1, v2, *, scale, w1=None, w2=None, attention_mask=None) -> None:
    """Raise ValueError naming the offending argument when the inputs do not follow the op conventions."""
    named = check_streams(q, k1, k2, v1, v2)
    B, H, Tq, D = q.shape
    # The key length and head count are the ones most streams agree on, so the stream that differs is the one named.
    lengths = [named[name].shape[2] for name in ("k1", "k2", "v1", "v2")]
    Tk = max(lengths, key=lengths.count)
    heads = [named[name].shape[1] for name in ("k1", "k2", "v1", "v2")]
    H_kv = max(heads, key=heads.count)
    if H_kv < 1 or H % H_kv:
        raise ValueError(
            f"`k1` has {H_kv} heads, which must divide the {H} query heads of `q` (grouped-query attention)"
        )
    for name in ("k1", "k2", "v1", "v2"):
        t = named[name]
        if tuple(t.shape) != (B, H_kv, Tk, D):
            raise ValueError(
                f"`{name}` has shape {tuple(t.shape)}; expected {(B, H_kv, Tk, D)} to match `q` {tuple(q.shape)} and "
                "the other key/value streams"
            )
    for name, w in (("w1", w1), ("w2", w2)):
        if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 1):
            raise ValueError(f"`{name}` must be None (no window) or an int >= 1, got {w!r}")
    check_positions(q, Tk, scale, attention_mask)


def check_streams(q, k1, k2, v1, v2) -> dict[str, torch.Tensor]:
    """The checks every op makes of its five inputs: 4-dim tensors, floating point, q's dtype and device. Returns them
    by name for the op's own shape rules."""
    named = {"q": q, "k1": k1, "k2": k2, "v1": v1, "v2": v2}
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"`{name}` must be a torch.Tensor of shape [B, H, T, D], got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"`{name}` must have 4 dimensions [B, H, T, D], got shape {tuple(t.shape)}")
    if not q.dtype.is_floating_point:
        raise ValueError(f"`q` has dtype {q.dtype}; tensor attention needs floating-point inputs (float32, float64, "
                         "bfloat16 or float16)")
    for name, t in named.items():
        if t.device != q.device:
            raise ValueError(f"`{name}` is on {t.device} but `q` is on {q.device}; all inputs must be on one device")
        if t.dtype != q.dtype:
            raise ValueError(f"`{name}` has dtype {t.dtype}; all inputs must share q's dtype {q.dtype}")
    return named


def check_positions(q, Tk: int, scale, attention_mask) -> None:
    """Queries are the last Tq <= Tk positions; `scale` is a number; `attention_mask` is [B, Tk]."""
    B, Tq = q.shape[0], q.shape[2]
    if Tq > Tk:
        raise ValueError(f"`q` has {Tq} positions but the keys only {Tk}; queries must be the last Tq <= Tk positions")
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise ValueError(f"`scale` must be a float, got {scale!r}")
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != (B, Tk):
            shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask)
            raise ValueError(f"`attention_mask` must be a [B, Tk] = {(B, Tk)} tensor of 0/1 or bool, got {shape}")


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, H_kv, T, D] -> [B, H_kv * groups, T, D], each key/value head repeated for its group of query heads."""
    if groups == 1:
        return x
    B, H_kv, T, D = x.shape
    return x[:, :, None].expand(B, H_kv, groups, T, D).reshape(B, H_kv * groups, T, D)


def fold_groups(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[B, H, Tq, D] -> [B, H_kv, G * Tq, D]: the G query heads sharing a key/value head become more query rows of
    that head (row g * Tq + i is query i of head j * G + g). A view for contiguous q; no key is copied."""
    B, H, Tq, D = q.shape
    return q.reshape(B, kv_heads, (H // kv_heads) * Tq, D)


def unfold_groups(out: torch.Tensor, heads: int) -> torch.Tensor:
    """Inverse of `fold_groups`: [B, H_kv, G * Tq, ...] -> [B, H, Tq, ...]."""
    B, H_kv, rows = out.shape[:3]
    return out.reshape(B, heads, rows * H_kv // heads, *out.shape[3:])


def allowed_positions(Tq: int, Tk: int, window: int | None, device) -> torch.Tensor:
    """[Tq, Tk] bool: key position a is visible to query i (causal, and inside the window if any)."""
    t = torch.arange(Tk - Tq, Tk, device=device)[:, None]  # absolute query positions
    a = torch.arange(Tk, device=device)[None, :]
    ok = a <= t
    if window is not None:
        ok = ok & (t - a < window)
    return ok


def _allowed_count(flags: torch.Tensor, Tq: int, window: int | None) -> torch.Tensor:
    """[..., Tq, n] count of the flagged key positions (flags [..., Tk, n] bool) that each query may use (causal,
    window)."""
    Tk = flags.shape[-2]
    counts = torch.nn.functional.pad(flags.to(torch.int64).cumsum(-2), (0, 0, 1, 0))  # [..., Tk + 1, n]
    hi = torch.arange(Tk - Tq + 1, Tk + 1, device=flags.device)  # query t counts keys < t + 1 ...
    lo = (hi - window).clamp_min(0) if window is not None else torch.zeros_like(hi)  # ... and >= t + 1 - w
    return counts[..., hi, :] - counts[..., lo, :]


def nonfinite_outputs(q, k1, k2, v1, v2, *, w1=None, w2=None, attention_mask=None) -> torch.Tensor | None:
    """[B, H, Tq, D] bool: the output entries that the definition makes non-finite, or None when every input is
    finite. Positions query t may not use (later, outside a window, padding) never matter. If t has an allowed
    pair, a NaN or infinity in its query or in a key it may use spoils its whole row (every score may be NaN);
    one in component j of a value it may use spoils only component j (o_t[j] = sum P v1_a[j] v2_b[j]).

    Fast paths that share work between queries (tiles, GEMMs over shared columns) cannot keep a NaN out of the
    rows that do not use it (0 * NaN = NaN), so they run on zeroed copies and set these entries afterwards.
    """
    bad_q = ~torch.isfinite(q).all(-1, keepdim=True)  # [B, H, Tq, 1]
    bad_k1, bad_k2 = (~torch.isfinite(k).all(-1, keepdim=True) for k in (k1, k2))  # [B, H_kv, Tk, 1]
    bad_v1, bad_v2 = ~torch.isfinite(v1), ~torch.isfinite(v2)  # [B, H_kv, Tk, D]
    if not any(bool(bad.any()) for bad in (bad_q, bad_k1, bad_k2, bad_v1, bad_v2)):
        return None
    Tq = q.shape[2]
    real = torch.ones_like(bad_k1[:1, :1]) if attention_mask is None else (
        attention_mask.to(q.device, torch.bool)[:, None, :, None])  # [B or 1, 1, Tk, 1]

    def used(flags, window):  # [..., Tk, n] -> [..., Tq, n]: some flagged position the query may use
        return _allowed_count(flags & real, Tq, window) > 0

    groups = q.shape[1] // k1.shape[1]  # grouped key/value heads: a key's flags reach each query head of its group
    has_pair = used(real, w1) & used(real, w2)  # [B or 1, 1, Tq, 1]
    row = bad_q | repeat_kv(used(bad_k1, w1) | used(bad_k2, w2), groups)  # [B, H, Tq, 1]
    return has_pair & (row | repeat_kv(used(bad_v1, w1) | used(bad_v2, w2), groups))


def all_finite(x: torch.Tensor) -> bool:
    """Whether x holds no NaN or infinity. A NaN or infinity anywhere makes the sum non-finite, and the sum is one
    vectorised pass where isfinite(x).all() is two with a bool tensor between; a sum that overflows only sends the
    caller to its slower, exact check."""
    return bool(torch.isfinite(x.sum()))


def finite_copies(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors with every NaN and infinity replaced by 0 (see `nonfinite_outputs`)."""
    return tuple(torch.where(torch.isfinite(t), t, torch.zeros_like(t)) for t in tensors)


def allowed_pairs(Tq: int, Tk: int, w1, w2, attention_mask, device) -> torch.Tensor:
    """[B or 1, 1, Tq, Tk, Tk] bool mask of the pairs (a, b) each query may use."""
    ok1 = allowed_positions(Tq, Tk, w1, device)  # [Tq, Tk] over a
    ok2 = allowed_positions(Tq, Tk, w2, device)  # [Tq, Tk] over b
    pairs = (ok1[:, :, None] & ok2[:, None, :])[None, None]  # [1, 1, Tq, Tk, Tk]
    if attention_mask is not None:
        real = attention_mask.to(device=device, dtype=torch.bool)  # [B, Tk]
        pairs = pairs & (real[:, None, None, :, None] & real[:, None, None, None, :])
    return pairs


# Largest score above the running reference (shift) that may enter exp unchecked: e^40 times 1e10 pairs times values
# up to 1e11 still fits float32 (e^300 in float64 has far more room). Below this, no max pass is needed.
EXP_HEADROOM = {torch.float32: 40.0, torch.float64: 300.0}
# exp arguments are clamped to at least this: below about -87 (float32) or -708 (float64) torch's exp leaves its
# vector path, and a tile full of such values (or of -inf from masks) runs many times slower. A masked pair then weighs
# e^-80 ~ 2e-35 (e^-700 in float64) instead of 0, against at least 1 for the reference pair: far below rounding.
EXP_FLOOR = {torch.float32: -80.0, torch.float64: -700.0}


def finite_or_zero(shift: torch.Tensor) -> torch.Tensor:
    """A softmax shift (a max over scores) with -inf, from rows where nothing is allowed, replaced by 0, so that
    exp(-inf - shift) is 0 there instead of NaN."""
    return torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))


def masked_softmax(scores: torch.Tensor, allowed: torch.Tensor | None, dim: int = -1) -> torch.Tensor:
    """softmax of `scores` over `dim` among the `allowed` entries (a bool mask broadcastable to scores, or None for
    all); disallowed entries get 0, and a row with nothing allowed is all zeros, never NaN."""
    if allowed is None:
        return torch.softmax(scores, dim=dim)
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.exp(scores - finite_or_zero(scores.amax(dim, keepdim=True)))
    denom = probs.sum(dim, keepdim=True)
    return probs / torch.where(denom > 0, denom, torch.ones_like(denom))
