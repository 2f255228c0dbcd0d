"""Every quantized GEMM scheme vs cuBLAS fp16, torch's int4 tinygemm, torch._int_mm and
torch._scaled_mm on the linears of one Llama-3 layer.

    python benchmarks/bench_gemm.py [--tune]      (needs a CUDA GPU; writes to $OUT, default ./out)

For every M in 1..128 tokens it sums the time of the four linears of one decoder layer (Llama-3-8B
and -70B): W4A16 g128, W4A8 / W4A4 g128 (int8 MMA), W8A8 and FP8 (per-token activation
quantization included), and the anchors measured in the same run (the int8 / fp8 anchors without
activation quantization or epilogue). Two timings (hsd.kernels.timing), both from CUDA graphs:
"stream", each linear over its own weights back to back (what a decode step pays per layer), and
"do_bench", one call after an L2 clear (the method of REFERENCE.md's anchors). --tune first runs
``w4a16.tune`` for these shapes and writes the config table to $OUT/w4a16_<gpu>.json (copy it to
kernels/configs/ to ship it).
"""
import argparse
import functools
import datetime
import json
import os
import pathlib

import torch
import triton

from hsd.kernels import scaled_mm, tuning, w4a16, w4a8
from hsd.kernels.timing import bench_stream_us, bench_us, copy_tbs, stream_copies

LAYERS = {  # (N, K) of qkv, o, gate_up, down
    "llama3-8b": [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)],
    "llama3-70b": [(10240, 8192), (8192, 8192), (57344, 8192), (8192, 28672)],
}
EXTRA = {"llama3-8b-lm_head": [(128256, 4096)]}  # e.g. the EAGLE head's 4-bit draft lm_head
SHAPE_SETS = {**LAYERS, **EXTRA}
MS = (1, 2, 4, 8, 16, 32, 64, 128)
GROUP = 128
TIMINGS = ("stream", "do_bench")
TINYGEMM = hasattr(torch, "_weight_int4pack_mm")


