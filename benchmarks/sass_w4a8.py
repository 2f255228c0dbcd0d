"""Compile the W4A8 kernel for sm_90 without a GPU and count its SASS instructions.

    python benchmarks/sass_w4a8.py          (CPU only; reuses benchmarks/sass_stats.py)
"""
import os
import sys

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
sys.path.insert(0, os.path.dirname(__file__))
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from hsd.kernels import w4a8  # noqa: E402
from sass_stats import sass_stats  # noqa: E402

SHOWN = ("LOP3", "SHF", "PRMT", "IMAD", "IADD3", "I2F", "I2FP", "FFMA", "IMMA", "IGMMA", "LDG",
         "LDGSTS", "STS", "LDS", "BAR")


def compile_config(cfg, arch=90, group=128, k=4096, zeros=False):
    sig = dict(xq_ptr="*i8", xs_ptr="*fp32", qw_ptr="*i32", s_ptr="*fp16", z_ptr="*fp16",
               b_ptr="*fp16", y_ptr="*fp16")
    sig.update(dict.fromkeys(("M", "N", "K", "stride_xm", "stride_ym", "tiles_per_split"), "i32"))
    consts = dict(G=group, HAS_ZEROS=zeros, HAS_BIAS=False, PER_CHANNEL=group == k,
                  ATOMIC=cfg["SPLIT_K"] > 1, WEIGHTS_AS_A=cfg["WEIGHTS_AS_A"], ASM=True,
                  BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                  BLOCK_K=cfg["BLOCK_K"] if group == k else group)
    sig.update(dict.fromkeys(consts, "constexpr"))
    aligned = [i for i, name in enumerate(sig) if name not in ("M", "tiles_per_split") and i < 13]
    src = ASTSource(fn=w4a8._w4a8_kernel, signature=sig, constexprs=consts,
                    attrs={(i,): [["tt.divisibility", 16]] for i in aligned})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))


WANT = {(1, 128, 4), (1, 64, 4), (64, 128, 4)}
UNPACKS = [int(a) for a in sys.argv[1:]] or [0, 1, 2, 3]


def main():
    print(f"{'config':<40} {'regs':>4} {'stack':>5} {'smem':>6} " + " ".join(f"{o:>6}" for o in SHOWN))
    seen = set()
    for m in (1, 16, 64):
        for cfg in [dict(c, UNPACK=u) for c in w4a8.candidate_configs(m, 4096, 4096) for u in UNPACKS]:
            key = tuple(sorted((k, v) for k, v in cfg.items() if k != "SPLIT_K")) + (cfg["SPLIT_K"] > 1,)
            if key in seen or cfg["SPLIT_K"] > 1 or (m, cfg["BLOCK_N"], cfg["num_warps"]) not in WANT:
                continue
            seen.add(key)
            regs, stack, ops = sass_stats(compile_config(cfg))
            name = (f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']} w{cfg['num_warps']} "
                    f"s{cfg['num_stages']} split{'>1' if cfg['SPLIT_K'] > 1 else '=1'}"
                    + (" A=W" if cfg["WEIGHTS_AS_A"] else "") + f" u{cfg['UNPACK']}")
            print(f"{name:<40} {regs:>4} {stack:>5} {'':>6} " + " ".join(f"{ops[o]:>6}" for o in SHOWN),
                  flush=True)


if __name__ == "__main__":
    main()
