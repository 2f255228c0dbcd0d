"""Compile the tree-attention split kernel for a GPU that is not here and count its SASS instructions.

    python benchmarks/sass_attention.py [--arch 90] [--plans 64,64,4,3 16,64,4,3 ...]   (CPU only)

Each plan (BLOCK_M, BLOCK_N, num_warps, num_stages; default: the shipped LAUNCH_PLANS at decode
and at 64+ tree nodes, and the many-row candidates of sweep_kernels.py) is compiled for fp16 Llama heads (D = 128); the script
fails on any compile error and prints registers, spills, shared memory (two programs per SM need
at most 113 KB each on Hopper), the length of each loop (SASS instructions per warp and
iteration: the prefix loop, then the tree loop) and the instructions that bound it: the MMAs
(HGMMA is wgmma, HMMA mma.sync), MUFU (exp2, 16 per SM per clock) and the fp32 softmax ops.
"""
import argparse
import os
import sys

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
sys.path.insert(0, os.path.dirname(__file__))

from hsd.kernels import attention  # noqa: E402
from sass_stats import compile_kernel, sass_stats  # noqa: E402

SHOWN = ("HGMMA", "HMMA", "MUFU", "FFMA", "FMUL", "FADD", "FMNMX", "FSEL", "IMAD", "LDGSTS", "LDS", "STS", "BAR")
SCALARS = dict(qk_scale="fp32", HKV="i32", T="i32", S="i32", ROWS="i32", N_SPLITS="i32")
MANY_ROW_CANDIDATES = ((64, 64, 4, 2), (64, 128, 4, 2), (128, 64, 8, 3), (128, 128, 8, 2), (256, 64, 16, 2))


def compile_plan(block_m, block_n, num_warps, num_stages, arch=90, tree_split=False):
    ptrs = dict(q_ptr="fp16", k_ptr="fp16", v_ptr="fp16", kc_ptr="fp16", vc_ptr="fp16", len_ptr="i32",
                bits_ptr="i32", o_ptr="fp32", lse_ptr="fp32")
    consts = dict(D=128, BLOCK_M=block_m, BLOCK_N=block_n, TREE_SPLIT=tree_split)
    return compile_kernel(attention._attn_split_kernel, ptrs, consts,
                          dict(num_warps=num_warps, num_stages=num_stages), arch,
                          scalars=SCALARS, unaligned=("qk_scale", "HKV", "T", "ROWS", "N_SPLITS"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--plans", nargs="+", help="BLOCK_M,BLOCK_N,num_warps,num_stages each")
    args = ap.parse_args()
    plans = [tuple(int(x) for x in p.split(",")) for p in args.plans] if args.plans else \
        [(16, *attention.LAUNCH_PLANS["few_rows"][1:4]),            # decode: 4 rows, BLOCK_M 16
         attention.LAUNCH_PLANS["many_rows"][:4], *MANY_ROW_CANDIDATES]
    print(f"{'plan':<18} {'regs':>4} {'stack':>5} {'smem':>6} {'loops':>9} " + " ".join(f"{o:>6}" for o in SHOWN))
    for plan in dict.fromkeys(plans):
        compiled = compile_plan(*plan, arch=args.arch)
        regs, stack, ops, loops = sass_stats(compiled)
        print(f"{str(plan):<18} {regs:>4} {stack:>5} {compiled.metadata.shared:>6} {'/'.join(map(str, loops)):>9} "
              + " ".join(f"{ops[o]:>6}" for o in SHOWN), flush=True)


if __name__ == "__main__":
    main()
