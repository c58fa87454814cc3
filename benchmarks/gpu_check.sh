#!/usr/bin/env bash
# The one short device check for a session lent a GPU (`device` tool), about 3 minutes:
#   run(command="bash benchmarks/gpu_check.sh", timeout_s=420)
# The device image has torch, pyarrow, pytest and hypothesis but no FAISS and no network: the CUDA
# tests and the GPU benchmark below need neither. Results land in $OUT (or ./gpu-results).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-results}"
mkdir -p "$out"
# src/ is the library, benchmarks/ holds the m2m_bench package (moved there from src/m2m/bench)
export PYTHONPATH="$PWD/src:$PWD/benchmarks:$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 - <<'PY' | tee "$out/imports.txt"
import importlib
for name in ("torch", "numpy", "pyarrow", "crc32c", "tqdm", "fsspec", "click", "m2m", "m2m_bench.gpu"):
    try:
        importlib.import_module(name)
        print(f"import {name}: ok")
    except Exception as exc:  # noqa: BLE001 - reported, the checks below then fail and say so
        print(f"import {name}: MISSING ({type(exc).__name__}: {exc})")
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -m pytest -q -p no:cacheprovider -m cuda tests/stream/test_stream_cuda.py tests/augment/test_augment_cuda.py \
  2>&1 | tee "$out/cuda-tests.txt"
tests_rc=${PIPESTATUS[0]}
timeout 300 python3 -m m2m_bench.gpu --json > "$out/gpu-bench.json" 2> "$out/gpu-bench.err"
bench_rc=$?
python3 -c "import json,sys; from m2m_bench.gpu import format_table; print(format_table(json.load(open(sys.argv[1]))))" \
  "$out/gpu-bench.json" | tee "$out/gpu-bench.txt"
echo "cuda tests rc=$tests_rc, gpu bench rc=$bench_rc"
exit $(( tests_rc || bench_rc ))
