"""Batch-1 greedy decode of a random Llama-3-8B-shaped fp16 model: hsd.compile, fp16 and each
quantization scheme (``--quant none w4a16 w4a8 w4a4 w8a8 fp8``).

Checks first that the compiled engine's prefill logits agree with the eager model, then times
generation (128-token prompt, 256 new tokens), and writes JSON to $OUT (default ./out).
REFERENCE.md anchors on the same GPU: transformers static-cache generate 89 tok/s, eager 35.
HSD_PDL=0 turns programmatic dependent launch off (hsd/kernels/pdl.py) to time its effect.
    python benchmarks/bench_decode.py [--layers 32] [--new-tokens 256] [--quant none w4a16 ...]
"""
import argparse
import datetime
import json
import os
import pathlib
import time

import torch
import triton
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

import hsd
from hsd import testing
from hsd.kernels import pdl


def llama3_8b(layers):
    return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                       rope_theta=500000.0, eos_token_id=None, bos_token_id=None, initializer_range=0.02)


def run(model, ids, new_tokens, quant):
    start = time.perf_counter()
    engine = hsd.compile(model, quant=quant, max_seq_len=1024, prefill_chunk=128)
    logits = engine(ids).logits
    with torch.no_grad():
        ref = model(ids).logits
    sqnr = testing.sqnr_db(ref.float(), logits.float())
    rtn = quant == "w4a16"  # testing.fake_quantized is W4A16's RTN reference (other schemes: tests)
    if rtn:  # random weights amplify quantization error: compare with the RTN reference too
        reference = testing.fake_quantized(model)
        with torch.no_grad():
            expected = reference(ids).logits.float()
        del reference
        kernel_sqnr = testing.sqnr_db(expected, logits.float())
        expected_sqnr = testing.sqnr_db(ref.float(), expected)
    engine.generate(ids, max_new_tokens=8)  # builds and captures the decode step
    setup_s = time.perf_counter() - start
    runs = []
    for _ in range(3):
        engine.generate(ids, max_new_tokens=new_tokens)
        runs.append(engine.stats.decode_tokens_per_s)
    tok_s = sorted(runs)[1]
    weight_gb = engine.weight_bytes(1) / 1e9
    row = dict(quant=quant or "fp16", pdl=pdl.enabled(ids.device), logits_sqnr_db=round(sqnr, 1), decode_tok_s=round(tok_s, 1),
               rtn_reference_sqnr_db=round(expected_sqnr, 1) if rtn else None,
               sqnr_vs_rtn_reference_db=round(kernel_sqnr, 1) if rtn else None,
               weight_gb=round(weight_gb, 2), achieved_gb_s=round(tok_s * weight_gb, 0),
               setup_s=round(setup_s, 1), prefill_ms=round(engine.stats.prefill_s * 1e3, 1),
               passes=[str(r) for r in engine.pass_report[1]])
    del engine
    torch.cuda.empty_cache()
    return row


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--quant", nargs="+", default=["none", "w4a16"])
    args = parser.parse_args()
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(llama3_8b(args.layers)).half().eval()
    ids = torch.randint(0, 128256, (1, 128), device="cuda")
    rows = []
    result = dict(benchmark="decode", gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                  triton=triton.__version__, transformers=transformers.__version__,
                  date=datetime.date.today().isoformat(), layers=args.layers, prompt=128,
                  new_tokens=args.new_tokens, rows=rows, hf_static_cache_tok_s_reference=89)
    out = pathlib.Path(os.environ.get("OUT", "out"))
    out.mkdir(parents=True, exist_ok=True)
    for quant in args.quant:  # the JSON is rewritten after each row: a cut-off run keeps what it did
        rows.append(run(model, ids, args.new_tokens, None if quant == "none" else quant))
        print(rows[-1], flush=True)
        (out / "decode.json").write_text(json.dumps(result, indent=1))
    for row in rows:
        print("\n".join(row.pop("passes")))
    print(f"{'quant':>6} {'PDL':>5} {'SQNR dB':>8} {'vs RTN ref':>10} {'tok/s':>7} {'weights GB':>10} {'GB/s':>6} {'setup s':>8}")
    for r in rows:
        print(f"{r['quant']:>6} {str(r['pdl']):>5} {r['logits_sqnr_db']:>8} {str(r['sqnr_vs_rtn_reference_db']):>10} "
              f"{r['decode_tok_s']:>7} {r['weight_gb']:>10} {r['achieved_gb_s']:>6.0f} {r['setup_s']:>8}")


if __name__ == "__main__":
    main()
