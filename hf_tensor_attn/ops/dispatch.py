"""The attention door: the one place that decides how a tensor-attention call runs.

Every exact tensor-attention computation of the package (layers without a cache, every cache layout's exact reads,
direct calls of `ops.tensor_attention` / `ops.four_cache_decode`) and every polynomial one enters here. The door

1. applies the **autocast rule**: under `torch.autocast` the inputs are cast to the autocast dtype (as SDPA takes
   them) and the op runs with autocast off, so its softmax statistics and accumulation stay in fp32 (fp64 inputs are
   left alone, as autocast leaves them). Outside autocast, inputs of mixed dtypes get a ValueError naming them.
2. **chooses the implementation** of the exact op (`exact/`): the Triton kernels (`triton_kernels`; CUDA tensors,
   see `backend.use_triton`), the in-place one-query decode step (`decode`; one query, no gradient), or the tiled
   op (`tiled`) with its compiled C++ loops (`extension`, where they build) or its Python loops. Grouped key/value
   heads are repeated here for the tiled op only; the other two read them in place. A static cache's compiled step,
   whose queries sit at positions only the device knows, runs `decode.positioned_tensor_attention` (fixed shapes),
   as does a call with a 4D custom mask (`query_masks`).
3. guards **non-finite values** once, around whatever ran: an output with a NaN or infinity is recomputed on
   finite copies of the inputs and exactly the entries the definition makes non-finite are set
   (`common.nonfinite_outputs`); a kernel that overflows on finite inputs is recomputed on the torch path.
4. **checks the Triton kernels** the first time each (kernel, dtype, head dim, device) runs in a process with the
   automatic backend: a small random problem (padding, a window, grouped heads) against the torch path; on a
   mismatch beyond that dtype's tolerance one warning names the kernel and the error, and the torch path runs from
   then on. `HF_TENSOR_ATTN_SELF_CHECK=0` turns the check off; `backend="triton"` runs the kernels unchecked.

The forward and backward passes are one pair of `torch.library` custom ops whatever the implementation, so
`torch.compile` sees one opaque call and autograd one mechanism.
"""

from __future__ import annotations

import contextlib
import os
import warnings

import torch

from . import backend, extension
from .exact import decode, tiled
from ..registry import check_backend
from .common import all_finite, check_inputs, finite_copies, nonfinite_outputs, repeat_kv

SELF_CHECK_ENV = "HF_TENSOR_ATTN_SELF_CHECK"
# Largest error of a kernel against the torch path on the self-check problem, relative to the output's scale: a few
# roundings of the dtype (operands are rounded to it in the kernels' dot products).
SELF_CHECK_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2**-5, torch.float16: 2**-8}
IMPLEMENTATIONS = ("triton", "compiled", "python")  # of the custom ops (the decode step has no autograd)
_self_checks: dict[tuple, str | None] = {}  # (kernel, dtype, head dim, device) -> None if it passed, else why not


# ---- 1. the autocast rule ----


def autocast_inputs(*tensors: torch.Tensor):
    """(tensors, context): under `torch.autocast` for their device the floating tensors cast to the autocast dtype
    (float64 ones kept) and a context that turns autocast off inside the op; otherwise as given, no-op context."""
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return tensors, contextlib.nullcontext()
    dtype = torch.get_autocast_dtype(device)
    cast = tuple(t.to(dtype) if t.is_floating_point() and t.dtype != torch.float64 else t for t in tensors)
    return cast, torch.autocast(device, enabled=False)


# ---- 2. the choice ----


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def use_triton(backend_name, q: torch.Tensor) -> bool:
    """Whether a call with `backend_name` (None: automatic, "torch", "triton") may run the Triton kernels: automatic
    takes them for CUDA tensors of a dtype they support when a tested triton is installed (`ops.backend`); "triton"
    insists and raises a ValueError saying why it cannot (CPU tensors run them only under TRITON_INTERPRET=1)."""
    check_backend(backend_name)
    if backend_name == "torch":
        return False
    if backend_name is None:
        return (q.is_cuda and q.dtype in backend.TRITON_DTYPES and backend.triton_installed()
                and backend.check_triton_version(backend_name))
    if not backend.triton_installed():
        raise ValueError("backend='triton' needs the `triton` package: pip install 'hf_tensor_attn[gpu]'")
    if q.dtype not in backend.TRITON_DTYPES:
        raise ValueError(f"backend='triton' supports dtypes {[str(d) for d in backend.TRITON_DTYPES]}, got {q.dtype}")
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise ValueError(
            f"backend='triton' needs CUDA tensors (got device {q.device}), or TRITON_INTERPRET=1 to run the "
            "kernels on CPU in Triton's interpreter"
        )
    return backend.check_triton_version(backend_name)


