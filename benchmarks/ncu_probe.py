"""The M = 1 W4A16 kernels of two Llama-3-8B linears and one decode attention call, for ncu:

    ncu --section SpeedOfLight --section Occupancy --section LaunchStats -k regex:'w4a16|attn' \
        python benchmarks/ncu_probe.py
"""
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import bench_attention as ba  # noqa: E402
from bench_gemm import random_w4  # noqa: E402
from hsd.kernels import attention, w4a16  # noqa: E402

for n, k in ((4096, 4096), (28672, 4096)):
    qw, s, _ = random_w4(n, k)
    x = torch.randn(1, k, device="cuda", dtype=torch.float16)
    for cfg in (None, dict(KERNEL="gemv", BLOCK_M=1, BLOCK_N=64, BLOCK_K=64, SPLIT_K=8, num_warps=4, num_stages=3)):
        w4a16.w4a16_linear_triton(x, qw, s, None, None, 128, cfg)
q, k, v, kc, vc, cache_len = ba.make_inputs(8192, 1)
attention.attention_triton(q, k, v, kc, vc, 0, cache_len, attention.pack_tree_mask(ba.masks(1)["tree"]), ba.D ** -0.5)
torch.cuda.synchronize()
