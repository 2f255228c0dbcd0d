"""One device run that checks the W4A16 and attention kernels on the GPU, then times variants.

    python benchmarks/sweep_kernels.py [--skip-w4a16] [--skip-attention] [--per-linear]   (CUDA GPU; $OUT)

W4A16: relative error of every kernel path (the inline-PTX unpacking included, which the CPU
interpreter never runs) against the fp32 reference, on shapes the tiles divide and shapes they
do not; what the timing harness itself costs (a 1-element kernel, device copies, do_bench's
writing L2 flush vs a reading one); with --per-linear, each Llama-3-8B linear with the table's
config against a device copy of the same bytes.
Attention: the op against the reference, then the launch plan swept over BLOCK_M cap, BLOCK_N,
warps, stages and programs per SM at prefix 2048 / 8192 with 1 and 64 tree nodes, and the split
kernel alone (to see what the reduce costs), stream timing; the fastest plan per row class goes to
$OUT/attention_plans.json (bench_attention.py --plans). Prints a short table last; JSON in $OUT/sweep.json.
"""
import argparse
import itertools
import json
import os
import pathlib
import sys

import torch
import triton

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import bench_attention as ba  # noqa: E402
from bench_gemm import LAYERS, random_w4, rel_err  # noqa: E402
from hsd.kernels import attention, w4a16  # noqa: E402
from hsd.kernels.timing import bench_stream_us, bench_us, graphed, replay_us, stream_copies  # noqa: E402


