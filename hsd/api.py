"""``hsd.compile``: the one call that turns a Hugging Face causal LM into an engine."""
import torch

from hsd import calibration as hsd_calibration
from hsd import checkpoint
from hsd.capture import check_supported
from hsd import spec as hsd_spec
from hsd.engine import Engine
from hsd.kv_cache import KVCache
from hsd.lowering import BACKENDS, default_backend
from hsd.passes import (QUANT_SCHEMES, FuseSiblingLinears, LoadWeights, PassManager, QuantizeLinear,
                        RewriteAttention, RotateHadamard, as_pass)
from hsd.passes import gptq
from hsd.passes.norm import FuseRMSNormQuant
from hsd.passes.smoothquant import SmoothQuant, activation_absmax

QUANTIZERS = ("rtn", "gptq")


def compile(model_or_path, *, quant=None, passes=(), dtype=None, device=None, max_seq_len: int = 2048,
            batch_size: int = 1, prefill_chunk: int = 128, group_size: int = 128, fuse: bool = True,
            backend=None, dump_graphs=None, spec=None, draft=None, spec_config=None, draft_quant=None,
            weights=None, intermediate=None, intermediate_quant=None, quantizer: str = "rtn",
            calibration=None, tokenizer=None, act_order: bool = False, smooth_alpha=0.5):
    """Compile a Llama / Mistral / Qwen2 causal LM (a module or a checkpoint path) for decoding.
    A path to a quantized checkpoint (GPTQ, or compressed-tensors W4A16 / W8A8 / FP8) loads its
    quantized tensors as they are (``hsd.checkpoint``) and runs as the scheme they fit (4-bit:
    ``quant="w4a16"`` by default, or ``"w4a8"``); dtype defaults to the checkpoint's bf16 or fp16.

    Passes run in this order on each captured step graph: ``passes`` (yours: hsd.Pass objects
    or callables on a torch.fx.GraphModule), RotateHadamard (for quant="w4a4" and QSpec with
    4-bit drafts), RewriteAttention, SmoothQuant (w8a8), FuseSiblingLinears (if ``fuse``),
    QuantizeLinear and FuseRMSNormQuant (if ``quant``). ``dump_graphs``: a directory for each graph before and after
    every pass (or set HSD_DUMP_GRAPHS). ``backend``: "inductor" (CUDA default, with CUDA
    graphs), "aot_eager" or "eager" (CPU default).

    ``weights``: for a model built on the meta device (no weight materialised), the tensors by
    Hugging Face name; Linears take ``<module>.qweight`` / ``.scales`` / ``.zeros`` in hsd's W4
    layout (GPTQ's), so 16-bit Linear weights never exist. Needs ``device``, ``dtype``, ``quant``.

    ``quantizer``: how a 4-bit ``quant`` rounds the weights: "rtn" (round to nearest) or "gptq"
    (``hsd.passes.gptq``: Hessians from one pass of the float model over ``calibration``, token
    ids [n, T], default random tokens; ``act_order``: GPTQ's desc_act with static groups).

    ``spec``: None (autoregressive) or a speculative pipeline name ("draft": ``draft`` is a
    smaller LM, compiled with ``draft_quant``; "eagle2": ``draft`` is an EAGLE-1 head checkpoint
    directory or an ``hsd.eagle.EagleHead``; "qspec": the target drafts itself; "hierarchical":
    ``intermediate`` is a smaller LM compiled with ``intermediate_quant`` and ``draft`` an EAGLE
    head for it); ``spec_config`` its settings dataclass (``hsd.spec.DraftConfig``,
    ``hsd.spec.QSpecConfig``, ``hsd.eagle2.Eagle2Config``, ``hsd.hierarchical.HierarchicalConfig``).
    ``quant="w8a8"`` / ``"fp8"``: 8-bit per-channel weights and per-token activations
    (``hsd.passes.scaled``); RMSNorm + activation quantization fuse (``FuseRMSNormQuant``). w8a8
    first runs ``SmoothQuant(alpha=smooth_alpha)`` (None: off) on statistics of ``calibration``
    (token ids [n, T]; default: the embedded text through ``tokenizer`` if given, else random ids).

    Returns an ``Engine`` or, with ``spec``, an ``hsd.spec.Speculative``.
    """
    if quant is not None and quant not in QUANT_SCHEMES:
        raise ValueError(f"unknown quant {quant!r}; known: {', '.join(QUANT_SCHEMES)} (or None)")
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
    if max_seq_len < 1 or batch_size < 1 or prefill_chunk < 1:
        raise ValueError("max_seq_len, batch_size and prefill_chunk must be positive")
    settings = None if isinstance(model_or_path, torch.nn.Module) else checkpoint.quantization_config(model_or_path)
    if settings is None:
        model = _load(model_or_path, dtype)
    else:
        checked = checkpoint.check(settings)
        quant = _checkpoint_quant(quant, weights, spec, spec_config, schemes=checked[0])
        dtype = dtype or checkpoint.default_dtype(model_or_path)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model, weights, group_size = checkpoint.load(model_or_path, checked)
    _check_quantizer(quantizer, quant, calibration, act_order)
    user_passes = [as_pass(p) for p in passes]
    check_supported(model.config, max_seq_len)
    model.eval()
    model.set_attn_implementation("sdpa")  # RewriteAttention matches the SDPA node
    builtin = [RewriteAttention()]
    if _rotates(quant, spec, spec_config):  # QuaRot: 4-bit activations need outliers spread out
        if quantizer == "gptq":
            raise ValueError("quantizer='gptq' with Hadamard-rotated weights (quant='w4a4' or QSpec with "
                             "4-bit drafts) is not supported: its Hessians would be taken before the rotation")
        builtin.insert(0, RotateHadamard())
    if next(model.parameters()).is_meta:
        if quantizer == "gptq":
            raise ValueError("quantizer='gptq' calibrates the model's float weights, but the model is on the "
                             "meta device; quantize offline and pass weights= (with the default quantizer)")
        weights = _meta_weights(model, weights, quant, dtype, device)
        builtin.insert(0, LoadWeights(weights, device, dtype))
    else:
        model = model.to(dtype=dtype, device=device)
        dtype, device = next(model.parameters()).dtype, next(model.parameters()).device
    if quant is not None:
        QUANT_SCHEMES[quant].check_device(device or "cpu")
        smooth = getattr(QUANT_SCHEMES[quant], "smoothquant", False) and smooth_alpha is not None
        if smooth and not next(model.parameters()).is_meta:  # pre-quantized weights come smoothed
            ids = _calibration_ids(model, calibration, tokenizer)
            builtin.append(SmoothQuant(activation_absmax(model, ids), smooth_alpha))
    hessians = None
    if quantizer == "gptq":
        hessians = gptq.hessians(model, _calibration_ids(model, calibration, tokenizer))
    if fuse:
        builtin.append(FuseSiblingLinears())
    if quant is not None:
        builtin += [QuantizeLinear(quant, group_size=group_size, prequantized=weights, hessians=hessians,
                                   act_order=act_order), FuseRMSNormQuant()]
    cache = KVCache.for_config(model.config, batch_size, max_seq_len, prefill_chunk, dtype, device)
    engine = Engine(model, PassManager(user_passes + builtin, dump_dir=dump_graphs), cache,
                    backend or default_backend(torch.device(device)), min(prefill_chunk, max_seq_len))
    if spec is None:
        return engine

    def compile_model(m, role):
        quant = {"draft": draft_quant, "intermediate": intermediate_quant}[role]
        return compile(m, quant=quant, dtype=dtype, device=device, max_seq_len=max_seq_len,
                       batch_size=batch_size, prefill_chunk=prefill_chunk, group_size=group_size,
                       fuse=fuse, backend=backend, quantizer=quantizer if quant else "rtn",
                       calibration=calibration, act_order=act_order and bool(quant))
    return hsd_spec.build(spec, engine, draft, spec_config, compile_model, intermediate)


