#!/usr/bin/env bash
# Device runs of everything GPU-side, each part under its own time limit so a slow part cannot
# starve the rest. From the repository root:
#     bash benchmarks/gpu_session.sh [part ...]     parts: tests tune-w4a16 tune-w4a8 gemm scaled attention smoke spec decode
# (default: tests scaled gemm smoke spec; TESTS="tests/x.py ..." narrows the GPU tests). $OUT gets session.log (all output) and each
# benchmark's JSON / PNG (8 files at most come back).
set -u
# only hsd on the path: a top-level "kernels" folder would pass for the PyPI package of that
# name, which transformers probes for (hsd finds kernels/, passes/, lowering/ by itself)
mkdir -p /tmp/hsd_path && ln -sfn $PWD/hsd /tmp/hsd_path/hsd
export PYTHONPATH=/tmp/hsd_path TRITON_INTERPRET=0
exec > >(tee $OUT/session.log) 2>&1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
for part in ${@:-tests scaled gemm smoke spec}; do
  echo "=== $part $(date -u +%T)"
  case $part in
    tests) timeout ${TESTS_S:-400} python -m pytest -q -m gpu ${TESTS:-tests} -p no:cacheprovider -rf 2>&1 | tail -30 ;;
    tune-w4a16|tune-w4a8)  # the table for the 8B and 70B layers (stream timing), merged into the shipped one
      kernel=${part#tune-}
      cp kernels/configs/${kernel}_h100.json $OUT/
      shapes=$(cd benchmarks && python -c "import bench_gemm; print(*(f'{n},{k}' for l in bench_gemm.LAYERS.values() for n, k in l))")
      timeout ${TUNE_S:-330} python -m hsd tune --kernels $kernel --shapes $shapes --out $OUT 2>&1 \
        | grep -v -i "warn\|skip" | tail -70
      cp $OUT/${kernel}_h100.json kernels/configs/ ;;
    scaled)
      cp kernels/configs/scaled_mm_h100.json $OUT/
      timeout ${SCALED_S:-45} python benchmarks/bench_scaled_mm.py --tune-budget ${SCALED_TUNE_S:-25} 2>&1 | tail -12
      cp $OUT/scaled_mm_h100.json kernels/configs/ 2>/dev/null ;;
    gemm) timeout ${GEMM_S:-240} python benchmarks/bench_gemm.py 2>&1 | grep -v -i warn | tail -45 ;;
    attention)  # plans swept first (stream timing), then the benchmark with the fastest
      timeout ${SWEEP_S:-150} python benchmarks/sweep_kernels.py --skip-w4a16 2>&1 | grep -v -i warn | tail -6
      plans=$( [ -f $OUT/attention_plans.json ] && echo "--plans $OUT/attention_plans.json" )
      timeout ${ATTN_S:-200} python benchmarks/bench_attention.py $plans 2>&1 | grep -v -i warn | tail -40 ;;
    smoke) timeout ${SMOKE_S:-70} python benchmarks/smoke_spec_cuda.py 2>&1 | grep -v -i warn | tail -6 ;;
    spec) timeout ${SPEC_S:-90} python benchmarks/bench_spec.py --layers ${SPEC_LAYERS:-8} 2>&1 | grep -v -i warn | tail -14 ;;
    decode) timeout ${DECODE_S:-400} python benchmarks/bench_decode.py --quant ${DECODE_QUANT:-none w4a16} 2>&1 \
              | grep -v -i warn | tail -12 ;;
    *) echo "unknown part $part" ;;
  esac
done
