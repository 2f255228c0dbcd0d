"""Command line: ``hsd demo`` (the embedded default), ``hsd generate --model PATH`` and
``hsd tune`` (the GEMM config tables for this GPU)."""
import argparse
import importlib
import pathlib

import torch

import hsd


def demo(args):
    """A small random Llama compiled twice (fp32, then W4A16 with every pass), greedy generation
    checked against transformers, and what each pass did."""
    from hsd import testing
    config = testing.tiny_config("llama", vocab_size=512, hidden_size=256, intermediate_size=512,
                                 num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                                 head_dim=32)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device == "cuda" else torch.float32
    model = testing.tiny_model(config, seed=0, dtype=dtype).to(device)
    print(f"model: random Llama, {config.num_hidden_layers} layers, width {config.hidden_size}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {dtype} on {device}")
    ids = testing.random_ids(config, seed=1, length=16).to(device)
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                             do_sample=False, pad_token_id=0)
        ref_logits = model(ids).logits
    same = True
    for quant in (None, "w4a16"):
        engine = hsd.compile(model, quant=quant, max_seq_len=256, prefill_chunk=16)
        out = engine.generate(ids, max_new_tokens=args.max_new_tokens)
        sqnr = testing.sqnr_db(ref_logits, engine(ids).logits)
        agree = float((out == ref).float().mean()) if out.shape == ref.shape else 0.0
        print(f"\n== hsd.compile(model, quant={quant!r}): compiled in {sum(engine.compile_s.values()):.1f} s")
        _report(engine)
        expected = ""
        if quant:  # random weights amplify quantization noise: show what plain RTN gives
            with torch.no_grad():
                rtn = testing.sqnr_db(ref_logits, testing.fake_quantized(model)(ids).logits)
            expected = f" (the same weights rounded to nearest in transformers: {rtn:.1f} dB)"
        print(f"logits SQNR vs the eager model: {sqnr:.1f} dB{expected}; "
              f"tokens equal to transformers' greedy: {agree:.0%}")
        print(f"generated: {out[0, ids.shape[1]:].tolist()}")
        same = same and (quant is not None or agree == 1.0)
    return 0 if same else 1


def generate(args):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    engine = hsd.compile(args.model, quant=args.quant, dtype=dtype, device=args.device,
                         max_seq_len=args.max_seq_len, spec=args.spec, draft=args.draft,
                         intermediate=args.intermediate, intermediate_quant=args.intermediate_quant,
                         draft_quant=args.draft_quant, quantizer=args.quantizer,
                         tokenizer=tokenizer)  # calibration (SmoothQuant, GPTQ) on the embedded text
    ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    out = engine.generate(ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                          eos_token_id=tokenizer.eos_token_id)
    print(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    _report(getattr(engine, "target", engine), engine.stats)
    return 0


TUNED_KERNELS = ("w4a16", "w4a8", "scaled_mm")


def linear_shapes(config) -> list:
    """(N, K) of the GEMMs ``hsd.compile`` runs for a Hugging Face decoder config: q/k/v and
    gate/up fused (``FuseSiblingLinears``), o_proj, down_proj, and the lm_head (EAGLE drafts
    through a 4-bit copy of it)."""
    hidden, heads = config.hidden_size, config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return [((heads + 2 * kv) * head_dim, hidden), (hidden, heads * head_dim),
            (2 * config.intermediate_size, hidden), (hidden, config.intermediate_size),
            (config.vocab_size, hidden)]


def _shape(text: str):
    try:
        n, k = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a GEMM shape is N,K (two integers), got {text!r}") from None
    if n <= 0 or k <= 0:
        raise argparse.ArgumentTypeError(f"N and K must be positive, got {text!r}")
    return n, k


def tune(args):
    """Time each kernel's candidate configs on this GPU for the model's (or the given) shapes and
    write its table, ``<out>/<kernel>_<gpu>.json`` (default: the package's kernels/configs)."""
    if not torch.cuda.is_available():
        raise SystemExit("hsd tune: needs a CUDA GPU (it times the kernels on the GPU it runs on)")
    if not args.model and not args.shapes:
        raise SystemExit("hsd tune: give --model PATH (a Hugging Face checkpoint or config) or --shapes N,K ...")
    shapes = list(args.shapes or [])
    if args.model:
        from transformers import AutoConfig
        shapes += [s for s in linear_shapes(AutoConfig.from_pretrained(args.model)) if s not in shapes]
    from hsd.kernels import tuning
    gpu = torch.cuda.get_device_name()
    for kernel in args.kernels:
        module = importlib.import_module(f"hsd.kernels.{kernel}")
        out = pathlib.Path(args.out) / tuning.path(kernel, gpu).name if args.out else None
        kwargs = {"m_buckets": tuple(args.m_buckets)} if args.m_buckets else {}
        print(f"{kernel}: {module.tune(shapes, path=out, budget_s=args.budget_s, **kwargs)}", flush=True)
    return 0


def _report(engine, stats=None):
    for tokens, records in sorted(engine.pass_report.items()):
        print(f"passes on the {tokens}-token step graph:")
        for record in records:
            print(f"  {record}")
    stats = stats or engine.stats
    gb = engine.weight_bytes() / 1e9
    print(f"{stats}; weights {gb:.3f} GB -> {stats.decode_tokens_per_s * gb:.1f} GB/s achieved")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="hsd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="compile a small random Llama and generate (no download)")
    d.add_argument("--device", default=None)
    d.add_argument("--max-new-tokens", type=int, default=24)
    d.set_defaults(run=demo)
    g = sub.add_parser("generate", help="generate from a local Hugging Face checkpoint")
    g.add_argument("--model", required=True, help="a Hugging Face checkpoint directory: 16-bit, or 4-bit GPTQ / "
                   "compressed-tensors (loaded as it is stored)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--quant", default=None, help="w4a16, w4a8, w4a4, w8a8, fp8 (default: none; w4a16 for a 4-bit "
                   "checkpoint)")
    g.add_argument("--quantizer", default="rtn", help="rtn or gptq (4-bit weight schemes)")
    g.add_argument("--dtype", default=None, help="float16, bfloat16, float32")
    g.add_argument("--device", default=None)
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--max-seq-len", type=int, default=2048)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--spec", default=None,
                   help="speculative pipeline: draft, eagle2, qspec, hierarchical (default: autoregressive)")
    g.add_argument("--draft", default=None, help="draft model (draft) or EAGLE head directory (eagle2, hierarchical)")
    g.add_argument("--intermediate", default=None, help="intermediate model path (hierarchical)")
    g.add_argument("--intermediate-quant", default=None)
    g.add_argument("--draft-quant", default=None)
    g.set_defaults(run=generate)
    t = sub.add_parser("tune", help="tune the GEMM config tables for this GPU (CUDA)")
    t.add_argument("--model", default=None, help="Hugging Face checkpoint directory or config: its GEMM shapes")
    t.add_argument("--shapes", type=_shape, nargs="+", default=None, metavar="N,K", help="more GEMM shapes")
    t.add_argument("--kernels", nargs="+", default=list(TUNED_KERNELS), choices=TUNED_KERNELS)
    t.add_argument("--m-buckets", type=int, nargs="+", default=None, help="token counts to tune for")
    t.add_argument("--budget-s", type=float, default=float("inf"), help="stop trying configs after this long, per kernel")
    t.add_argument("--out", default=None, help="directory for the tables (default: the package's kernels/configs)")
    t.set_defaults(run=tune)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
