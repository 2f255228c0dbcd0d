#!/usr/bin/env bash
# One device run of everything GPU-side, each part under its own time limit so a slow part
# cannot starve the rest; results land in $OUT. Run from the repository root:
#   bash benchmarks/gpu_session.sh
set -u
export PYTHONPATH=$PWD TRITON_INTERPRET=0
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 170 python -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tail -25 | tee $OUT/gpu_tests.log
timeout 50 python benchmarks/bench_scaled_mm.py --tune-budget 30 2>&1 | tail -8
cp $OUT/scaled_mm_h100.json kernels/configs/ 2>/dev/null
timeout 75 python benchmarks/smoke_spec_cuda.py 2>&1 | grep -v Warning | tail -6
timeout 200 python benchmarks/bench_gemm.py 2>&1 | tail -24
timeout ${SPEC_S:-60} python benchmarks/bench_spec.py 2>&1 | tail -14
ls $OUT
