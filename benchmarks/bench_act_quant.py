"""Per-token activation quantization at decode: hsd::quantize_per_token and hsd::rmsnorm_quant
(kernels/act_quant.py, kernels/rmsnorm_quant.py) with the row read once into registers (the
default up to ONE_PASS_MAX) vs walked in chunks (forced with a block cap, PATHS["chunked"]).

    python benchmarks/bench_act_quant.py      (needs a CUDA GPU; writes $OUT/act_quant.json, default ./out)

Checks both paths against the torch references first, then times each as a stream of calls
over distinct inputs in one CUDA graph (hsd.kernels.timing.bench_stream_us).
"""
import datetime
import itertools
import json
import os
import pathlib
import sys

import torch
import triton

from hsd.kernels.act_quant import (ONE_PASS_MAX, dequantize, quantize_per_token_reference, quantize_per_token_triton,
                                  row_outputs)
from hsd.kernels.rmsnorm_quant import rmsnorm_quant_reference, rmsnorm_quant_triton
from hsd.kernels.timing import bench_stream_us, stream_copies

MS = (1, 16, 64)
KS = (4096, 14336)  # Llama-3-8B hidden and intermediate sizes
PATHS = {"one_pass": ONE_PASS_MAX, "chunked": 1024}  # the launcher's block cap
KIND = "int8"
DTYPE = torch.float16
EPS = 1e-5


def inputs(m, k):
    x = torch.randn(m, k, device="cuda", dtype=DTYPE) * 3
    return x, (torch.rand(k, device="cuda") + 0.5).to(DTYPE)


def calls(op, block, xs):
    if op == "quantize_per_token":
        return [lambda x=x: quantize_per_token_triton(x, KIND, block=block) for x, _ in xs]
    return [lambda x=x, w=w: rmsnorm_quant_triton(x, w, EPS, KIND, block=block) for x, w in xs]


def check():
    """Per path and kind: quantize_per_token must equal its reference; rmsnorm_quant may move
    a few elements one step (torch's CUDA rsqrt is approximate; see test_rmsnorm_quant.py)."""
    res = {}
    for (path, block), kind, k in itertools.product(PATHS.items(), ("int8", "fp8"), KS):
        x, w = inputs(16, k)
        q, s = quantize_per_token_triton(x, kind, block=block)
        q_ref, s_ref = quantize_per_token_reference(x, kind)
        exact = torch.equal(s, s_ref) and torch.equal(q.float(), q_ref.float())
        q, s = rmsnorm_quant_triton(x, w, EPS, kind, block=block)
        q_ref, s_ref = rmsnorm_quant_reference(x, w, EPS, kind)
        off = (dequantize(q, s) != dequantize(q_ref, s_ref)).float().mean().item()
        res[f"{path},{kind},K={k}"] = dict(quantize_exact=exact, rmsnorm_fraction_off=off)
        print(f"check {path:8} {kind:4} K={k:<5} quantize exact {exact}  rmsnorm off {off:.2e}", flush=True)
        assert exact and off < 0.01, res
    return res


def main():
    if not torch.cuda.is_available():
        sys.exit("bench_act_quant.py needs a CUDA GPU")
    out = pathlib.Path(os.environ.get("OUT", "out"))
    out.mkdir(parents=True, exist_ok=True)
    report = dict(benchmark="act_quant", gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                  triton=triton.__version__, date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
                  kind=KIND, dtype=str(DTYPE), paths=PATHS, timing="stream (bench_stream_us)", checks=check(), rows=[])
    for op in ("quantize_per_token", "rmsnorm_quant"):
        for m in MS:
            for k in KS:
                xs = [inputs(m, k) for _ in range(stream_copies(2 * (m + 1) * k))]
                row = dict(op=op, M=m, K=k)
                for path, block in PATHS.items():
                    row[path] = bench_stream_us(calls(op, block, xs))
                    row[path + "_launch"] = row_outputs(xs[0][0], KIND, block)[3]
                report["rows"].append(row)
                print(f"{op} M={m} K={k}: one pass {row['one_pass']:.2f} us, chunked {row['chunked']:.2f} us",
                      flush=True)
                del xs
    (out / "act_quant.json").write_text(json.dumps(report, indent=1))
    print(f"\n{'op':<20}{'M':>4}{'K':>7}{'one pass us':>13}{'chunked us':>12}{'speedup':>9}")
    for r in report["rows"]:
        print(f"{r['op']:<20}{r['M']:>4}{r['K']:>7}{r['one_pass']:>13.2f}{r['chunked']:>12.2f}"
              f"{r['chunked'] / r['one_pass']:>8.2f}x")


if __name__ == "__main__":
    main()
