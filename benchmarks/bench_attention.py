"""Tree attention on one Llama-3-8B layer (32 q heads, 8 KV heads, head dim 128, fp16, batch 1).

For each prefix length and tree size: check the Triton op against the reference on the GPU, then
time the op against
  hf:  transformers' way, K/V repeated to 32 heads + SDPA with a dense bool 4D mask,
  gqa: SDPA with enable_gqa=True and the same mask.
Every method also writes the new K/V into the cache. Three timings:
  us:        triton.testing.do_bench, median (includes what launch overhead the GPU cannot hide),
  graph_us:  calls replayed from one CUDA graph, each after an L2 flush, minus the flushes,
  stream_us: calls over distinct KV caches (4 L2 sizes in all) back to back in one CUDA graph
             (hsd.kernels.timing.bench_stream_us): what each layer of a decode step pays.
Bandwidth counts the K/V prefix bytes read. Writes attention.json and attention.png to $OUT (default ./out), prints a table last.
"""
import argparse
import datetime
import json
import os
import random

import torch
import torch.nn.functional as F
import triton

from hsd.kernels.attention import LAUNCH_PLANS, ancestor_mask, attention_reference, attention_triton, pack_tree_mask
from hsd.kernels.timing import bench_stream_us, copy_tbs, stream_copies

HQ, HKV, D, DTYPE = 32, 8, 128, torch.float16
PREFIXES = (512, 2048, 8192)
NODES = (1, 8, 32, 64, 128)
LONG_SLOTS = 32768 + max(NODES)


def masks(n: int):
    rng = random.Random(n)
    parent = torch.tensor([-1] + [rng.randrange(i) for i in range(1, n)])
    return {"tree": ancestor_mask(parent).cuda(), "chain": torch.ones(n, n, dtype=torch.bool, device="cuda").tril()}


def make_inputs(prefix: int, n: int, slots: int = 0):
    """Random q/k/v and caches of ``slots`` (default just enough) slots filled up to prefix + n."""
    slots = slots or prefix + max(NODES)
    q = torch.randn(1, HQ, n, D, device="cuda", dtype=DTYPE)
    k, v = (torch.randn(1, HKV, n, D, device="cuda", dtype=DTYPE) for _ in range(2))
    k_cache, v_cache = (torch.zeros(1, 1, HKV, slots, D, device="cuda", dtype=DTYPE) for _ in range(2))
    for cache in (k_cache, v_cache):
        cache[..., :prefix + max(NODES), :].normal_()
    return q, k, v, k_cache, v_cache, torch.tensor([prefix], device="cuda", dtype=torch.int32)


