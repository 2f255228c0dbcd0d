"""Programmatic dependent launch (kernels/pdl.py) on and off for tree attention (Llama-3-8B layer,
prefix 2048 / 8192, 1 and 64 nodes), timed as a stream of calls over distinct KV caches in one
CUDA graph (hsd.kernels.timing.bench_stream_us), after a correctness check of a PDL chain.

    python benchmarks/bench_pdl.py        (needs a Hopper GPU; writes $OUT/pdl.json, default ./out)

The check: a chain of dependent W4A16 linears, then attention on their output, replayed from a
CUDA graph with PDL on must give what it gives with PDL off (a missing wait would read a stale
input). For the whole decode step with PDL, see bench_decode.py (HSD_PDL=0/1).
"""
import datetime
import json
import os
import pathlib
import sys

import torch
import triton

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import bench_attention as ba  # noqa: E402
from bench_gemm import GROUP, random_w4  # noqa: E402
from hsd.kernels import attention, w4a16  # noqa: E402
from hsd.kernels.timing import bench_stream_us, graphed, stream_copies  # noqa: E402

SETTINGS = ("0", "1")  # HSD_PDL


def set_pdl(on: str):
    os.environ["HSD_PDL"] = on


def chain_check():
    """Max abs difference between PDL on and off of one graph of dependent calls: 8 linears
    4096 -> 4096 (split K and not), each reading the last's output, then attention on it."""
    torch.manual_seed(0)
    weights = [random_w4(4096, 4096) for _ in range(8)]
    configs = [None, dict(KERNEL="mma", BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, SPLIT_K=1, num_warps=4,
                          num_stages=3, WEIGHTS_AS_A=True)]
    x0 = torch.randn(1, 4096, device="cuda", dtype=torch.float16)
    q, k, v, kc, vc, cache_len = ba.make_inputs(2048, 1)
    tree = attention.pack_tree_mask(ba.masks(1)["tree"])

    def step():
        x = x0
        for i, (qw, s, _) in enumerate(weights):
            x = w4a16.w4a16_linear_triton(x, qw, s, None, None, GROUP, configs[i % 2]) / 64
        qx = x.view(1, ba.HQ, 1, ba.D)
        return attention.attention_triton(qx, k, v, kc, vc, 0, cache_len, tree, ba.D ** -0.5)

    outs = {}
    for on in SETTINGS:
        set_pdl(on)
        out = torch.empty(1, ba.HQ, 1, ba.D, device="cuda", dtype=torch.float16)
        replay = graphed(lambda: out.copy_(step()))
        for _ in range(20):
            replay()
        outs[on] = out.clone()
    return (outs["0"].float() - outs["1"].float()).abs().max().item()


def attention_stream():
    res = {on: {} for on in SETTINGS}
    for prefix in (2048, 8192):
        for nodes in (1, 64):
            tree = ba.masks(nodes)["tree"]
            cases = [ba.make_inputs(prefix, nodes) for _ in range(stream_copies(4 * ba.HKV * prefix * ba.D))]
            calls = [ba.call("triton", c, prefix, tree, ba.D ** -0.5) for c in cases]
            for on in SETTINGS:
                set_pdl(on)
                res[on][f"{prefix},{nodes}"] = bench_stream_us(calls, reps=10)
            print(f"attention prefix={prefix} nodes={nodes}: off {res['0'][f'{prefix},{nodes}']:.1f} us, "
                  f"on {res['1'][f'{prefix},{nodes}']:.1f} us", flush=True)
            del cases
            torch.cuda.empty_cache()
    return res


def main():
    out = pathlib.Path(os.environ.get("OUT", "out"))
    out.mkdir(parents=True, exist_ok=True)
    diff = chain_check()
    print(f"chain of 8 linears + attention, PDL on vs off: max abs diff {diff:.3g}", flush=True)
    assert diff < 1e-2, diff
    report = dict(benchmark="pdl", gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                  triton=triton.__version__, date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
                  chain_max_abs_diff=diff, timing="stream (bench_stream_us)")
    report["attention"] = attention_stream()
    (out / "pdl.json").write_text(json.dumps(report, indent=1))
    print(f"{'attention (prefix,nodes)':<24}" + "".join(f"{key:>12}" for key in report["attention"]["0"]))
    for on in SETTINGS:
        print(f"{'PDL ' + ('on' if on == '1' else 'off'):<24}"
              + "".join(f"{us:>12.1f}" for us in report["attention"][on].values()))


if __name__ == "__main__":
    main()
