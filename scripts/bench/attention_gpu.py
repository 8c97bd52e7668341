"""The CUDA mode of bench_attention (`--cuda`): the Triton kernels on a GPU, in bf16, against that GPU's bf16
`torch.mm` rate measured in the same run.

Rows: forward and forward+backward of `tensor_attention(backend="triton")`, causal and windowed (w1=512, w2=32,
Roy et al. 2025's training setting), at T in {1k, 4k, 16k} with B*H = 32 heads of d = 128 (their shapes); and the
four-cache decode step at context i in {1k, 4k, 16k}, Triton against the torch path on the same GPU. Useful flops
only, as on CPU: 4*d per allowed (query, a, b) pair forward, three times that for forward+backward, 4*d*i^2 per
decode step and head.

Causal attention costs (4/3) T^3 d per head: at T = 16k that is about a minute per forward call on an H100-class
GPU, so causal rows stop at --causal-max-T (4096 unless raised).

`--device cpu` with TRITON_INTERPRET=1 runs the same code on CPU tensors in Triton's interpreter, at the tiny
sizes of `--quick`: the smoke test that shows the GPU command starts and writes its tables.
"""

from __future__ import annotations

from pathlib import Path

import torch

from hf_tensor_attn.ops import four_cache_decode, tensor_attention
from scripts.bench.bench_attention import allowed_pairs_count
from scripts.bench.harness import (
    command_line, describe_load, load_snapshot, machine, markdown_table, measure, publish, read_csv, read_run_record,
    render_document, run_record, write_csv, write_run_record,
)

NAME = "bench_attention_gpu"
MODES = {"causal": (None, None), "window": (512, 32)}
T_VALUES = [1024, 4096, 16384]
DECODE_CONTEXTS = [1024, 4096, 16384]
QUICK = dict(T=[16], decode=[24], heads=2, d=16, mm_sizes=(64,))
FULL = dict(T=T_VALUES, decode=DECODE_CONTEXTS, heads=32, d=128, mm_sizes=(4096, 8192))


def mm_tflops(sizes, dtype, device, timing) -> float:
    """The GPU's practical GEMM peak in this dtype now: the best torch.mm rate over square sizes."""
    rates = []
    for n in sizes:
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        rates.append(2 * n**3 / measure(lambda: torch.mm(a, b), **timing).best / 1e12)
    return max(rates)


def _inputs(heads, T, d, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(1, heads, T, d, generator=g, device=device, dtype=dtype) for _ in range(5)]


def attention_rows(sizes, args, dtype, device, timing) -> list[dict]:
    rows = []
    for mode, (w1, w2) in MODES.items():
        for T in sizes["T"]:
            row = {"what": "attention", "mode": mode, "T": T, "d": sizes["d"], "BH": sizes["heads"], "w1": w1, "w2": w2}
            if mode == "causal" and T > args.causal_max_T:
                rows.append({**row, "skipped": f"causal T > --causal-max-T {args.causal_max_T}"})
                continue
            q, k1, k2, v1, v2 = _inputs(sizes["heads"], T, sizes["d"], dtype, device)
            dout = torch.randn_like(q)
            scale = sizes["d"] ** -0.5

            def forward():
                with torch.no_grad():
                    tensor_attention(q, k1, k2, v1, v2, scale=scale, w1=w1, w2=w2, backend="triton")

            def forward_backward():
                leaves = [t.detach().requires_grad_(True) for t in (q, k1, k2, v1, v2)]
                out = tensor_attention(*leaves, scale=scale, w1=w1, w2=w2, backend="triton")
                torch.autograd.grad(out, leaves, dout)

            row["mm_tflops"] = mm_tflops(sizes["mm_sizes"], dtype, device, timing)
            flops = 4 * sizes["d"] * allowed_pairs_count(T, w1, w2) * sizes["heads"]
            for what, call, factor in (("fwd", forward, 1), ("fwdbwd", forward_backward, 3)):
                call()  # compiles the kernels for this shape outside the timing
                row[f"{what}_s"] = measure(call, **timing).best
                row[f"{what}_tflops"] = factor * flops / row[f"{what}_s"] / 1e12
                row[f"{what}_of_mm"] = row[f"{what}_tflops"] / row["mm_tflops"]
            rows.append(row)
            print(row, flush=True)
    return rows