def sdpa(q, k, v, k_cache, v_cache, prefix: int, tree_mask, repeat: bool):
    n = q.shape[2]
    k_cache[0, :, :, prefix:prefix + n] = k
    v_cache[0, :, :, prefix:prefix + n] = v
    keys, values = k_cache[0, :, :, :prefix + n], v_cache[0, :, :, :prefix + n]
    mask = torch.cat([tree_mask.new_ones(n, prefix), tree_mask], 1)[None, None]
    if repeat:
        keys, values = (x.repeat_interleave(HQ // HKV, dim=1) for x in (keys, values))
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)


def call(method: str, inputs, prefix: int, tree_mask, scale: float):
    """A zero-arg call of ``method`` on ``inputs`` (what ``make_inputs`` returns)."""
    q, k, v, k_cache, v_cache, cache_len = inputs
    if method == "triton":
        bits = pack_tree_mask(tree_mask)
        return lambda: attention_triton(q, k, v, k_cache, v_cache, 0, cache_len, bits, scale)
    return lambda: sdpa(q, k, v, k_cache, v_cache, prefix, tree_mask, method == "hf")


def graph_us(fn, flush: torch.Tensor, reps: int = 20) -> float:
    def replay_us(body):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(reps):
                body()
        times = []
        for _ in range(3):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) * 1e3 / reps)
        return min(times)

    return replay_us(lambda: (flush.zero_(), fn())) - replay_us(flush.zero_)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--plans", help="JSON file of LAUNCH_PLANS entries to use instead of the shipped ones "
                                     "(what benchmarks/sweep_kernels.py writes)")
    args = ap.parse_args()
    if args.plans:
        with open(args.plans) as f:
            LAUNCH_PLANS.update({kind: tuple(plan) for kind, plan in json.load(f).items()})
    out_dir = os.environ.get("OUT", "./out")
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(0)
    scale = D ** -0.5
    flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")   # larger than the L2
    peak_tbs = copy_tbs()  # the target's ceiling: 3.0 TB/s on an H100
    rows = []
    for prefix in PREFIXES:
        for n in NODES:
            for form, tree_mask in masks(n).items():
                q, k, v, k_cache, v_cache, cache_len = make_inputs(prefix, n)
                kr, vr = k_cache.clone(), v_cache.clone()
                bits = pack_tree_mask(tree_mask)
                want = attention_reference(q, k, v, kr, vr, 0, cache_len, bits, scale)
                got = attention_triton(q, k, v, k_cache, v_cache, 0, cache_len, bits, scale)
                err = (got.float() - want.float()).abs().max().item()
                assert err < 2e-2 and torch.equal(k_cache, kr) and torch.equal(v_cache, vr), (prefix, n, form, err)
                for repeat in (True, False):
                    base_err = (sdpa(q, k, v, kr, vr, prefix, tree_mask, repeat).float() - want.float()).abs().max().item()
                    assert base_err < 2e-2, (prefix, n, form, repeat, base_err)
                kv_bytes = 2 * HKV * prefix * D * k_cache.element_size()
                copies = stream_copies(kv_bytes)
                for method in ("triton", "hf", "gqa"):
                    fn = call(method, (q, k, v, k_cache, v_cache, cache_len), prefix, tree_mask, scale)
                    us = triton.testing.do_bench(fn, return_mode="median") * 1e3
                    g_us = graph_us(fn, flush)
                    s_us = bench_stream_us([call(method, make_inputs(prefix, n), prefix, tree_mask, scale)
                                            for _ in range(copies)])
                    rows.append(dict(prefix=prefix, nodes=n, form=form, method=method, us=us, graph_us=g_us,
                                     stream_us=s_us, kv_gbps=kv_bytes / us / 1e3, graph_kv_gbps=kv_bytes / g_us / 1e3,
                                     stream_kv_gbps=kv_bytes / s_us / 1e3, max_abs_err=err if method == "triton" else None))
                    torch.cuda.empty_cache()

    # a long-context cache that is still short: the split count comes from the slots, the chunk
    # from cache_len, so the prefix should cost what it costs in a cache of its own size
    long_rows = []
    for prefix in PREFIXES[1:]:
        for n in (1, 64):
            tree_mask = masks(n)["tree"]
            copies = stream_copies(2 * HKV * prefix * D * 2)
            s_us = bench_stream_us([call("triton", make_inputs(prefix, n, LONG_SLOTS), prefix, tree_mask, D ** -0.5)
                                    for _ in range(copies)])
            long_rows.append(dict(prefix=prefix, nodes=n, slots=LONG_SLOTS, stream_us=s_us))
            torch.cuda.empty_cache()

    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                shape=dict(q_heads=HQ, kv_heads=HKV, head_dim=D, dtype=str(DTYPE), batch=1),
                timing="us: do_bench median; graph_us: CUDA graph replay minus flushes, L2 flushed before "
                       "every call; stream_us: distinct KV caches back to back in one graph; every method "
                       "writes the new K/V",
                launch_plans=LAUNCH_PLANS, copy_tbs=peak_tbs)
    with open(os.path.join(out_dir, "attention.json"), "w") as f:
        json.dump(dict(meta, results=rows, long_cache=long_rows), f, indent=1)
    plot(rows, os.path.join(out_dir, "attention.png"), meta["gpu"])

    t = {(r["prefix"], r["nodes"], r["form"], r["method"]): r for r in rows}
    print(f"{meta['gpu']}  torch {meta['torch']}  triton {meta['triton']}   us = graph (flushed) / stream")
    print(f"{'prefix':>6} {'nodes':>5} {'form':>5} {'triton us':>13} {'GB/s':>11} {'hf us':>13} {'gqa us':>13}")
    for prefix in PREFIXES:
        for n in NODES:
            for form in ("tree", "chain"):
                r = {m: t[prefix, n, form, m] for m in ("triton", "hf", "gqa")}
                us = {m: f"{x['graph_us']:.1f}/{x['stream_us']:.1f}" for m, x in r.items()}
                gbps = f"{r['triton']['graph_kv_gbps']:.0f}/{r['triton']['stream_kv_gbps']:.0f}"
                print(f"{prefix:>6} {n:>5} {form:>5} {us['triton']:>13} {gbps:>11} {us['hf']:>13} {us['gqa']:>13}")
    for r in long_rows:
        same = t[r["prefix"], r["nodes"], "tree", "triton"]["stream_us"]
        print(f"cache of {r['slots']} slots, prefix {r['prefix']}, {r['nodes']} nodes: {r['stream_us']:.1f} us stream "
              f"({same:.1f} in a cache of prefix + {max(NODES)} slots)")
    for key in ("us", "graph_us", "stream_us"):
        one = t[8192, 1, "tree", "triton"]
        gbps = 2 * HKV * 8192 * D * 2 / one[key] / 1e3
        print(f"target ({key}): prefix 8192, 1 node: {gbps:.0f} GB/s = {gbps / (10 * peak_tbs):.0f}% of the "
              f"{peak_tbs:.2f} TB/s copy (want >= 70%)")
        for prefix in PREFIXES[1:]:
            ratio = t[prefix, 64, "tree", "triton"][key] / t[prefix, 1, "tree", "triton"][key]
            print(f"target ({key}): prefix {prefix}, 64 nodes / 1 node = {ratio:.2f}x (want <= 1.3x)")


def plot(rows, path, gpu):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(PREFIXES), figsize=(4.5 * len(PREFIXES), 3.8), sharey=True)
    for ax, prefix in zip(axes, PREFIXES):
        for method in ("triton", "gqa", "hf"):
            pts = [(r["nodes"], r["stream_us"]) for r in rows if r["prefix"] == prefix and r["method"] == method and r["form"] == "tree"]
            ax.plot(*zip(*pts), marker="o", label=method)
        ax.set(title=f"prefix {prefix}", xlabel="tree nodes", xscale="log", yscale="log")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("us (stream: distinct caches back to back in a CUDA graph)")
    axes[0].legend()
    fig.suptitle(f"Tree attention, Llama-3-8B layer, fp16, {gpu}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