def w4a16_checks():
    worst = {}
    cfgs = [dict(KERNEL="mma", BLOCK_M=16, BLOCK_N=bn, BLOCK_K=128, SPLIT_K=s, num_warps=w, num_stages=3)
            for bn, w, s in ((128, 4, 1), (256, 4, 4), (256, 8, 2))]
    cfgs += [dict(KERNEL="mma", BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, SPLIT_K=2, num_warps=4, num_stages=3,
                  WEIGHTS_AS_A=True),
             dict(KERNEL="mma", BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, SPLIT_K=1, num_warps=4, num_stages=4),
             dict(KERNEL="gemv", BLOCK_M=1, BLOCK_N=64, BLOCK_K=64, SPLIT_K=4, num_warps=4, num_stages=3)]
    for (n, k), dtype, (zeros, bias), group in itertools.product(
            ((4096, 4096), (200, 384)), (torch.float16, torch.bfloat16), ((False, False), (True, True)), (128, 0)):
        group = group or k
        qw, s, z = random_w4(n, k, dtype, zeros)
        s, z = s[:k // group], None if z is None else z[:k // group]
        b = torch.randn(n, device="cuda", dtype=dtype) if bias else None
        for cfg in cfgs:
            m = 1 if cfg["KERNEL"] == "gemv" else {16: 5, 32: 17, 64: 64}[cfg["BLOCK_M"]]
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            ref = w4a16.w4a16_linear_reference(x.float(), qw, s.float(), None if z is None else z.float(),
                                               None if b is None else b.float(), group)
            err = rel_err(w4a16.w4a16_linear_triton(x, qw, s, z, b, group, cfg), ref)
            key = f"{dtype} {cfg['KERNEL']}{cfg['BLOCK_M']}"
            worst[key] = max(worst.get(key, 0.0), err)
    for key, err in worst.items():
        print(f"w4a16 check {key}: worst rel err {err:.2e}", flush=True)
        assert err < (2e-3 if "torch.float16" in key else 1.5e-2), key
    return worst


def clean_flush_us(fn, flush, reps=20):
    """Median us of graph replays of fn after an L2 flush that READS (leaves no dirty lines),
    minus the flush alone. do_bench's flush writes zeros, so a kernel after it first evicts up to
    50 MB of dirty lines: small kernels pay twice their bytes."""
    return (replay_us(graphed(lambda: (flush.sum(), fn())), reps)
            - replay_us(graphed(flush.sum), reps))


def harness_probe():
    """What the timing harness itself costs: a 1-element kernel, the memset a split-K GEMM puts
    before its kernel, and copies of layer-sized buffers, under do_bench's writing flush, a
    reading flush, and back to back in one graph (``stream_us``, distinct buffers per copy)."""
    flush = torch.empty(64 << 20, dtype=torch.float32, device="cuda")
    tiny = torch.zeros(1, device="cuda")
    zeros = lambda: torch.zeros(1, 4096, device="cuda", dtype=torch.float16)  # noqa: E731
    rows = [dict(what="1-element add", us=bench_us(lambda: tiny.add_(1)),
                 clean_us=clean_flush_us(lambda: tiny.add_(1), flush),
                 stream_us=bench_stream_us([lambda: tiny.add_(1)] * 32)),
            dict(what="memset 8 KB (torch.zeros 1 x 4096 fp16)", us=bench_us(zeros),
                 clean_us=clean_flush_us(zeros, flush), stream_us=bench_stream_us([zeros] * 32))]
    for mb in (8.4, 12.6, 29.4, 58.7):
        def copy_fn():
            src = torch.empty(int(mb * 1e6) // 2, dtype=torch.float16, device="cuda")
            dst = torch.empty_like(src)
            return lambda: dst.copy_(src)
        fn = copy_fn()
        rows.append(dict(what=f"copy {mb} MB", us=bench_us(fn), clean_us=clean_flush_us(fn, flush),
                         stream_us=bench_stream_us([copy_fn() for _ in range(stream_copies(int(2 * mb * 1e6)))])))
    for r in rows:
        print(f"harness {r['what']}: do_bench {r['us']:.1f} us, reading flush {r['clean_us']:.1f} us, "
              f"stream {r['stream_us']:.1f} us", flush=True)
    return rows, flush


def w4a16_per_linear(flush):
    rows = []
    for n, k in LAYERS["llama3-8b"]:
        qw, s, _ = random_w4(n, k)
        nbytes = qw.numel() * 4 + s.numel() * 2
        src = torch.empty(nbytes // 2, dtype=torch.float16, device="cuda")
        dst = torch.empty_like(src)
        copy_us = bench_us(lambda: dst.copy_(src))
        for m in (1, 16, 64):
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            fn = lambda: w4a16.w4a16_linear_triton(x, qw, s, None, None, 128)  # noqa: E731
            us, clean = bench_us(fn), clean_flush_us(fn, flush)
            gemv = dict(KERNEL="gemv", BLOCK_M=1, BLOCK_N=64, BLOCK_K=64, SPLIT_K=8, num_warps=4, num_stages=3)
            gemv_us = bench_us(lambda: w4a16.w4a16_linear_triton(x, qw, s, None, None, 128, gemv)) if m == 1 else None
            rows.append(dict(n=n, k=k, m=m, us=us, clean_us=clean, tbs=nbytes / us / 1e6, copy_us=copy_us,
                             gemv_us=gemv_us, config=w4a16.get_config(m, n, k, x.device)))
            print(f"w4a16 N={n} K={k} M={m}: {us:.1f} us = {nbytes / us / 1e6:.2f} TB/s, reading flush {clean:.1f} us "
                  f"(copy of the same bytes {copy_us:.1f} us; gemv {gemv_us}) {rows[-1]['config']}", flush=True)
    return rows


def split_only_us(q, k, v, kc, vc, cache_len, tree_bits, scale):
    b, hq, t, d = q.shape
    hkv, slots = kc.shape[2], kc.shape[3]
    rows = hq // hkv * t
    block_m, block_n, n_splits, warps, stages, tree_split = attention._split_plan(rows, slots, b * hkv, q.device)
    parts = n_splits + tree_split
    o = torch.empty((b * hkv, parts, rows, d), device="cuda", dtype=torch.float32)
    lse = torch.empty((b * hkv, parts, rows), device="cuda", dtype=torch.float32)

    def run():
        attention._attn_split_kernel[(triton.cdiv(rows, block_m), parts, b * hkv)](
            q, k, v, kc[0], vc[0], cache_len, tree_bits, o, lse, scale * attention._LOG2E,
            hkv, t, slots, rows, n_splits, D=d, BLOCK_M=block_m, BLOCK_N=block_n, TREE_SPLIT=tree_split,
            num_warps=warps, num_stages=stages)
    return run


def attention_sweep():
    """Every plan's op time and split-kernel time, ``bench_stream_us`` over distinct KV caches."""
    scale = ba.D ** -0.5
    rows, default = [], dict(attention.LAUNCH_PLANS)
    for prefix, n in ((2048, 1), (8192, 1), (2048, 64), (8192, 64)):
        q, k, v, kc, vc, cache_len = ba.make_inputs(prefix, n)
        tree_mask = ba.masks(n)["tree"]
        bits = attention.pack_tree_mask(tree_mask)
        kind = "few_rows" if ba.HQ // ba.HKV * n <= 64 else "many_rows"
        if kind == "few_rows":
            plans = [(64, bn, 4, st, per_sm, ts) for bn, st, per_sm, ts
                     in itertools.product((64, 128), (2, 3), (2, 3, 4), (True, False))]
        else:
            plans = [(64, 64, 4, 3, 1, True), (64, 64, 4, 3, 2, False), (64, 64, 4, 2, 2, False),
                     (64, 128, 4, 2, 1, False), (128, 64, 8, 3, 1, False), (128, 64, 8, 2, 1, False),
                     (128, 128, 8, 2, 1, False), (64, 64, 4, 3, 3, False),
                     (256, 64, 16, 2, 1, False)]   # one row block per KV head: K/V leave L2 once
        plans = [default[kind]] + plans
        kr, vr = kc.clone(), vc.clone()
        want = attention.attention_reference(q, k, v, kr, vr, 0, cache_len, bits, scale)
        caches = [ba.make_inputs(prefix, n) for _ in range(stream_copies(4 * ba.HKV * prefix * ba.D))]
        for plan in dict.fromkeys(plans):
            attention.LAUNCH_PLANS[kind] = plan
            attention._split_plan.cache_clear()
            try:
                got = attention.attention_triton(q, k, v, kc, vc, 0, cache_len, bits, scale)
                err = (got.float() - want.float()).abs().max().item()
                us = bench_stream_us([ba.call("triton", c, prefix, tree_mask, scale) for c in caches])
                split = bench_stream_us([split_only_us(*c, bits, scale) for c in caches])
            except Exception as e:  # out of resources: not a candidate
                print(f"attention prefix={prefix} nodes={n} plan={plan}: {type(e).__name__} {str(e)[:120]}")
                continue
            rows.append(dict(prefix=prefix, nodes=n, plan=plan, us=us, split_us=split, err=err))
            print(f"attention prefix={prefix} nodes={n} plan={plan}: {us:.1f} us (split kernel {split:.1f}) err {err:.1e}",
                  flush=True)
        attention.LAUNCH_PLANS.update(default)
        attention._split_plan.cache_clear()
    return rows


def best_plans(rows):
    """{"few_rows" | "many_rows": the plan with the least time summed over the prefixes swept}."""
    total = {}
    for r in rows:
        kind = "few_rows" if ba.HQ // ba.HKV * r["nodes"] <= 64 else "many_rows"
        per_prefix = total.setdefault(kind, {}).setdefault(tuple(r["plan"]), {})
        per_prefix[r["prefix"]] = r["us"]
    prefixes = {kind: set.union(*(set(p) for p in plans.values())) for kind, plans in total.items()}
    return {kind: list(min((p for p, t in plans.items() if set(t) == prefixes[kind]), key=lambda p: sum(plans[p].values())))
            for kind, plans in total.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-w4a16", action="store_true")
    ap.add_argument("--skip-attention", action="store_true")
    ap.add_argument("--per-linear", action="store_true", help="also time each 8B linear with the table's config")
    args = ap.parse_args()
    out = pathlib.Path(os.environ.get("OUT", "out"))
    out.mkdir(parents=True, exist_ok=True)
    report = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)
    if not args.skip_w4a16:
        report["w4a16_checks"] = w4a16_checks()
        report["harness"], flush = harness_probe()
        if args.per_linear:
            report["w4a16_per_linear"] = w4a16_per_linear(flush)
    if not args.skip_attention:
        report["attention"] = attention_sweep()
        plans = best_plans(report["attention"])
        (out / "attention_plans.json").write_text(json.dumps(plans))
        print("attention plans, fastest summed over prefixes:", plans)
    (out / "sweep.json").write_text(json.dumps(report, indent=1))
    for r in report.get("harness", []):
        print(f"harness {r['what']}: do_bench {r['us']:.1f} us, reading flush {r['clean_us']:.1f} us, "
              f"stream {r['stream_us']:.1f} us")
    for r in report.get("w4a16_per_linear", []):
        print(f"N={r['n']:>5} K={r['k']:>5} M={r['m']:>3}: {r['us']:6.1f} us {r['tbs']:.2f} TB/s, reading flush "
              f"{r['clean_us']:.1f}; copy {r['copy_us']:.1f}; gemv {r['gemv_us']}")
    best = {}
    for r in report.get("attention", []):
        key = (r["prefix"], r["nodes"])
        if key not in best or r["us"] < best[key]["us"]:
            best[key] = r
    for (prefix, n), r in best.items():
        first = next(x for x in report["attention"] if (x["prefix"], x["nodes"]) == (prefix, n))
        print(f"attention prefix {prefix} nodes {n}: default {first['us']:.1f} us (split {first['split_us']:.1f}); "
              f"best {r['us']:.1f} us (split {r['split_us']:.1f}) plan {r['plan']}")


if __name__ == "__main__":
    main()
