#!/usr/bin/env bash
# The GPU checks as one command, for a machine with a CUDA GPU and the torch and triton it came with:
#   1. the Triton kernels' test cases (tests/ops/triton_cases.py), compiled on the GPU instead of interpreted,
#      against naive_tensor_attention (tests/ops/test_triton.py with TRITON_CASES_DEVICE=cuda);
#   2. the GPU benchmark, `bench_attention --cuda`, into $OUT/bench_attention_gpu/ (copy that folder to
#      docs/bench_attention_gpu/ to publish it).
# Both run even if the first fails; the exit status says whether both passed. Logs go to $OUT (default
# runs/gpu_check). The package is used from this checkout (PYTHONPATH), not installed. Wheels in .whl/ are
# installed into /tmp/site first: for a machine without network whose image lacks a package, e.g. transformers
# (hf_tensor_attn needs >= 5.23): `pip download --no-deps -d .whl transformers==5.24.0` beforehand.
#
#   bash scripts/bench/gpu_check.sh            # on the GPU machine
#   bash scripts/bench/gpu_check.sh --smoke    # anywhere: the same steps on CPU in Triton's interpreter, tiny sizes
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
python=${PYTHON:-python3}

if compgen -G ".whl/*.whl" >/dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

if [[ "${1:-}" == "--smoke" ]]; then
    device=cpu bench=(--device cpu --quick)
    export TRITON_INTERPRET=1
else
    device=cuda bench=()
fi

"$python" - <<'EOF' 2>&1 | tee "$OUT/versions.txt"
import importlib.metadata as m, platform, torch
print("Python", platform.python_version(), *(f"{p} {m.version(p)}" for p in ("torch", "triton", "transformers")))
print("GPU:", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
EOF

status=0
TRITON_CASES_DEVICE=$device "$python" -m pytest -p no:cacheprovider -rs tests/ops/test_triton.py 2>&1 \
    | tee "$OUT/test_triton.log" || status=1
"$python" -m scripts.bench.bench_attention --cuda "${bench[@]}" --out "$OUT/bench_attention_gpu" 2>&1 \
    | tee "$OUT/bench_attention_gpu.log" || status=1
echo "gpu_check: $([[ $status == 0 ]] && echo passed || echo FAILED), logs and tables in $OUT"
exit $status
