"""Compile the W4A8 kernel for a GPU that is not here and count its SASS instructions.

    python benchmarks/sass_w4a8.py [--arch 90] [--m 1 16 64] [--group 128] [--dot-order]   (CPU only)

Every config ``w4a8.candidate_configs`` yields for these M is compiled with the installed Triton
(split K = 1 only: the split adds one atomic epilogue); the script fails on any compile error and
prints registers, spills and the instructions that matter (integer ops run at half the fp32 rate
on Hopper; IMMA / IGMMA are the int8 MMAs).
"""
import argparse
import os
import sys

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
sys.path.insert(0, os.path.dirname(__file__))

from hsd.kernels import w4a8  # noqa: E402
from sass_stats import compile_kernel, sass_stats  # noqa: E402

SHOWN = ("LOP3", "SHF", "PRMT", "IMAD", "IADD3", "I2FP", "FFMA", "IMMA", "IGMMA", "LDGSTS", "STS",
         "LDS", "BAR")


def compile_config(cfg, arch=90, group=128, k=4096, zeros=False, dot_order=False):
    ptrs = dict(xq_ptr="i8", xs_ptr="fp32", qw_ptr="i32", s_ptr="fp16", z_ptr="fp16", b_ptr="fp16",
                y_ptr="fp16")
    consts = dict(G=group, HAS_ZEROS=zeros, HAS_BIAS=False, PER_CHANNEL=group == k,
                  ATOMIC=cfg["SPLIT_K"] > 1, WEIGHTS_AS_A=cfg["WEIGHTS_AS_A"], ASM=True,
                  BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                  BLOCK_K=cfg["BLOCK_K"] if group == k else group, X_DOT_ORDER=dot_order)
    return compile_kernel(w4a8._w4a8_kernel, ptrs, consts, cfg, arch)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--m", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--dot-order", action="store_true", help="activations in w4a8.dot_order")
    args = ap.parse_args()
    print(f"{'config':<36} {'regs':>4} {'stack':>5} {'loop':>5} " + " ".join(f"{o:>6}" for o in SHOWN))
    for m in args.m:
        for cfg in w4a8.candidate_configs(m, 4096, 4096):
            if cfg["SPLIT_K"] > 1:
                continue
            regs, stack, ops, body = sass_stats(compile_config(cfg, args.arch, args.group, dot_order=args.dot_order))
            loop = max(body, default=0)
            name = (f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']} w{cfg['num_warps']} "
                    f"s{cfg['num_stages']}" + (" A=W" if cfg["WEIGHTS_AS_A"] else ""))
            print(f"{name:<36} {regs:>4} {stack:>5} {loop:>5} " + " ".join(f"{ops[o]:>6}" for o in SHOWN),
                  flush=True)


if __name__ == "__main__":
    main()
