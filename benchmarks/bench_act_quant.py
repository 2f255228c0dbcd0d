"""Per-token activation quantization at decode: hsd::quantize_per_token, hsd::rmsnorm_quant and
hsd::silu_mul_quant (kernels/act_quant.py, rmsnorm_quant.py, silu_mul_quant.py) with the row read
once into registers (the default up to ONE_PASS_MAX) vs walked in chunks (forced with block=CHUNK).
silu_mul_quant (gate and up: the halves of one fused gate_up output, at K = 14336) is also timed
against the pair it replaces, silu(gate) * up then quantize_per_token: in torch eager (silu and
mul two kernels) and with the product compiled by inductor (one kernel, as in a compiled graph).

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
from hsd.kernels.silu_mul_quant import silu_mul_quant_reference, silu_mul_quant_triton
from hsd.kernels.timing import bench_stream_us, stream_copies

MS = (1, 16, 64)
KS = (4096, 14336)  # Llama-3-8B hidden and intermediate sizes
OP_KS = {"quantize_per_token": KS, "rmsnorm_quant": KS, "silu_mul_quant": (14336,)}  # the MLP's is intermediate
PATHS = {"one_pass": ONE_PASS_MAX, "chunked": 1024}  # the launcher's block cap
KIND = "int8"
DTYPE = torch.float16
EPS = 1e-5


def inputs(m, k):
    x = torch.randn(m, k, device="cuda", dtype=DTYPE) * 3
    return x, (torch.rand(k, device="cuda") + 0.5).to(DTYPE)


def gate_up(m, k):
    """The halves of one fused gate_up Linear's output, as FuseSiblingLinears leaves them."""
    fused = torch.randn(m, 2 * k, device="cuda", dtype=DTYPE) * 3
    return fused[:, :k], fused[:, k:]


def operands(op, m, k):
    return gate_up(m, k) if op == "silu_mul_quant" else inputs(m, k)


def operand_bytes(op, m, k):
    """What one call reads: x and the norm weight, or gate and up (16-bit)."""
    return 2 * (2 * m if op == "silu_mul_quant" else m + 1) * k


def calls(op, block, xs):
    if op == "quantize_per_token":
        return [lambda x=x: quantize_per_token_triton(x, KIND, block=block) for x, _ in xs]
    if op == "silu_mul_quant":
        return [lambda g=g, u=u: silu_mul_quant_triton(g, u, KIND, block=block) for g, u in xs]
    return [lambda x=x, w=w: rmsnorm_quant_triton(x, w, EPS, KIND, block=block) for x, w in xs]


def silu_mul(gate, up):
    return torch.nn.functional.silu(gate) * up


UNFUSED = {"unfused_eager": silu_mul, "unfused_inductor": torch.compile(silu_mul, dynamic=False, fullgraph=True)}


def unfused_calls(product, xs):
    return [lambda g=g, u=u: quantize_per_token_triton(product(g, u), KIND) for g, u in xs]


def check():
    """Per path and kind: quantize_per_token must equal its reference; rmsnorm_quant and
    silu_mul_quant may move a few elements one step (torch's CUDA rsqrt, Triton's exp are
    approximate; see test_rmsnorm_quant.py, test_silu_mul_quant.py)."""
    res = {}
    for (path, block), kind, k in itertools.product(PATHS.items(), ("int8", "fp8"), KS):
        x, w = inputs(16, k)
        q, s = quantize_per_token_triton(x, kind, block=block)
        q_ref, s_ref = quantize_per_token_reference(x, kind)
        exact = torch.equal(s, s_ref) and torch.equal(q.float(), q_ref.float())
        q, s = rmsnorm_quant_triton(x, w, EPS, kind, block=block)
        q_ref, s_ref = rmsnorm_quant_reference(x, w, EPS, kind)
        off = (dequantize(q, s) != dequantize(q_ref, s_ref)).float().mean().item()
        g, u = gate_up(16, k)
        q, s = silu_mul_quant_triton(g, u, kind, block=block)
        q_ref, s_ref = silu_mul_quant_reference(g, u, kind)
        silu_off = (dequantize(q, s) != dequantize(q_ref, s_ref)).float().mean().item()
        res[f"{path},{kind},K={k}"] = dict(quantize_exact=exact, rmsnorm_fraction_off=off,
                                           silu_mul_fraction_off=silu_off)
        print(f"check {path:8} {kind:4} K={k:<5} quantize exact {exact}  rmsnorm off {off:.2e}  "
              f"silu_mul off {silu_off:.2e}", flush=True)
        assert exact and off < 0.01 and silu_off < 0.01, res
    return res


def main():
    if not torch.cuda.is_available():
        sys.exit("bench_act_quant.py needs a CUDA GPU")
    out = pathlib.Path(os.environ.get("OUT", "out"))
    out.mkdir(parents=True, exist_ok=True)
    report = dict(benchmark="act_quant", gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                  triton=triton.__version__, date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
                  kind=KIND, dtype=str(DTYPE), paths=PATHS, timing="stream (bench_stream_us)", checks=check(), rows=[])
    for op, ks in OP_KS.items():
        for m in MS:
            for k in ks:
                xs = [operands(op, m, k) for _ in range(stream_copies(operand_bytes(op, m, k)))]
                row = dict(op=op, M=m, K=k)
                for path, block in PATHS.items():
                    row[path] = bench_stream_us(calls(op, block, xs))
                    row[path + "_launch"] = row_outputs(xs[0][0], KIND, block)[3]
                if op == "silu_mul_quant":
                    for name, product in UNFUSED.items():
                        row[name] = bench_stream_us(unfused_calls(product, xs))
                report["rows"].append(row)
                print(f"{op} M={m} K={k}: one pass {row['one_pass']:.2f} us, chunked {row['chunked']:.2f} us",
                      flush=True)
                del xs
    (out / "act_quant.json").write_text(json.dumps(report, indent=1))
    print(f"\n{'op':<20}{'M':>4}{'K':>7}{'one pass us':>13}{'chunked us':>12}{'speedup':>9}"
          f"{'unfused eager us':>18}{'unfused inductor us':>21}{'vs inductor':>13}")
    for r in report["rows"]:
        unfused = (f"{r['unfused_eager']:>18.2f}{r['unfused_inductor']:>21.2f}"
                   f"{r['unfused_inductor'] / r['one_pass']:>12.2f}x") if "unfused_eager" in r else ""
        print(f"{r['op']:<20}{r['M']:>4}{r['K']:>7}{r['one_pass']:>13.2f}{r['chunked']:>12.2f}"
              f"{r['chunked'] / r['one_pass']:>8.2f}x{unfused}")


if __name__ == "__main__":
    main()
