"""Compile the scaled-GEMM kernel (W8A8 / FP8) for sm_90 without a GPU and show what it became.

    python benchmarks/sass_scaled_mm.py [--arch 90]      (CPU only)

Every default and tune-candidate config for the Llama-3-8B layer shapes, int8 and fp8: fails on
any compile error; prints registers, spills, shared memory and the MMA instructions (IGMMA /
QGMMA are Hopper's wgmma; IMMA / HMMA the older mma.sync path).
"""
import argparse


from sass_stats import compile_kernel, sass_stats
from hsd.kernels import scaled_mm

SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]
MMAS = ("IGMMA", "QGMMA", "IMMA", "HMMA")


def compile_config(cfg, dtype: str, arch: int):
    ptrs = dict(x_ptr=dtype, xs_ptr="fp32", w_ptr=dtype, ws_ptr="fp16", b_ptr="fp16", y_ptr="fp16")
    consts = dict(IS_INT=dtype == "i8", HAS_BIAS=False, ATOMIC=cfg["SPLIT_K"] > 1,
                  WEIGHTS_AS_A=cfg["WEIGHTS_AS_A"], BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                  BLOCK_K=cfg["BLOCK_K"])
    return compile_kernel(scaled_mm._scaled_mm_kernel, ptrs, consts, cfg, arch)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", type=int, default=90)
    args = ap.parse_args()
    seen = set()
    print(f"{'kind':5} {'config':<40} {'regs':>4} {'stack':>5} {'smem':>6}  mma")
    for dtype, kind in (("i8", "int8"), ("fp8e4nv", "fp8")):
        for m in (1, 16, 64, 128):
            for n, k in SHAPES:
                for cfg in [scaled_mm.default_config(m, n, k), *scaled_mm.candidate_configs(m, n, k)]:
                    key = (dtype, *(cfg[c] for c in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "WEIGHTS_AS_A",
                                                     "num_warps", "num_stages")), cfg["SPLIT_K"] > 1)
                    if key in seen:
                        continue
                    seen.add(key)
                    compiled = compile_config(cfg, dtype, args.arch)
                    regs, stack, ops, _ = sass_stats(compiled)
                    name = (f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']} w{cfg['num_warps']} "
                            f"s{cfg['num_stages']} split{'>1' if cfg['SPLIT_K'] > 1 else '=1'}"
                            + (" A=W" if cfg["WEIGHTS_AS_A"] else ""))
                    print(f"{kind:5} {name:<40} {regs:>4} {stack:>5} {compiled.metadata.shared:>6}  "
                          + " ".join(f"{o} {ops[o]}" for o in MMAS if ops[o]), flush=True)


if __name__ == "__main__":
    main()