def random_w4(n, k, dtype=torch.float16, zeros=False):
    """Random non-zero nibbles and scales: the kernel's speed must not depend on the data."""
    qweight = torch.randint(-2**31, 2**31 - 1, (k // 8, n), dtype=torch.int32, device="cuda")
    scales = (torch.rand(k // GROUP, n, device="cuda") * 0.02 + 0.001).to(dtype)
    z = torch.randint(0, 16, scales.shape, device="cuda").to(dtype) if zeros else None
    return qweight, scales, z


def rel_err(y, ref):
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


def check_correctness():
    """Relative error of both kernels vs the torch reference on the GPU, per dtype and variant."""
    rows = []
    n, k = 4096, 4096
    variants = {torch.float16: ((False, False, GROUP), (True, True, GROUP), (True, False, k)),
                torch.bfloat16: ((False, False, GROUP), (True, True, GROUP)),
                torch.float32: ((False, False, GROUP),)}
    runs = [("gemv", 1, 1, 64), ("gemv", 3, 1, 64), ("mma", 1, 16, 128), ("mma", 16, 16, 128),
            ("mma", 64, 64, 128), ("mma", 128, 64, 128)]  # kernel, M, BLOCK_M, BLOCK_K
    for dtype, cases in variants.items():
        for zeros, bias, group in cases:
            qw, s, z = random_w4(n, k, dtype, zeros)
            if group == k:
                s, z = s[:1], None if z is None else z[:1]
            b = torch.randn(n, device="cuda", dtype=dtype) if bias else None
            for kernel, m, block_m, block_k in runs:
                x = torch.randn(m, k, device="cuda", dtype=dtype)
                ref = w4a16.w4a16_linear_reference(x.float(), qw, s.float(),
                                                   None if z is None else z.float(),
                                                   None if b is None else b.float(), group)
                cfg = dict(KERNEL=kernel, BLOCK_M=block_m, BLOCK_N=128, BLOCK_K=block_k, SPLIT_K=4,
                           num_warps=4, num_stages=3)
                try:
                    err = rel_err(w4a16.w4a16_linear_triton(x, qw, s, z, b, group, cfg), ref)
                except Exception as e:
                    err = f"{type(e).__name__}: {str(e)[:300]}"
                rows.append(dict(kernel=kernel, dtype=str(dtype), zeros=zeros, bias=bias, group=group,
                                 M=m, rel_err=err))
                print(f"check {kernel} {dtype} zeros={zeros} bias={bias} G={group} M={m}: {err}", flush=True)
    return rows


def tinygemm_weights(qweight, scales):
    """Our symmetric g128 weights in tinygemm's layout, or None where this torch lacks the op.

    tinygemm dequantizes (q - 8) * scale + zero, so zero = 0 matches the symmetric zero point 8.
    torch >= 2.5 packs uint8 [N, K / 2] (even k in the high nibble); older torch int32 [N, K].
    """
    q = w4a16.unpack(qweight).t().contiguous()  # [N, K] in 0..15
    sz = torch.stack([scales.to(torch.bfloat16), torch.zeros_like(scales, dtype=torch.bfloat16)], -1)
    for packed in (((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8), q):
        try:
            return torch._convert_weight_to_int4pack(packed, 8), sz.contiguous()
        except (RuntimeError, AttributeError):
            continue
    return None


def _bytes(method, n, k):
    """Weight bytes one linear of ``method`` reads (what its GB/s is computed from)."""
    if method in ("w4a16_g128", "w4a16_g128_natural_x", "w4a8_g128", "w4a8_g128_natural_x", "w4a4_g128",
                  "tinygemm_g128"):
        return n * k // 2 + n * k // GROUP * 2
    if method in ("w8a8", "fp8", "int8_mm_anchor", "fp8_scaled_mm_anchor"):
        return n * k + n * 2
    return n * k * 2


def _cases(n, k):
    """method -> (M -> zero-arg callable running one [M, K] x [K, N] linear on random data). Each
    call makes its own weights, so a stream of calls (``bench_stream_us``) reads distinct bytes."""
    def x(m, dtype=torch.float16):
        return torch.randn(m, k, device="cuda", dtype=dtype)

    def w4a16_case(m, dot_order=True):
        """dot_order: x as hsd's lowering feeds it (the permutation folds into x's producer)."""
        qw, s, _ = random_w4(n, k)
        xm = w4a16.dot_order(x(m)) if dot_order else x(m)
        return functools.partial(w4a16.w4a16_linear_triton, xm, qw, s, None, None, GROUP,
                                 x_dot_order=dot_order)

    def tinygemm_case(m):
        tg = tinygemm_weights(*random_w4(n, k)[:2])
        return functools.partial(torch._weight_int4pack_mm, x(m, torch.bfloat16), tg[0], GROUP, tg[1])

    return {
        "w4a16_g128": w4a16_case,
        "w4a16_g128_natural_x": functools.partial(w4a16_case, dot_order=False),
        "w4a8_g128": lambda m: w4a8.benchmark(m, n, k, GROUP, "int8"),
        "w4a8_g128_natural_x": lambda m: w4a8.benchmark(m, n, k, GROUP, "int8", dot_order=False),
        "w4a4_g128": lambda m: w4a8.benchmark(m, n, k, GROUP, "int4"),
        "w8a8": lambda m: scaled_mm.bench_linear(m, n, k, "int8"),
        "fp8": lambda m: scaled_mm.bench_linear(m, n, k, "fp8"),
        "cublas_fp16": lambda m: functools.partial(torch.nn.functional.linear, x(m),
                                                   torch.randn(n, k, device="cuda", dtype=torch.float16)),
        "tinygemm_g128": tinygemm_case if TINYGEMM else None,
        "int8_mm_anchor": lambda m: scaled_mm.bench_anchor(m, n, k, "int8"),
        "fp8_scaled_mm_anchor": lambda m: scaled_mm.bench_anchor(m, n, k, "fp8"),
    }


def bench_model(shapes, methods, configs, per_linear):
    """{timing: {method: {M: summed us of the layer's linears, weight GB/s, TFLOP/s}}} for both
    timings of hsd.kernels.timing: "stream" (each linear over its own weights, back to back in
    one graph, as in a decode step) and "do_bench" (one call, L2 cleared first, the REFERENCE.md
    anchors' method). The W4A16 configs used go into ``configs``, each linear's us into
    ``per_linear``. A method that fails on this GPU (e.g. an anchor torch lacks) is None."""
    us = {timing: {meth: {m: 0.0 for m in MS} for meth in methods} for timing in TIMINGS}
    for n, k in shapes:
        cases = _cases(n, k)
        for meth in methods:
            copies = stream_copies(_bytes(meth, n, k))
            for m in MS:
                for timing in TIMINGS:
                    if cases[meth] is None or us[timing][meth][m] is None:
                        us[timing][meth][m] = None
                        continue
                    try:
                        t = (bench_stream_us([cases[meth](m) for _ in range(copies)], reps=10)
                             if timing == "stream" else bench_us(cases[meth](m), warmup=2, rep=15))
                    except Exception as e:
                        print(f"  {meth} N={n} K={k} M={m}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                        us[timing][meth][m] = None
                        continue
                    us[timing][meth][m] += t
                    per_linear.setdefault(timing, {}).setdefault(meth, {}).setdefault(f"{n},{k}", {})[str(m)] = t
            torch.cuda.empty_cache()
        configs[f"{n},{k}"] = {m: w4a16.get_config(m, n, k, torch.device("cuda")) for m in MS}
        print(f"  N={n} K={k} M=1 stream: " + ", ".join(f"{meth} {us['stream'][meth][1]}" for meth in methods),
              flush=True)
    flops = {m: 2 * m * sum(n * k for n, k in shapes) for m in MS}
    nbytes = {meth: sum(_bytes(meth, n, k) for n, k in shapes) for meth in methods}
    return {timing: {meth: {str(m): None if t is None else
                            dict(us=t, weight_gbs=nbytes[meth] / t / 1e3, tflops=flops[m] / t / 1e6)
                            for m, t in per_m.items()} for meth, per_m in per_timing.items()}
            for timing, per_timing in us.items()}


def check_tinygemm():
    n, k = 4096, 4096
    qw, s, _ = random_w4(n, k)
    tg = tinygemm_weights(qw, s)
    if tg is None:
        return "unavailable"
    x = torch.randn(16, k, device="cuda", dtype=torch.bfloat16)
    ref = w4a16.w4a16_linear_reference(x.float(), qw, s.float(), None, None, GROUP)
    return rel_err(torch._weight_int4pack_mm(x, tg[0], GROUP, tg[1]), ref)


def plot(results, path, copy_tbs_measured: float):
    """One panel per (model, timing): us per layer against M, log-log."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(TIMINGS), len(results), figsize=(6 * len(results), 4.5 * len(TIMINGS)),
                             squeeze=False)
    for col, (model, per_timing) in enumerate(results.items()):
        for row, timing in enumerate(TIMINGS):
            ax = axes[row][col]
            for method, per_m in per_timing[timing].items():
                ms = [m for m in MS if per_m[str(m)] is not None]
                ax.plot(ms, [per_m[str(m)]["us"] for m in ms], marker="o", label=method)
            floor = w4_bytes(SHAPE_SETS[model]) / copy_tbs_measured / 1e6
            ax.axhline(floor, color="gray", ls="--", label=f"W4 g128 floor {floor:.0f} us")
            ax.set(xscale="log", yscale="log", xlabel="M (tokens)", ylabel="layer linears, us",
                   title=f"{model}, one decoder layer, {timing} timing")
            ax.set_xticks(MS, [str(m) for m in MS])
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def w4_bytes(shapes):
    return sum(_bytes("w4a16_g128", n, k) for n, k in shapes)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tune", action="store_true", help="tune the config table for these shapes first")
    ap.add_argument("--models", nargs="+", default=list(LAYERS), choices=list(SHAPE_SETS),
                    help="which shape sets to time (default: the two decoder layers)")
    args = ap.parse_args()
    models = {name: SHAPE_SETS[name] for name in args.models}
    out = pathlib.Path(os.environ.get("OUT", "out"))
    out.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name()
    if args.tune:
        shapes = [s for layer in models.values() for s in layer]
        print("tuned table:", w4a16.tune(shapes, path=out / tuning.path("w4a16", name).name), flush=True)
    hbm_tbs = copy_tbs()  # the floor's bandwidth: 3.02 TB/s on an H100 (REFERENCE.md section 1)
    report = dict(gpu=name, torch=torch.__version__, triton=triton.__version__, copy_tbs=hbm_tbs,
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  group_size=GROUP, timing={"stream": "kernels/timing.bench_stream_us: per linear, distinct weight copies "
                                                "(>= 4 L2 sizes) back to back in one CUDA graph, median replay / copies",
                                      "do_bench": "kernels/timing.bench_us: one call from a CUDA graph, "
                                                  "triton.testing.do_bench median, L2 cleared (written) before each"},
                  correctness=check_correctness(), tinygemm_rel_err=check_tinygemm(), results={},
                  w4a16_configs={}, per_linear_us={})
    methods = ("w4a16_g128", "w4a16_g128_natural_x", "w4a8_g128", "w4a8_g128_natural_x", "w4a4_g128", "w8a8",
               "fp8", "cublas_fp16", "tinygemm_g128", "int8_mm_anchor", "fp8_scaled_mm_anchor")
    for model, shapes in models.items():
        print(model, flush=True)
        report["results"][model] = bench_model(shapes, methods, report["w4a16_configs"],
                                               report["per_linear_us"])
        (out / "bench_gemm.json").write_text(json.dumps(report, indent=1))
    plot(report["results"], out / "bench_gemm.png", hbm_tbs)
    print(f"\n{name}, us per layer (sum of 4 linears), W4 g128 floor: "
          + ", ".join(f"{mo} {w4_bytes(sh) / hbm_tbs / 1e6:.0f} us" for mo, sh in models.items()))
    for model, per_timing in report["results"].items():
        for timing, per_method in per_timing.items():
            print(f"{model + ' ' + timing:>24} | " + " ".join(f"{'M=' + str(m):>7}" for m in MS))
            for meth, per_m in per_method.items():
                cells = [per_m[str(m)] and per_m[str(m)]["us"] for m in MS]
                print(f"{meth:>24} | " + " ".join(f"{c:7.1f}" if c else f"{'n/a':>7}" for c in cells))

if __name__ == "__main__":
    main()