def implementation(backend, q: torch.Tensor, *, one_query: bool, needs_grad: bool) -> str:
    """Which implementation runs a call: "triton", "decode", "compiled" or "python" (module docstring)."""
    if use_triton(backend, q) and (backend == "triton" or _self_check(q, one_query and not needs_grad) is None):
        return "triton"
    if one_query and not needs_grad:
        return "decode"
    return _torch_path(q)


def _run(impl, q, k1, k2, v1, v2, scale, w1, w2, attention_mask, workspace):
    one_query = q.shape[2] == 1 and not _needs_grad(q, k1, k2, v1, v2)
    if impl == "decode":
        return decode.four_cache_decode_step(q, k1, k2, v1, v2, scale=scale, w1=w1, w2=w2,
                                             attention_mask=attention_mask, workspace=workspace,
                                             loops=_decode_loops(q))
    if impl == "triton" and one_query:
        from .exact import triton_kernels  # triton is an optional dependency

        return triton_kernels.four_cache_decode(q, k1, k2, v1, v2, scale=scale, w1=w1, w2=w2,
                                                attention_mask=attention_mask)
    if impl != "triton":  # the tiled op batches its tiles per query head
        groups = q.shape[1] // k1.shape[1]
        k1, k2, v1, v2 = (repeat_kv(t, groups) for t in (k1, k2, v1, v2))
    out = _forward_op(q, k1, k2, v1, v2, float(scale), w1, w2, attention_mask, impl)[0]
    return out.view(q.shape).to(q.dtype)


# ---- the door ----


