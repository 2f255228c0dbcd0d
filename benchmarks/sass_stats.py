"""Compile the W4A16 kernels for a GPU that is not here and count their SASS instructions.

    python benchmarks/sass_stats.py [--arch 90] [--m 1 16 64]      (CPU only; no GPU needed)

Every config ``w4a16.candidate_configs`` yields for these M (and the default config) is compiled
with the installed Triton for sm_<arch>; the script fails on any compile error and prints, per
config, registers, spills, the K loop's length (SASS instructions per warp and iteration, and per
weight and thread: "/w") and the instructions that decide a memory-bound kernel's speed: integer
ops (64 per SM per clock on Hopper, half the fp32 rate), shared-memory traffic and barriers.
"""
import argparse
import collections
import os
import pathlib
import re
import subprocess
import tempfile

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from hsd.kernels import w4a16  # noqa: E402

BIN = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
SHOWN = ("LOP3", "SHF", "PRMT", "HADD2", "FFMA", "HMMA", "HGMMA", "LDG", "LDGSTS", "STS", "LDS", "BAR")


GEMM_SCALARS = {name: "i32" for name in ("M", "N", "K", "stride_xm", "stride_ym", "tiles_per_split")}


def compile_kernel(fn, pointers: dict, consts: dict, cfg: dict, arch: int, scalars=GEMM_SCALARS,
                   unaligned=("M", "tiles_per_split")):
    """triton.compile ``fn`` for sm_<arch>: ``pointers`` (name -> element type) first, then
    ``scalars`` (name -> type; the GEMM launchers' M, N, K, strides and tiles_per_split by
    default), then ``consts``; every pointer and every scalar not in ``unaligned`` is declared
    16-divisible, as the launchers pass them."""
    sig = {name: f"*{t}" for name, t in pointers.items()}
    sig.update(scalars)
    aligned = [i for i, name in enumerate(sig) if name not in unaligned]
    sig.update(dict.fromkeys(consts, "constexpr"))
    src = ASTSource(fn=fn, signature=sig, constexprs=consts,
                    attrs={(i,): [["tt.divisibility", 16]] for i in aligned})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))


def compile_config(cfg, arch: int, dtype="fp16", group=128, k=4096, even=True, asm=True, dot_order=False):
    kernel = w4a16._KERNELS[cfg["KERNEL"]]
    ptrs = dict(x_ptr=dtype, qw_ptr="i32", s_ptr=dtype, z_ptr=dtype, b_ptr=dtype, y_ptr=dtype)
    consts = dict(G=group, HAS_ZEROS=False, HAS_BIAS=False, ATOMIC=cfg["SPLIT_K"] > 1,
                  SCALE_PER_TILE=group % cfg["BLOCK_K"] == 0 or group == k, EVEN=even,
                  ASM=asm and dtype != "fp32",
                  BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], X_DOT_ORDER=dot_order)
    if cfg["KERNEL"] == "mma":
        consts.update(PRECISION="tf32", WEIGHTS_AS_A=cfg.get("WEIGHTS_AS_A", cfg["BLOCK_M"] >= 64),
                      BLOCK_M=cfg["BLOCK_M"])
    return compile_kernel(kernel, ptrs, consts, cfg, arch)


def sass_stats(compiled):
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        sass = subprocess.run([BIN / "cuobjdump", "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
        res = subprocess.run([BIN / "cuobjdump", "-res-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
    ops = collections.Counter(re.findall(r"^\s+/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9]*)", sass, re.M))
    regs, stack = re.search(r"REG:(\d+) STACK:(\d+)", res).groups()
    return int(regs), int(stack), ops, loops(sass)


def loops(sass: str) -> list:
    """Instructions in each backward branch's body (a loop), per warp and iteration, in code order."""
    addrs = [int(a, 16) for a in re.findall(r"^\s+/\*([0-9a-f]{4,})\*/", sass, re.M)]
    bodies = []
    for at, target in re.findall(r"^\s+/\*([0-9a-f]{4,})\*/[^\n]*BRA\s+(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)", sass, re.M):
        at, target = int(at, 16), int(target, 16)
        if target < at:
            bodies.append((target, sum(target <= a <= at for a in addrs)))
    return [length for _, length in sorted(bodies)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--m", type=int, nargs="+", default=[1, 16, 64, 128])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--dot-order", action="store_true", help="activations in w4a16.dot_order")
    args = ap.parse_args()
    seen = set()
    print(f"{'config':<44} {'regs':>4} {'stack':>5} {'smem':>6} {'loop':>5} {'/w':>5} " + " ".join(f"{o:>6}" for o in SHOWN))
    for m in args.m:
        for cfg in [w4a16.default_config(m, args.n, args.k), *w4a16.candidate_configs(m, args.n, args.k)]:
            key = tuple(sorted((k, v) for k, v in cfg.items() if k != "SPLIT_K")) + (cfg["SPLIT_K"] > 1,)
            if key in seen:
                continue
            seen.add(key)
            compiled = compile_config(cfg, args.arch, k=args.k, dot_order=args.dot_order)
            regs, stack, ops, body = sass_stats(compiled)
            loop = max(body, default=0)
            per_weight = loop * 32 * cfg["num_warps"] / (cfg["BLOCK_N"] * cfg["BLOCK_K"])
            name = (f"{cfg['KERNEL']} {cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']} "
                    f"w{cfg['num_warps']} s{cfg['num_stages']} split{'>1' if cfg['SPLIT_K'] > 1 else '=1'}"
                    + (" A=W" if cfg.get("WEIGHTS_AS_A") else ""))
            print(f"{name:<44} {regs:>4} {stack:>5} {compiled.metadata.shared:>6} {loop:>5} {per_weight:5.2f} "
                  + " ".join(f"{ops[o]:>6}" for o in SHOWN), flush=True)


if __name__ == "__main__":
    main()