def _checkpoint_quant(quant, weights, spec, spec_config, schemes) -> str:
    """The scheme a quantized checkpoint runs as (``schemes[0]``, its format's default, unless
    another of ``schemes`` is asked for), checked."""
    if weights is not None:
        raise ValueError("weights= is for a model built on the meta device; a checkpoint path brings its own")
    quant = quant or schemes[0]
    if quant not in schemes or _rotates(quant, spec, spec_config):
        raise ValueError(f"this checkpoint runs as quant={' or '.join(map(repr, schemes))} (its weights as stored), "
                         f"got quant={quant!r}" + (" with QSpec's 4-bit drafts, which need Hadamard-rotated weights "
                                                  "(QSpecConfig(act_bits=8) drafts from these)" if spec == "qspec" else ""))
    return quant


def _rotates(quant, spec, spec_config) -> bool:
    """W4A4 and QSpec's 4-bit drafts run on Hadamard-rotated weights (``RotateHadamard``)."""
    return quant == "w4a4" or (spec == "qspec" and (spec_config or hsd_spec.QSpecConfig()).act_bits == 4)


def _check_quantizer(quantizer, quant, calibration, act_order):
    if quantizer not in QUANTIZERS:
        raise ValueError(f"unknown quantizer {quantizer!r}; known: {', '.join(QUANTIZERS)}")
    if calibration is not None and not isinstance(calibration, torch.Tensor):
        raise TypeError(f"calibration must be a LongTensor of token ids [n, T], got {type(calibration).__name__}")
    if act_order and quantizer != "gptq":
        raise ValueError("act_order is a GPTQ option: use it with quantizer='gptq'")
    if quantizer == "gptq" and (quant is None or not QUANT_SCHEMES[quant].supports_gptq):
        known = ", ".join(n for n, s in QUANT_SCHEMES.items() if s.supports_gptq)
        raise ValueError(f"quantizer='gptq' needs a 4-bit weight scheme (quant= one of {known}), "
                         f"got quant={quant!r}")


def _calibration_ids(model, calibration, tokenizer):
    if calibration is not None:
        return calibration
    if tokenizer is not None:
        return hsd_calibration.text_ids(tokenizer)
    return hsd_calibration.random_ids(model.config)


def _meta_weights(model, weights, quant, dtype, device):
    """Check a meta-device compile request; returns the weights on ``device`` (floats in ``dtype``)
    plus the buffers a checkpoint does not hold (the rotary frequencies, recomputed)."""
    if weights is None or device is None or dtype is None or quant is None:
        raise ValueError("a model on the meta device needs weights=, device=, dtype= and quant= "
                         "(its Linear weights come pre-quantized)")
    rotary = model.model.rotary_emb
    fresh = type(rotary)(config=model.config)
    derived = {f"model.rotary_emb.{name}": b for name, b in fresh.named_buffers()}
    return {name: t.to(device, dtype if t.is_floating_point() and t.element_size() > 1 else t.dtype)  # fp8 stays fp8
            for name, t in {**derived, **weights}.items()}


def _load(model_or_path, dtype):
    if isinstance(model_or_path, torch.nn.Module):
        if not hasattr(model_or_path, "config"):
            raise TypeError("hsd.compile needs a Hugging Face causal LM (a module with a .config)")
        return model_or_path
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(model_or_path, dtype=dtype or "auto")
