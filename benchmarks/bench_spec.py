"""What speculation costs on a 4-bit Llama-3-8B-shaped target (random fp16 weights, W4A16), batch 1.

Random weights make acceptance meaningless, so this measures the costs that, with an acceptance
rate tau, decide the speed-up, and projects it:
  * target step time for T = 1 (decode) and T = chain / tree sizes (verification): the seed
    paper's point is that a good 4-bit kernel keeps T = 64 close to T = 1;
  * EAGLE-2 drafting (an 8B-shaped random EAGLE head, CUDA-graphed rounds): one default tree
    (depth 6, top_k 10, 60 nodes);
  * QSpec: a draft step with low-bit activations (same 4-bit weights) vs the W4A16 step;
  * one end-to-end run per pipeline where the drafter equals the target (tau = k + 1), which
    measures the pipeline's own overhead on top of its steps.
Projected speed-up = tau * t(decode) / (t(draft per step) + t(verify)), for the tau the papers
report. Writes $OUT/bench_spec.json after every row and prints a table last.
    python benchmarks/bench_spec.py [--layers 32]
"""
import argparse
import datetime
import json
import os
import pathlib
import tempfile
import time

import torch
import triton
import transformers
from transformers import LlamaForCausalLM

import hsd
from hsd.eagle import load_eagle_head, save_random_eagle_head
from hsd.eagle2 import Eagle2Config, draft_tree
from hsd.spec import DraftConfig, DraftPipeline

from bench_decode import llama3_8b

TREE_SIZES = (1, 16, 60)
PAPER_TAU = {"eagle2 (SpecMQuant W4A16 8B: 2.6/2.1 speedup)": 3.5, "qspec k=3": 2.5}


def step_ms(engine, tokens, reps=20):
    """Median ms of one T-token target step (CUDA graph replay) at a 512-token prefix."""
    ids = torch.randint(0, engine.config.vocab_size, (1, tokens), device="cuda")
    parents = torch.arange(-1, tokens - 1, device="cuda")
    engine.cache.length.fill_(512)
    engine.verify(ids, parents)  # builds the step
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        engine.verify(ids, parents, check=False)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1e3 * sorted(times)[reps // 2]


def draft_ms(head, config, reps=10):
    root = torch.tensor(1, device="cuda")
    hidden = torch.randn(head.config.hidden_size, device="cuda", dtype=torch.float16)
    head.cache.length.fill_(512)
    draft_tree(head, root, hidden, config)   # captures the rounds
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        draft_tree(head, root, hidden, config)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1e3 * sorted(times)[reps // 2]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = llama3_8b(args.layers)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).half().eval()
    out = pathlib.Path(os.environ.get("OUT", "out"))
    out.mkdir(parents=True, exist_ok=True)
    result = dict(benchmark="spec", gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                  triton=triton.__version__, transformers=transformers.__version__,
                  date=datetime.date.today().isoformat(), layers=args.layers, steps={}, rows=[])

    def save(**row):
        result["rows"].append(row)
        print(row, flush=True)
        (out / "bench_spec.json").write_text(json.dumps(result, indent=1))

    target = hsd.compile(model, quant="w4a16", max_seq_len=1024, prefill_chunk=128)
    for t in TREE_SIZES:
        result["steps"][t] = round(step_ms(target, t), 3)
        save(kind="target step", tokens=t, ms=result["steps"][t])
    with tempfile.TemporaryDirectory() as d:
        head = load_eagle_head(save_random_eagle_head(d, config, 0), model)
    head.allocate_cache(1024)
    eagle = Eagle2Config()
    save(kind="eagle2 draft tree", config=str(eagle), ms=round(draft_ms(head, eagle), 3))
    for kind in ("int8", "int4"):
        try:
            drafter = target.with_passes(hsd.passes.LowBitActivations(kind))
        except AttributeError:
            break  # the real low-bit draft path is not in this checkout
        save(kind=f"qspec draft step ({kind} activations)", tokens=1, ms=round(step_ms(drafter, 1), 3))
    # end to end, the drafter = the target: every draft accepted, tau = k + 1
    ids = torch.randint(0, config.vocab_size, (1, 128), device="cuda")
    for k in (3, 6):
        pipe = DraftPipeline(target, target, DraftConfig(k))
        pipe.generate(ids, max_new_tokens=32)
        pipe.generate(ids, max_new_tokens=256)
        s = pipe.stats
        save(kind="self-speculation (draft = target)", k=k, tau=round(s.tau, 2), tok_s=round(s.decode_tokens_per_s, 1),
             draft_ms_per_step=round(1e3 * s.draft_s / (s.target_steps - 1), 3),
             verify_ms_per_step=round(1e3 * s.verify_s / (s.target_steps - 1), 3))
    target.generate(ids, max_new_tokens=32)
    target.generate(ids, max_new_tokens=256)
    save(kind="autoregressive", tok_s=round(target.stats.decode_tokens_per_s, 1))
    decode = result["steps"][1]
    tree = next(r["ms"] for r in result["rows"] if r["kind"] == "eagle2 draft tree")
    print(f"\n{'step':>28} {'ms':>8} {'x decode':>9}")
    for t, ms in result["steps"].items():
        print(f"{'target T=' + str(t):>28} {ms:>8.3f} {ms / decode:>9.2f}")
    print(f"{'eagle2 draft (6,10,60)':>28} {tree:>8.3f} {tree / decode:>9.2f}")
    for r in result["rows"]:
        if r["kind"].startswith("qspec"):
            print(f"{r['kind']:>28} {r['ms']:>8.3f} {r['ms'] / decode:>9.2f}")
    projected = 3.5 * decode / (tree + result["steps"][60])
    print(f"EAGLE-2 projected speed-up at tau 3.5: {projected:.2f}x")
    result["eagle2_projected_speedup_tau_3.5"] = round(projected, 2)
    (out / "bench_spec.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