def tensor_attention(q, k1, k2, v1, v2, *, scale, w1=None, w2=None, attention_mask=None, backend=None,
                     workspace=None, documents=None, positions=None, query_masks=None, checked=False):
    """Exact tensor attention with the signature of `naive_tensor_attention`; differentiable.

    q is [B, H, Tq, D], k1, k2, v1, v2 are [B, H_kv, Tk, D] (H_kv dividing H); returns [B, H, Tq, D] in q's dtype
    (the autocast dtype under autocast). Computes in float64 for float64 inputs and in float32 otherwise. Peak extra
    memory is O(tile + T*d). `backend`: None (automatic), "torch" or "triton" (`ops.backend`). `workspace`: a
    `decode.DecodeWorkspace` the caller keeps for one-query steps (a cache layer), or None. `documents`: [B, Tk]
    integer ids of packed sequences (equal ids in one contiguous run per document): query t then uses only pairs
    (a, b) with both a and b in its own document (see `per_document`). `positions`: [Tq] consecutive token positions
    of the queries in streams that are a preallocated buffer written up to the last query (a static cache), None
    when the queries are the last Tq of the keys. Compiled, such a call runs `decode.positioned_tensor_attention`
    (shapes independent of the positions); eagerly the streams are cut after the last query and the call goes on as
    any other. `query_masks`: [B, Tq, Tk] bool, per query the tokens it may use (a 4D custom mask, queries the last
    Tq positions), a pair allowed when both tokens are; it runs `decode.positioned_tensor_attention` (O(Tq Tk^2)
    scores per head, differentiable), in place of `attention_mask`. `checked`: the caller (a cache layer, which checks
    the query and holds streams it built itself) vouches for the conventions, and the per-call checks are skipped (a
    decode step at short context costs about as much as they do).
    """
    (q, k1, k2, v1, v2), amp_off = autocast_inputs(q, k1, k2, v1, v2)
    if not checked:
        check_inputs(q, k1, k2, v1, v2, scale=scale, w1=w1, w2=w2, attention_mask=attention_mask)
    if attention_mask is not None:
        attention_mask = attention_mask.to(q.device)
    if query_masks is not None:
        Tq, Tk = q.shape[2], k1.shape[2]
        if not isinstance(query_masks, torch.Tensor) or tuple(query_masks.shape) != (q.shape[0], Tq, Tk):
            shape = tuple(query_masks.shape) if isinstance(query_masks, torch.Tensor) else type(query_masks).__name__
            raise ValueError(f"`query_masks` must be a [B, Tq, Tk] = {(q.shape[0], Tq, Tk)} bool tensor, got {shape}")
        if attention_mask is not None or positions is not None or documents is not None:
            raise ValueError("`query_masks` (a 4D custom mask) replaces `attention_mask`, `positions` and `documents`")
        with amp_off:
            return decode.positioned_tensor_attention(q, k1, k2, v1, v2, scale=scale, w1=w1, w2=w2,
                                                      positions=torch.arange(Tk - Tq, Tk, device=q.device),
                                                      attention_mask=query_masks)
    if positions is not None:
        if torch.compiler.is_compiling():
            with amp_off:
                return decode.positioned_tensor_attention(q, k1, k2, v1, v2, scale=scale, positions=positions, w1=w1,
                                                          w2=w2, attention_mask=attention_mask)
        n = int(positions[-1]) + 1  # one host sync per call, as reading any cache length
        k1, k2, v1, v2 = (t[:, :, :n] for t in (k1, k2, v1, v2))
        if attention_mask is not None:
            attention_mask = attention_mask[:, :n]
            attention_mask = None if bool(attention_mask.all()) else attention_mask
    if documents is not None:
        def one(q, k1, k2, v1, v2, attention_mask):
            return tensor_attention(q, k1, k2, v1, v2, scale=scale, w1=w1, w2=w2, attention_mask=attention_mask,
                                    backend=backend, workspace=workspace)

        with amp_off:
            return per_document(one, q, (k1, k2, v1, v2), documents, attention_mask)
    args = (scale, w1, w2, attention_mask, workspace)
    with amp_off:
        impl = implementation(backend, q, one_query=q.shape[2] == 1, needs_grad=_needs_grad(q, k1, k2, v1, v2))
        out = _run(impl, q, k1, k2, v1, v2, *args)
        # Checking the output is a host sync and a data-dependent branch: a compiled graph keeps what ran. The decode
        # step needs no check: it slices the windows, zeroes padded values and masks padded scores, so a NaN reaches
        # exactly the entries the definition gives it (tests/ops/test_nonfinite.py).
        if impl == "decode" or torch.compiler.is_compiling() or all_finite(out):
            return out
        # Tiles and GEMMs share keys and values between queries, so a NaN may have reached rows that do not use it.
        poisoned = nonfinite_outputs(q, k1, k2, v1, v2, w1=w1, w2=w2, attention_mask=attention_mask)
        if poisoned is None:  # finite inputs: a kernel's fp16 operands, or sums of huge values, overflowed
            return _with_values_rescaled(_torch_path(q), q, k1, k2, v1, v2, *args)
        out = _run(impl, *finite_copies(q, k1, k2, v1, v2), *args)
        return out.masked_fill(poisoned.expand(out.shape), float("nan"))


def four_cache_decode(q, k1, k2, v1, v2, *, scale, w1=None, w2=None, attention_mask=None, backend=None,
                      workspace=None):
    """`tensor_attention` of one decode position (q [B, H, 1, D]) over the four cache matrices (paper Def. 3.7):
    the GEMM-shaped step of `decode` (or the Triton decode kernel) when no gradient is needed."""
    if isinstance(q, torch.Tensor) and (q.dim() != 4 or q.shape[2] != 1):
        raise ValueError(f"`q` must hold one decode position [B, H, 1, D], got shape {tuple(q.shape)}")
    return tensor_attention(q, k1, k2, v1, v2, scale=scale, w1=w1, w2=w2, attention_mask=attention_mask,
                            backend=backend, workspace=workspace)


def attention(spec, q, k, v, *, attention_mask=None, workspace=None, documents=None, positions=None,
              query_masks=None, checked=False):
    """A tensor layer's attention from its constants `spec` (scale, w1, w2, backend): k = k1 | k2 and v = v1 | v2
    side by side along the head features ([B, H_kv, Tk, 2D]), as the layers project them and the caches hold them."""
    k1, k2 = k.chunk(2, dim=-1)
    v1, v2 = v.chunk(2, dim=-1)
    return tensor_attention(q, k1, k2, v1, v2, scale=spec.scale, w1=spec.w1, w2=spec.w2,
                            attention_mask=attention_mask, backend=spec.backend, workspace=workspace,
                            documents=documents, positions=positions, query_masks=query_masks, checked=checked)


