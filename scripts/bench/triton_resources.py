"""What the Triton kernels ask of a GPU (registers, spills, shared memory), found on a machine without one.

Triton compiles for a CUDA target without a GPU: its wheel ships ptxas and cuobjdump. This script builds the
package's own launches (`triton_kernels.forward_launches`, `backward_launches`, `decode_launches`) on CPU tensors
of the GPU benchmark's shapes (B*H = 32 as B=4, H=8; T=1024; windows 512 x 32; a padding mask), compiles each for
sm_80 (A100) and sm_90 (H100, H200) as a launch on that GPU would be compiled (Triton's own specialisation of the
arguments), and reads from the binary the registers per thread, the stack frame (bytes per thread: spilled
registers) and the shared memory per program.

A kernel that spills keeps part of its tiles in local memory (device memory behind the caches) inside its inner
loop; one that asks for more shared memory than the GPU offers does not launch. What a launch needs depends on the
triton release too (its compiler lays tiles out differently), so a full run is made with each release of `RELEASES`,
each in its own environment. `TILES` in hf_tensor_attn/ops/exact/triton_kernels.py holds, per kernel, dtype and head-dim
bucket, the first choice in `CANDIDATES` x `SETTINGS` that compiles without spills and within 99 KiB of shared
memory (the least any CUDA GPU since sm_80 offers one program) for both targets in every published run. `--candidates` compiles every choice, so
the tables that show why each entry was picked are this script's output too. The launches are compiled for one
shape (the one above): other sequence lengths, head dims inside a bucket or grouped heads specialise a few
arguments differently. Nothing here measures speed: `bench_attention --cuda` does, on a GPU.

Writes triton_resources.csv, run.json and tables.md (= `render(out)`, the publishing convention of
scripts/bench/harness.py) to --out (default docs/triton_resources/triton-<installed release>/ for a full run,
runs/bench/triton_resources/triton-<release>/ for --quick):

    python -m scripts.bench.triton_resources --candidates     # full run, with the installed triton
    python -m scripts.bench.triton_resources --quick          # sm_90, bf16, d=128, the package's launches only
    python -m scripts.bench.triton_resources --from-csv --out docs/triton_resources/triton-3.7.1   # rebuild tables.md
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import functools
import itertools
import multiprocessing
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `scripts.bench` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

from scripts.bench.harness import (
    describe_load, load_snapshot, machine, markdown_table, output_dir, publish, read_csv, read_run_record,
    render_document, run_record, write_csv, write_run_record,
)

NAME = "triton_resources"
MODULE = "scripts.bench.triton_resources"
TITLE = "Triton kernels: registers, spills and shared memory per program, compiled for sm_80 and sm_90"
ARCHS = (80, 90)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
HEAD_DIMS = (64, 128)
# The least shared memory a program may use on a CUDA GPU since sm_80 (sm_86/sm_89: 99 KiB; A100 163, H100 227).
SHARED_LIMIT = 99 * 1024
# (rows, cols) in order of preference. rows: queries per program (forward, dq), queries
# per step (col), row keys per program (decode); cols: column keys per tile (forward, dq, decode), per program (col).
# The first is the tile of Roy et al.'s Triton kernel (64 queries x 32 keys); the decode kernel's is 64 x 64.
CANDIDATES = {
    "forward": [(64, 32), (32, 32), (32, 16), (16, 16)],
    "dq": [(64, 32), (32, 32), (32, 16), (16, 16)],
    "col": [(32, 64), (32, 32), (16, 32), (16, 16)],
    "decode": [(64, 64), (64, 32), (32, 32), (16, 16)],
}
# (warps, pipeline stages) for each (rows, cols), in order of preference: Triton's default 3 stages first.
SETTINGS = ((4, 3), (8, 3), (4, 2), (8, 2))
SHAPE = dict(B=4, H=8, T=1024, w1=512, w2=32)
# The triton releases TILES is chosen for, one published run each (docs/triton_resources/triton-<release>/): a GPU
# user has the one their torch requires (torch 2.11: 3.6.0, 2.13: 3.7.1, 2.14: 3.8). .ci/run tests two of them in
# full (ops.backend.TRITON_OLDEST_TESTED and TRITON_NEWEST_TESTED: the interpreter tests and these compiles); 3.8.0
# and 3.9.0 are only compiled, here, so that a newer torch's triton gets launches without spills too.
RELEASES = ("3.6.0", "3.7.1", "3.8.0", "3.9.0")


@functools.cache  # a worker compiles many candidates of the same launches; measure_one copies before changing one
def launches(dtype: torch.dtype, D: int) -> dict:
    """The package's launches of each kernel (one per name) for `dtype` and head dim D, as on a CUDA device."""
    from hf_tensor_attn.ops.exact import triton_kernels as tk

    B, H, T = SHAPE["B"], SHAPE["H"], SHAPE["T"]
    q, k1, k2, v1, v2 = (torch.zeros(B, H, T, D, dtype=dtype) for _ in range(5))
    mask = torch.ones(B, T, dtype=torch.bool)
    windows = dict(w1=SHAPE["w1"], w2=SHAPE["w2"], attention_mask=mask, interpreted=False)
    found = {}
    forward, (out, lse) = tk.forward_launches(q, k1, k2, v1, v2, 0.1, **windows)
    backward, _ = tk.backward_launches(torch.zeros_like(out), q, k1, k2, v1, v2, out, lse, 0.1, **windows)
    decode, _ = tk.decode_launches(q[:, :, -1:], k1, k2, v1, v2, 0.1, **windows)
    for launch in forward + backward + decode:
        found.setdefault(launch.name, launch)  # the two column launches differ only in which stream is which
    return found


