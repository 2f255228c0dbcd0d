"""W8A8 / FP8 linears (activation quant + scaled GEMM) on the four linears of a Llama-3-8B layer.

    python benchmarks/bench_scaled_mm.py [--tune-budget SECONDS] [--ms 1 16 64]   (CUDA GPU)

Checks every default config against the reference, times the whole linear (``bench_linear``)
and the GEMM alone, and torch's ``_int_mm`` / ``_scaled_mm`` as anchors; with a tune budget, then
tunes the config table (int8 operands; fp8 shares it), writes it to $OUT and times again. Summed
medians of CUDA-graph replays with the L2 cleared (hsd.kernels.timing). JSON to $OUT (./out).
"""
import argparse
import json
import os
import pathlib
import time

import torch

from hsd.kernels import scaled_mm
from hsd.kernels.timing import bench_us

SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]  # qkv, o, gate_up, down
KINDS = ("int8", "fp8")
HBM_TBS = 3.02


def rel_err(m, n, k, kind, dtype=torch.float16):
    xq, xs, wq, ws = scaled_mm._bench_inputs(m, n, k, kind, dtype)
    ref = scaled_mm.scaled_mm_reference(xq, xs, wq, ws.float(), None)
    y = scaled_mm.scaled_mm_triton(xq, xs, wq, ws, None)
    return ((y.float() - ref).norm() / ref.norm()).item()


def time_all(ms, label):
    rows = []
    for kind in KINDS:
        for m in ms:
            full = [bench_us(scaled_mm.bench_linear(m, n, k, kind)) for n, k in SHAPES]
            gemm = [bench_us(lambda g=scaled_mm._bench_inputs(m, n, k, kind): scaled_mm.scaled_mm_triton(*g, None))
                    for n, k in SHAPES]
            rows.append(dict(table=label, kind=kind, M=m, linear_us=full, gemm_us=gemm,
                             linear_sum=sum(full), gemm_sum=sum(gemm),
                             configs=[scaled_mm.get_config(m, n, k, torch.device("cuda")) for n, k in SHAPES]))
            print(f"{label:8} {kind:5} M={m:<3} linear {sum(full):6.1f} us  gemm {sum(gemm):6.1f} us  "
                  f"per shape {[round(t, 1) for t in full]}", flush=True)
    return rows


def anchors(ms):
    rows = []
    for kind in KINDS:
        for m in ms:
            try:
                us = sum(bench_us(scaled_mm.bench_anchor(m, n, k, kind)) for n, k in SHAPES)
            except Exception as e:  # noqa: BLE001  (an anchor this torch lacks is not fatal)
                us = f"{type(e).__name__}: {str(e)[:200]}"
            rows.append(dict(kind=kind, M=m, torch_us=us))
            print(f"anchor   {kind:5} M={m:<3} torch {'_int_mm (M>=32)' if kind == 'int8' else '_scaled_mm'}: {us}", flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--tune-budget", type=float, default=0.0)
    args = ap.parse_args()
    out = pathlib.Path(os.environ.get("OUT", "out"))
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    floor = sum(n * k for n, k in SHAPES) / HBM_TBS / 1e6
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, floor_us=floor)
    result["errors"] = {f"{kind},M={m},{n}x{k}": rel_err(m, n, k, kind)
                        for kind in KINDS for m in args.ms for n, k in SHAPES[::3]}
    print("rel err vs reference:", {key: f"{v:.1e}" for key, v in result["errors"].items()}, flush=True)
    result["default"] = time_all(args.ms, "default")
    result["anchors"] = anchors(args.ms)
    (out / "scaled_mm_bench.json").write_text(json.dumps(result, indent=1))
    if args.tune_budget > 0:
        path = scaled_mm.tune(SHAPES, m_buckets=args.ms, path=out / "scaled_mm_h100.json",
                              budget_s=args.tune_budget)
        print("table:", path, flush=True)
        result["tuned"] = time_all(args.ms, "tuned")
    (out / "scaled_mm_bench.json").write_text(json.dumps(result, indent=1))
    print(f"floor {floor:.1f} us; total {time.perf_counter() - start:.0f} s")
    for row in result["default"] + result.get("tuned", []):
        print(f"{row['table']:8} {row['kind']:5} M={row['M']:<3} linear {row['linear_sum']:6.1f} us  "
              f"gemm {row['gemm_sum']:6.1f} us")


if __name__ == "__main__":
    main()