def poly_tensor_attention(q, k1, k2, v1, v2, *, scale, degree, attention_mask=None, causal=True, score_bound=None,
                          chunk_size=None, documents=None):
    """`poly.chunk.poly_tensor_attention` through the door's autocast rule and packed `documents` (it has one
    implementation)."""
    from .poly.chunk import poly_tensor_attention as op

    (q, k1, k2, v1, v2), amp_off = autocast_inputs(q, k1, k2, v1, v2)

    def one(q, k1, k2, v1, v2, attention_mask):
        return op(q, k1, k2, v1, v2, scale=scale, degree=degree, attention_mask=attention_mask, causal=causal,
                  score_bound=score_bound, chunk_size=chunk_size)

    with amp_off:
        if documents is not None:
            return per_document(one, q, (k1, k2, v1, v2), documents, attention_mask)
        return one(q, k1, k2, v1, v2, attention_mask)


def poly_attention_continue(state, q, k1, k2, v1, v2, real, **options):
    """`poly.chunk.poly_attention_continue` (the `poly` cache's prefill and steps) with its decode step's
    implementation chosen here (`_decode_loops`)."""
    from .poly.chunk import poly_attention_continue as op

    return op(state, q, k1, k2, v1, v2, real, loops=_decode_loops(q), **options)


def weighted_pair_attention(q, k1, lw1, k2, lw2, *, scale, v1, v2):
    """`subgen.estimators.weighted_pair_attention` (a `subgen4` decode step over its exact and summary rows) with its
    implementation chosen here: `_decode_loops`, or the torch ops when a gradient is needed (the compiled step has
    none)."""
    from .subgen.estimators import weighted_pair_attention as op

    loops = None if _needs_grad(q, k1, lw1, k2, lw2, v1, v2) else _decode_loops(q)
    return op(q, k1, lw1, k2, lw2, scale=scale, v1=v1, v2=v2, loops=loops)


def _decode_loops(q):
    """The compiled CPU library for a one-query step without gradient where it is loaded (CPU tensors), else None (the
    step's torch ops); None while tracing too: the library's ops are opaque to the compiler, which traces the torch
    ops instead."""
    return None if torch.compiler.is_compiling() else _loops(_torch_path(q))


def per_document(op, q, streams, documents, attention_mask):
    """`op(q, *streams, attention_mask)` on each packed document of each row, outputs put back in place.

    Packed sequences (padding-free batches, TRL's `packing=True`) hold several documents in one row; a document's
    queries may use only its own tokens. Cutting the row at the document boundaries gives every implementation that
    rule (each piece is an ordinary causal call), where a document mask inside the kernels would be one more mask
    for each of them to honour. One call per document: the boundaries are read on the host.
    """
    B, Tq, Tk = q.shape[0], q.shape[2], streams[0].shape[2]
    if not isinstance(documents, torch.Tensor) or documents.dtype.is_floating_point or tuple(documents.shape) != (
            B, Tk):
        shape = tuple(documents.shape) if isinstance(documents, torch.Tensor) else type(documents).__name__
        raise ValueError(f"`documents` must be a [B, Tk] = {(B, Tk)} integer tensor of packed-sequence ids, got {shape}")
    documents = documents.to(q.device)
    starts = torch.ones(B, Tk, dtype=torch.bool, device=q.device)
    starts[:, 1:] = documents[:, 1:] != documents[:, :-1]
    rows = []
    for b, row_starts in enumerate(starts.cpu().tolist()):
        edges = [t for t, new in enumerate(row_starts) if new] + [Tk]
        pieces = []
        for start, stop in zip(edges, edges[1:]):
            first = max(start, Tk - Tq)  # the document's queries: positions first .. stop - 1
            if first < stop:
                mask = None if attention_mask is None else attention_mask[b : b + 1, start:stop]
                pieces.append(op(q[b : b + 1, :, first - (Tk - Tq) : stop - (Tk - Tq)],
                                 *(t[b : b + 1, :, start:stop] for t in streams), mask))
        rows.append(torch.cat(pieces, dim=2))
    return torch.cat(rows, dim=0)


