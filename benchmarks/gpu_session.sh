#!/usr/bin/env bash
# One device run of everything GPU-side, each part under its own time limit so a slow part
# cannot starve the rest. Run from the repository root: bash benchmarks/gpu_session.sh
# $OUT gets session.log (all output) and each benchmark's JSON / PNG (8 files at most).
set -u
# only hsd on the path: a top-level "kernels" folder would pass for the PyPI package of that
# name, which transformers probes for (hsd finds kernels/, passes/, lowering/ by itself)
mkdir -p /tmp/hsd_path && ln -sfn $PWD/hsd /tmp/hsd_path/hsd
export PYTHONPATH=/tmp/hsd_path TRITON_INTERPRET=0
exec > >(tee $OUT/session.log) 2>&1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 150 python -m pytest -q -m gpu tests -p no:cacheprovider -rf 2>&1 | tail -30
timeout 45 python benchmarks/bench_scaled_mm.py --tune-budget 25 2>&1 | tail -12
cp $OUT/scaled_mm_h100.json kernels/configs/ 2>/dev/null
timeout 190 python benchmarks/bench_gemm.py 2>&1 | grep -v -i warn | tail -30
timeout 70 python benchmarks/smoke_spec_cuda.py 2>&1 | grep -v -i warn | tail -6
timeout ${SPEC_S:-90} python benchmarks/bench_spec.py --layers ${SPEC_LAYERS:-8} 2>&1 | grep -v -i warn | tail -14