def decode_rows(sizes, dtype, device, timing) -> list[dict]:
    rows = []
    for i in sizes["decode"]:
        q, k1, k2, v1, v2 = _inputs(sizes["heads"], i, sizes["d"], dtype, device)
        q = q[:, :, -1:]
        scale = sizes["d"] ** -0.5
        row = {"what": "decode", "i": i, "d": sizes["d"], "BH": sizes["heads"],
               "mm_tflops": mm_tflops(sizes["mm_sizes"], dtype, device, timing)}
        flops = 4 * sizes["d"] * i * i * sizes["heads"]
        for backend in ("triton", "torch"):
            def step(backend=backend):
                with torch.no_grad():
                    four_cache_decode(q, k1, k2, v1, v2, scale=scale, backend=backend)

            step()
            row[f"{backend}_s"] = measure(step, **timing).best
            row[f"{backend}_tflops"] = flops / row[f"{backend}_s"] / 1e12
            row[f"{backend}_of_mm"] = row[f"{backend}_tflops"] / row["mm_tflops"]
        rows.append(row)
        print(row, flush=True)
    return rows


def _cell(row, key, spec, scale=1.0):
    """A measured value, or "-" where the row has none (None when measured, "" when read back from the CSV)."""
    return format(row[key] * scale, spec) if row.get(key) not in (None, "") else "-"


TITLE = "Tensor attention on the GPU: Triton kernels against bf16 torch.mm"


def render(folder: Path) -> str:
    """tables.md from the CSV and the run record alone (the publishing convention in harness.py)."""
    record = read_run_record(folder)
    rows = read_csv(Path(folder) / f"{NAME}.csv")
    attention = [[r["mode"], r["T"], r.get("skipped") or _cell(r, "mm_tflops", ".0f"), _cell(r, "fwd_s", ".2f", 1e3),
                  _cell(r, "fwd_tflops", ".1f"), _cell(r, "fwd_of_mm", ".0%"), _cell(r, "fwdbwd_s", ".2f", 1e3),
                  _cell(r, "fwdbwd_tflops", ".1f"), _cell(r, "fwdbwd_of_mm", ".0%")]
                 for r in rows if r["what"] == "attention"]
    decode = [[r["i"], _cell(r, "mm_tflops", ".0f"), _cell(r, "triton_s", ".3f", 1e3), _cell(r, "triton_tflops", ".1f"),
               _cell(r, "triton_of_mm", ".0%"), _cell(r, "torch_s", ".3f", 1e3), _cell(r, "torch_tflops", ".1f"),
               _cell(r, "torch_of_mm", ".0%")] for r in rows if r["what"] == "decode"]
    d, heads = record["d"], record["heads"]
    return render_document(record, [
        (f"Forward and forward+backward, bf16, d={d}, B*H={heads}, windowed: w1=512, w2=32",
         markdown_table(["mode", "T", "bf16 torch.mm TFLOP/s", "fwd ms", "fwd TFLOP/s", "fwd of mm", "fwd+bwd ms",
                         "fwd+bwd TFLOP/s", "fwd+bwd of mm"], attention, "llrrrrrrr")),
        (f"Four-cache decode step, bf16, d={d}, B*H={heads}, no window",
         markdown_table(["context i", "bf16 torch.mm TFLOP/s", "Triton ms", "Triton TFLOP/s", "Triton of mm",
                         "torch ms", "torch TFLOP/s", "torch of mm"], decode, "rrrrrrrr"))])


def main(args, argv) -> list[dict]:
    if args.from_csv:  # measure nothing (and need no GPU): rebuild tables.md from the folder's files
        print(publish(args.out, render))
        return read_csv(args.out / f"{NAME}.csv")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--cuda: no CUDA device here (for a smoke run on CPU: TRITON_INTERPRET=1 ... --device cpu)")
    sizes = QUICK if args.quick else FULL
    dtype = torch.bfloat16
    timing = dict(repeats=1, min_run_time=0.01) if args.quick else dict(repeats=3, min_run_time=0.5)
    load_before = load_snapshot()
    rows = attention_rows(sizes, args, dtype, device, timing) + decode_rows(sizes, dtype, device, timing)
    load_after = load_snapshot()
    record = machine()
    record["gpu"] = torch.cuda.get_device_name(device) if device.type == "cuda" else f"none ({device}, interpreter)"
    write_csv(args.out / f"{NAME}.csv", rows, record)
    record_ = run_record("scripts.bench.attention_gpu", argv, TITLE, record,
                         describe_load(load_before, load_after) + f"; GPU: {record['gpu']}", d=sizes["d"],
                         heads=sizes["heads"])
    record_["command"] = command_line("scripts.bench.bench_attention", argv)  # how it is started
    write_run_record(args.out, record_)
    text = publish(args.out, render)
    print(text)
    print(f"wrote {args.out}/{NAME}.csv, tables.md")
    return rows
