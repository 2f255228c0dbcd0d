#!/usr/bin/env bash
# One device run of everything GPU-side, each part under its own time limit so a slow part
# cannot starve the rest; results land in $OUT. Run from the repository root:
#   bash benchmarks/gpu_session.sh
set -u
export PYTHONPATH=$PWD TRITON_INTERPRET=0
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 150 python -m pytest -q -m gpu tests -p no:cacheprovider -rf 2>&1 | tail -30 > $OUT/gpu_tests.log
tail -12 $OUT/gpu_tests.log
timeout 45 python benchmarks/bench_scaled_mm.py --tune-budget 25 > $OUT/scaled_mm.log 2>&1
tail -5 $OUT/scaled_mm.log; cp $OUT/scaled_mm_h100.json kernels/configs/ 2>/dev/null
timeout 190 python benchmarks/bench_gemm.py > $OUT/bench_gemm.log 2>&1; tail -26 $OUT/bench_gemm.log
timeout 70 python benchmarks/smoke_spec_cuda.py 2>&1 | grep -v -i warn | tail -6
timeout ${SPEC_S:-90} python benchmarks/bench_spec.py --layers ${SPEC_LAYERS:-8} > $OUT/bench_spec.log 2>&1
tail -12 $OUT/bench_spec.log