def compile_for(launch, arch: int):
    """The launch compiled for sm_<arch> the way Triton compiles it when launched on such a GPU.
    Uses Triton internals (binder and argument packing of triton.runtime.jit, as in triton 3.6 to 3.9); a change
    there fails tests/ops/test_triton_compile.py, which .ci/run runs with both tested releases."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    fn = launch.kernel
    kwargs = dict(launch.constants, debug=False, instrumentation_mode=knobs.compilation.instrumentation_mode)
    if hasattr(knobs.compilation, "fpsan_homomorphic_casts"):  # an option since triton 3.7 (JITFunction.run sets it)
        kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)


def resources(kernel) -> dict:
    """Registers per thread, stack frame per thread (bytes) and shared memory per program (bytes) of a compiled
    kernel, the first two as cuobjdump reads them from its binary."""
    from triton import knobs

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(kernel.asm["cubin"])
        dump = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", str(path)], check=True,
                              capture_output=True, text=True).stdout
    fields = dict(item.split(":", 1) for item in dump.strip().splitlines()[-1].split() if ":" in item)
    return {"registers": int(fields["REG"]), "stack_bytes": int(fields["STACK"]),
            "shared_bytes": int(kernel.metadata.shared)}


def fits(row: dict, limit: int = SHARED_LIMIT) -> bool:
    """Compiled, no spills, shared memory within `limit`."""
    return not row["error"] and row["stack_bytes"] == 0 and row["shared_bytes"] <= limit


def measure_one(job: tuple) -> dict:
    """One compile: (kernel name, dtype name, D, arch, tiles or None for the package's own)."""
    name, dtype, D, arch, tiles = job
    warnings.filterwarnings("ignore", module="triton")
    launch = launches(DTYPES[dtype], D)[name]
    launch = dataclasses.replace(launch, constants=dict(launch.constants))
    rows_key = "BLOCK_A" if name == "decode" else "BLOCK_Q"
    keys = (rows_key, "BLOCK_B", "num_warps", "num_stages")
    chosen = tuple(launch.constants[key] for key in keys)
    if tiles is not None:
        launch.constants.update(zip(keys, tiles))
    rows, cols, warps, stages = tiles or chosen
    row = {"kernel": name, "dtype": dtype, "head_dim": D, "arch": f"sm_{arch}", "rows": rows, "cols": cols,
           "warps": warps, "stages": stages, "package": int(tiles is None)}
    try:
        return {**row, **resources(compile_for(launch, arch)), "error": ""}
    except Exception as error:  # e.g. a tile Triton cannot lay out: recorded as not fitting, the run goes on
        return {**row, "registers": -1, "stack_bytes": -1, "shared_bytes": -1,
                "error": f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"}


def jobs(archs, dtypes, head_dims, candidates: bool) -> list[tuple]:
    own = [(name, dt, D, arch, None) for name, dt, D, arch in itertools.product(CANDIDATES, dtypes, head_dims, archs)]
    if not candidates:
        return own
    return own + [(name, dt, D, arch, (r, c, w, st)) for name in CANDIDATES for dt in dtypes
                  for D, arch, (r, c), (w, st) in itertools.product(head_dims, archs, CANDIDATES[name], SETTINGS)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), choices=[80, 86, 89, 90])
    parser.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--head-dim", type=int, nargs="+", default=list(HEAD_DIMS))
    parser.add_argument("--candidates", action="store_true", help="also compile every choice in CANDIDATES")
    parser.add_argument("--quick", action="store_true", help="sm_90, bf16, d=128, the package's launches only")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiles at once (processes)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--from-csv", action="store_true", help="compile nothing: rebuild tables.md from --out's files")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    if any(D < 1 or D > 128 for D in args.head_dim):
        parser.error(f"--head-dim must be between 1 and 128 (the head dims TILES covers), got {args.head_dim}")
    if args.quick:
        args.arch, args.dtype, args.head_dim, args.candidates = [90], ["bf16"], [128], False
    full = args.from_csv or (args.candidates and sorted(args.arch) == list(ARCHS) and sorted(args.dtype) ==
                             sorted(DTYPES) and sorted(args.head_dim) == list(HEAD_DIMS))
    if args.from_csv and args.out is None:
        parser.error("--from-csv needs --out: the folder of one run, e.g. docs/triton_resources/triton-3.7.1")
    from hf_tensor_attn.ops.backend import triton_version

    out = output_dir(parser, args.out, f"{NAME}/triton-{triton_version()}", full)
    if args.from_csv:
        print(publish(out, render))
        return

    start = load_snapshot()
    todo = jobs(args.arch, args.dtype, args.head_dim, args.candidates)
    print(f"compiling {len(todo)} kernels for {', '.join(f'sm_{a}' for a in args.arch)} on {args.jobs} processes")
    # spawn, not fork: a forked child of a process that has run torch's OpenMP threads may hang in them
    with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        rows = list(pool.map(measure_one, todo))
    from triton import knobs

    release = str(triton_version())  # the release the output folder is named after
    tools = f"triton {release}, ptxas {knobs.nvidia.ptxas.version}"
    machine_record = machine()
    write_csv(out / f"{NAME}.csv", rows, machine_record)
    write_run_record(out, run_record(MODULE, argv, TITLE, machine_record, describe_load(start, load_snapshot()),
                                     tools=tools, triton=release, shape=SHAPE, shared_limit=SHARED_LIMIT))
    print(publish(out, render))


def _sort_key(row: dict):
    return (list(CANDIDATES).index(row["kernel"]), list(DTYPES).index(row["dtype"]), row["head_dim"], row["arch"])


def render(folder: Path) -> str:
    """tables.md from run.json and triton_resources.csv alone."""
    record = read_run_record(folder)
    rows = read_csv(folder / f"{NAME}.csv")
    limit = record["shared_limit"]
    shape = record["shape"]
    own = sorted((r for r in rows if r["package"]), key=_sort_key)
    ok = lambda r: "yes" if fits(r, limit) else ("**compile error**" if r["error"] else "**no**")  # noqa: E731
    intro = [
        f"Compiled with {record['tools']} on this CPU (no GPU): the package's launches for B={shape['B']}, "
        f"H={shape['H']}, T={shape['T']}, windows {shape['w1']} x {shape['w2']}, with a padding mask. "
        "Registers and stack frame are per thread, shared memory per program; a stack frame above 0 is spilled "
        f"registers. Fits: no spills and at most {limit // 1024} KiB of shared memory.",
    ]
    header = ["kernel", "dtype", "d", "target", "rows x cols", "warps", "stages", "registers", "stack (B)",
              "shared (KiB)", "fits"]
    table = [[r["kernel"], r["dtype"], r["head_dim"], r["arch"], f"{r['rows']} x {r['cols']}", r["warps"],
              r["stages"], r["registers"], r["stack_bytes"], f"{r['shared_bytes'] / 1024:.0f}", ok(r)] for r in own]
    sections = [("The package's launches (TILES)", intro + [""] + markdown_table(header, table, "llrlrrrrrrl"))]
    tried = [r for r in rows if not r["package"]]
    if tried:
        lines = ["Each choice of `CANDIDATES` x `SETTINGS` compiled the same way, in order of preference. Cells: "
                 "registers / stack bytes / shared KiB per target (-1: the compile failed). The first that fits on "
                 "every target with this triton is marked; TILES holds the first that fits with every triton "
                 "release of RELEASES (the package column says what TILES holds)."]
        keys = sorted({(r["kernel"], r["dtype"], r["head_dim"]) for r in tried},
                      key=lambda k: (list(CANDIDATES).index(k[0]), k[1], k[2]))
        archs = sorted({r["arch"] for r in tried})
        body = []
        for kernel, dtype, D in keys:
            mine = [r for r in tried if (r["kernel"], r["dtype"], r["head_dim"]) == (kernel, dtype, D)]
            package = {(r["rows"], r["cols"], r["warps"], r["stages"]) for r in own
                       if (r["kernel"], r["dtype"], r["head_dim"]) == (kernel, dtype, D)}
            first = True
            for tiles in dict.fromkeys((r["rows"], r["cols"], r["warps"], r["stages"]) for r in mine):
                cells = {r["arch"]: r for r in mine if (r["rows"], r["cols"], r["warps"], r["stages"]) == tiles}
                fit = all(a in cells and fits(cells[a], limit) for a in archs)
                mark = "**first fit**" if fit and first else ("yes" if fit else "no")
                first = first and not fit
                body.append([kernel, dtype, D, f"{tiles[0]} x {tiles[1]}", tiles[2], tiles[3], *(
                    f"{cells[a]['registers']} / {cells[a]['stack_bytes']} / {cells[a]['shared_bytes'] / 1024:.0f}"
                    if a in cells else "-" for a in archs), mark, "yes" if tiles in package else ""])
        header = ["kernel", "dtype", "d", "rows x cols", "warps", "stages", *archs, "fits", "package"]
        sections.append(("The choices TILES was picked from", lines + [""] + markdown_table(header, body, "llrlrr")))
    return render_document(record, sections)


if __name__ == "__main__":
    main()