def _with_values_rescaled(impl, q, k1, k2, v1, v2, *args):
    """The call again on values divided per head by a power of two near their largest magnitude, the output multiplied
    back: the tiles sum unnormalised weights times v1 * v2 and divide by the weights' sum only at the end, so
    finite values within a factor (pairs) of float32's maximum overflow where the normalised sum does not. Powers of
    two keep the finite case exact. The torch path runs it (it computes in fp32 where the kernels round to fp16)."""
    groups = q.shape[1] // k1.shape[1]
    # 2^(e - 1) <= max|v| < 2^e; 2^e itself is past float32's maximum when max|v| is above 2^127.
    factors = [torch.exp2(torch.frexp(v.abs().amax(dim=(2, 3), keepdim=True))[1].to(v.dtype) - 1) for v in (v1, v2)]
    out = _run(impl, q, k1, k2, v1 / factors[0], v2 / factors[1], *args)
    return out * repeat_kv(factors[0], groups) * repeat_kv(factors[1], groups)  # one at a time: the product may overflow


def _torch_path(q) -> str:
    if q.device.type != "cpu":
        return "python"
    if torch.compiler.is_compiling():
        # Loading the library takes a lock a traced graph cannot hold: decide on the switch alone, and let the op
        # (opaque to the compiler) fall back to its Python loops if the library does not load (`_loops`).
        return "compiled" if extension.enabled() else "python"
    return "compiled" if extension.cpu_ops() is not None else "python"


# ---- 4. the kernels' self-check ----


def _self_check(q: torch.Tensor, one_query: bool) -> str | None:
    """None when the Triton kernel for q's dtype, head dim and device agreed with the torch path on a small problem
    (checked once per process), else why not."""
    if os.environ.get(SELF_CHECK_ENV, "1") not in ("1", "0"):
        raise ValueError(f"{SELF_CHECK_ENV} must be 1 (check the Triton kernels at first use) or 0, got "
                         f"{os.environ[SELF_CHECK_ENV]!r}")
    if os.environ.get(SELF_CHECK_ENV, "1") == "0":
        return None
    key = ("decode" if one_query else "attention", q.dtype, q.shape[-1], str(q.device))
    if key not in _self_checks:
        if torch.compiler.is_compiling():
            return None  # checked by the first eager call; a compiled graph cannot run the comparison
        _self_checks[key] = why = _compare_with_torch(*key[:3], q.device)
        if why is not None:
            warnings.warn(f"hf_tensor_attn: the Triton {why}; this process runs the torch path for it instead "
                          f"({SELF_CHECK_ENV}=0 skips the check)", RuntimeWarning, stacklevel=4)
    return _self_checks[key]


def self_check_results() -> dict[tuple, str | None]:
    """The self-checks run so far in this process: (kernel, dtype, head dim, device) -> None (passed) or why not."""
    return dict(_self_checks)


def _compare_with_torch(kernel: str, dtype: torch.dtype, D: int, device) -> str | None:
    g = torch.Generator().manual_seed(0)
    B, H, H_kv, T = 2, 4, 2, 19
    Tq = 1 if kernel == "decode" else T
    q = torch.randn(B, H, Tq, D, generator=g)
    k1, k2, v1, v2 = (torch.randn(B, H_kv, T, D, generator=g) for _ in range(4))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, :3] = 0  # a left-padded row
    inputs = [t.to(device=device, dtype=dtype).requires_grad_(kernel != "decode") for t in (q, k1, k2, v1, v2)]
    kw = dict(scale=D**-0.5, w1=None, w2=7, attention_mask=mask.to(device), workspace=None)
    dout = torch.randn(B, H, Tq, D, generator=g).to(device=device, dtype=dtype)
    results = []
    for impl in ("triton", _torch_path(inputs[0])):
        try:
            with torch.set_grad_enabled(kernel != "decode"):
                out = _run(impl, *inputs, **kw)
                grads = torch.autograd.grad(out, inputs, dout) if kernel != "decode" else ()
        except Exception as e:  # a kernel that fails to compile or launch is reported like a wrong one
            return f"{kernel} kernel ({dtype}, head dim {D}) failed: {type(e).__name__}: {str(e)[:200]}"
        results.append([t.detach().float() for t in (out, *grads)])
    names = ["output", "dq", "dk1", "dk2", "dv1", "dv2"]
    for name, actual, expected in zip(names, *results):
        error = ((actual - expected).abs().max() / expected.abs().max().clamp_min(1.0)).item()
        if not error <= SELF_CHECK_TOLERANCE[dtype]:  # NaN fails too
            return (f"{kernel} kernel ({dtype}, head dim {D}, {device}) disagrees with the torch path: {name} error "
                    f"{error:.3g} > {SELF_CHECK_TOLERANCE[dtype]:.3g}")
    return None


# ---- the custom ops: one autograd mechanism for every implementation ----


@torch.library.custom_op("hf_tensor_attn::attention_forward", mutates_args=())
def _forward_op(
    q: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, v1: torch.Tensor, v2: torch.Tensor, scale: float,
    w1: int | None, w2: int | None, attention_mask: torch.Tensor | None, impl: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, lse, has_pair). Triton: out [B, H, Tq, D] in q's dtype, lse [B*H, Tq] fp32 (base 2), has_pair empty;
    tiled: out [B*H, Tq, D], lse and has_pair [B*H, Tq], in the compute dtype."""
    if impl == "triton":
        from .exact import triton_kernels

        out, lse = triton_kernels.forward(q, k1, k2, v1, v2, scale, w1, w2, attention_mask)
        return out, lse, lse.new_empty(0, dtype=torch.bool)
    return tiled.forward(q, k1, k2, v1, v2, scale, w1, w2, attention_mask, _loops(impl))


def _loops(impl: str):
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"`impl` must be one of {IMPLEMENTATIONS}, got {impl!r}")
    return extension.cpu_ops() if impl == "compiled" else None


@_forward_op.register_fake
def _(q, k1, k2, v1, v2, scale, w1, w2, attention_mask, impl):
    B, H, Tq, D = q.shape
    if impl == "triton":
        return q.new_empty(q.shape), q.new_empty(B * H, Tq, dtype=torch.float32), q.new_empty(0, dtype=torch.bool)
    shape, dtype = tiled.output_spec(q)
    return q.new_empty(shape, dtype=dtype), q.new_empty(shape[:2], dtype=dtype), q.new_empty(shape[:2], dtype=torch.bool)


@torch.library.custom_op("hf_tensor_attn::attention_backward", mutates_args=())
def _backward_op(
    dout: torch.Tensor, q: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, v1: torch.Tensor, v2: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor, has_pair: torch.Tensor, scale: float, w1: int | None, w2: int | None,
    attention_mask: torch.Tensor | None, impl: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of q, k1, k2, v1, v2, each shaped and typed like its input."""
    # The backward may run where autocast is on (a checkpointed layer recomputed inside it): the GEMMs stay fp32.
    with contextlib.ExitStack() as stack:
        if torch.is_autocast_enabled(q.device.type):
            stack.enter_context(torch.autocast(q.device.type, enabled=False))
        if impl == "triton":
            from .exact import triton_kernels

            return triton_kernels.backward(dout, q, k1, k2, v1, v2, out, lse, scale, w1, w2, attention_mask)
        return tiled.backward(dout.to(out.dtype).reshape(out.shape), q, k1, k2, v1, v2, out, lse, has_pair, scale,
                              w1, w2, attention_mask, _loops(impl))


@_backward_op.register_fake
def _(dout, q, k1, k2, v1, v2, out, lse, has_pair, scale, w1, w2, attention_mask, impl):
    return tuple(t.new_empty(t.shape) for t in (q, k1, k2, v1, v2))  # contiguous, like the real gradients


def _save_for_backward(ctx, inputs, output):
    q, k1, k2, v1, v2, scale, w1, w2, attention_mask, impl = inputs
    ctx.save_for_backward(q, k1, k2, v1, v2, *output, attention_mask)
    ctx.meta = (scale, w1, w2)
    ctx.impl = impl


def _gradients(ctx, dout, dlse, dhas_pair):
    q, k1, k2, v1, v2, out, lse, has_pair, attention_mask = ctx.saved_tensors
    grads = _backward_op(dout, q, k1, k2, v1, v2, out, lse, has_pair, *ctx.meta, attention_mask, ctx.impl)
    return (*grads, None, None, None, None, None)


_forward_op.register_autograd(_gradients, setup_context=_save_for_backward)
