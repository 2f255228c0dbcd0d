"""Pre-quantized checkpoints users bring, into hsd's layouts: GPTQ (AutoGPTQ / GPTQModel, "gptq"
and "gptq_v2" formats) and compressed-tensors (llm-compressor) "pack-quantized" W4A16, plus its
8-bit "int-quantized" W8A8 and "float-quantized" FP8 with dynamic per-token activations.

``hsd.compile(path)`` calls ``load`` when the checkpoint's config.json has a
``quantization_config`` (or the directory a quantize_config.json). It returns a model skeleton on
the meta device and the tensors by Hugging Face name, which compile through the meta-device path:
no Linear is ever dequantized, so a 70B W4A16 checkpoint loads in its 4-bit size.

Per Linear (N outputs, K inputs, group size G), GPTQ holds
  qweight int32 [K // 8, N]      nibble i of word r is k = 8 r + i: hsd's layout, taken as is
  qzeros  int32 [K // G, N // 8] nibble j of word c is column 8 c + j; "gptq" (v1) stores zero - 1
  scales  [K // G, N]
  g_idx   int32 [K]              group of each k
and compressed-tensors
  weight_packed     int32 [N, K // 8]  the same nibbles per row (value + 8), so hsd's qweight is
                                       its transpose
  weight_scale      [N, K // G]
  weight_zero_point int32 [N // 8, K // G] (asymmetric only) nibbles along N, zero + 8
  weight_g_idx      int32 [K]          (act-order only)
and for 8 bits, per output channel: weight int8 or float8_e4m3fn [N, K] (hsd's wq) and
weight_scale [N, 1] (hsd's wscale, in the model's dtype).
A permuted group index (act-order without static groups) is sorted away: the K rows are reordered
so each group is contiguous (what hsd's kernels read) and the Linear keeps the permutation
(``<name>.perm``), by which its op gathers x. A quantized lm_head is dequantized (hsd keeps the
lm_head 16-bit); another Linear the checkpoint keeps in 16 bits is quantized round-to-nearest by
QuantizeLinear, like any float Linear.
"""
import json
import pathlib

import torch

from hsd.kernels import w4a16

GPTQ_FORMATS = ("gptq", "gptq_v2")
W4_SCHEMES = ("w4a16", "w4a8")   # the 4-bit weights as stored (W4A4 wants them Hadamard-rotated)
QUANTIZED_SUFFIXES = (".qweight", ".qzeros", ".scales", ".g_idx", ".weight_packed", ".weight_scale",
                      ".weight_zero_point", ".weight_g_idx", ".weight_shape", ".input_scale")


def quantization_config(path) -> dict | None:
    """The checkpoint's quantization settings, or None for a plain 16-bit checkpoint."""
    path = pathlib.Path(path)
    config = path / "config.json"
    settings = json.loads(config.read_text()).get("quantization_config") if config.is_file() else None
    legacy = path / "quantize_config.json"
    if settings is None and legacy.is_file():
        settings = {"quant_method": "gptq", **json.loads(legacy.read_text())}
    return settings


def default_dtype(path) -> torch.dtype:
    """The checkpoint's 16-bit dtype (config.json's torch_dtype / dtype), fp16 if it names none."""
    config = json.loads((pathlib.Path(path) / "config.json").read_text())
    name = config.get("torch_dtype") or config.get("dtype")
    return torch.bfloat16 if name == "bfloat16" else torch.float16


def check(settings: dict) -> tuple:
    """-> (the quant schemes it runs as, the default first; group size, -1 for per channel; a
    reader of one Linear's tensors); ValueError for what hsd cannot load."""
    method = settings.get("quant_method", "gptq")
    if method == "gptq":
        bits, fmt = settings.get("bits"), settings.get("checkpoint_format", "gptq")
        if bits == 4 and fmt in GPTQ_FORMATS:
            return W4_SCHEMES, settings.get("group_size", 128), lambda *a: _gptq_linear(*a, v1=fmt == "gptq")
        found = f"bits={bits!r}, checkpoint_format={fmt!r}"
    elif method == "compressed-tensors":
        groups = list(settings.get("config_groups", {}).values())
        weights = groups[0].get("weights") or {} if len(groups) == 1 else {}
        acts = groups[0].get("input_activations") if len(groups) == 1 else None
        strategy, fmt = weights.get("strategy"), settings.get("format")
        if (fmt == "pack-quantized" and weights.get("num_bits") == 4 and weights.get("type") == "int"
                and strategy in ("group", "channel") and acts is None):
            return W4_SCHEMES, weights.get("group_size") if strategy == "group" else -1, _compressed_linear
        kind = {"int-quantized": "int", "float-quantized": "float"}.get(fmt)
        if (kind and weights.get("num_bits") == 8 and weights.get("type") == kind and strategy == "channel"
                and weights.get("symmetric", True) and acts is not None and acts.get("num_bits") == 8
                and acts.get("type") == kind and acts.get("strategy") == "token" and acts.get("dynamic")
                and acts.get("symmetric", True)):
            return ("w8a8",) if kind == "int" else ("fp8",), -1, _eight_bit_linear
        found = f"format={fmt!r}, config_groups={settings.get('config_groups')!r}"
    else:
        found = f"quant_method={method!r}"
    raise ValueError("hsd loads GPTQ checkpoints (bits 4, checkpoint_format " + " or ".join(GPTQ_FORMATS) + ") and "
                     "compressed-tensors ones with one config group: pack-quantized (4-bit int weights by group or "
                     "channel, no activation quantization), int-quantized / float-quantized (symmetric 8-bit "
                     f"weights by channel, dynamic symmetric 8-bit activations by token); this one has {found}")


def load(path, checked=None) -> tuple:
    """-> (model skeleton on the meta device, {name: tensor} on the CPU, group size or -1).
    ``checked``: what ``check`` returned for this checkpoint, if the caller has it already."""
    from transformers import AutoConfig, AutoModelForCausalLM
    _, group_size, read_linear = checked or check(quantization_config(path))
    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config          # the skeleton is a plain model; hsd quantizes it
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    raw = read_safetensors(path)
    weights = {}
    for name, module in skeleton.named_modules():
        tensors = read_linear(raw, name, module, group_size) if isinstance(module, torch.nn.Linear) else None
        if tensors is None:
            continue
        if isinstance(tensors, dict):    # 8 bits: already named as the scheme names them
            weights.update(tensors)
        elif name == "lm_head":   # in fp32: the 16-bit copy is rounded once, to the model's dtype
            qweight, scales, zeros, perm = tensors
            w = w4a16.dequantize(qweight, scales.float(), None if zeros is None else zeros.float(),
                                 qweight.shape[0] * 8 // scales.shape[0])
            weights["lm_head.weight"] = w if perm is None else w[:, torch.argsort(perm)]
        else:
            weights.update({f"{name}.{t}": v for t, v in zip(("qweight", "scales", "zeros", "perm"), tensors)
                            if v is not None})
        _bias(raw, weights, name, module)
    stray = sorted(n for n in raw if n.endswith(QUANTIZED_SUFFIXES))
    if stray:
        raise ValueError(f"{path}: quantized tensors of modules the model's config does not have: {', '.join(stray[:4])}")
    known = dict(skeleton.named_parameters())
    weights.update({name: t for name, t in raw.items() if name in known})
    if config.tie_word_embeddings and "lm_head.weight" not in weights and "model.embed_tokens.weight" in weights:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    return skeleton, weights, group_size


def read_safetensors(path) -> dict:
    """Every tensor of the checkpoint's safetensors files (sharded or not), on the CPU."""
    from safetensors.torch import load_file
    files = sorted(pathlib.Path(path).glob("*.safetensors"))
    if not files:
        raise ValueError(f"{path}: no .safetensors files (hsd reads quantized checkpoints in safetensors only)")
    tensors = {}
    for f in files:
        tensors.update(load_file(f))
    return tensors


def _gptq_linear(raw, name, module, group_size, v1: bool):
    """(qweight, scales, zeros or None, perm or None) of one GPTQ Linear, checked; None if it is
    not quantized."""
    if f"{name}.qweight" not in raw:
        return None
    n, k, g = _dims(module, group_size)
    qweight, qzeros, scales = (raw.pop(f"{name}.{t}") for t in ("qweight", "qzeros", "scales"))
    if qweight.shape != (k // 8, n) or scales.shape != (k // g, n) or qzeros.shape != (k // g, -(-n // 8)):
        raise ValueError(f"{name}: GPTQ tensors qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)}, "
                         f"scales {tuple(scales.shape)} do not fit a [{n}, {k}] Linear with group size {g}")
    qweight, perm = _contiguous_groups(qweight, raw.pop(f"{name}.g_idx", None), name, k, g)
    zeros = w4a16.unpack(qzeros.t().contiguous()).t()[:, :n] + (1 if v1 else 0)
    return qweight, scales, _float_zeros(zeros, scales.dtype), perm


def _compressed_linear(raw, name, module, group_size):
    """The same from a compressed-tensors pack-quantized Linear."""
    if f"{name}.weight_packed" not in raw:
        return None
    n, k, g = _dims(module, group_size)
    packed, scale = raw.pop(f"{name}.weight_packed"), raw.pop(f"{name}.weight_scale")
    zero_point, shape = raw.pop(f"{name}.weight_zero_point", None), raw.pop(f"{name}.weight_shape", None)
    if packed.shape != (n, k // 8) or scale.shape != (n, k // g) or (shape is not None and shape.tolist() != [n, k]) \
            or (zero_point is not None and zero_point.shape != (-(-n // 8), k // g)):
        raise ValueError(f"{name}: compressed-tensors tensors weight_packed {tuple(packed.shape)}, weight_scale "
                         f"{tuple(scale.shape)} do not fit a [{n}, {k}] Linear with group size {g}")
    qweight, perm = _contiguous_groups(packed.t().contiguous(), raw.pop(f"{name}.weight_g_idx", None), name, k, g)
    zeros = None if zero_point is None else w4a16.unpack(zero_point)[:n].t()
    return qweight, scale.t().contiguous(), None if zeros is None else _float_zeros(zeros, scale.dtype), perm


def _eight_bit_linear(raw, name, module, group_size):
    """{<name>.wq, <name>.wscale} of a compressed-tensors 8-bit Linear (or its dequantized
    lm_head.weight); None if it is not quantized."""
    w = raw.get(f"{name}.weight")
    if w is None or w.dtype not in (torch.int8, torch.float8_e4m3fn):
        return None
    del raw[f"{name}.weight"]
    scale = raw.pop(f"{name}.weight_scale", None)
    n, k = module.out_features, module.in_features
    if w.shape != (n, k) or scale is None or scale.numel() != n:
        raise ValueError(f"{name}: 8-bit weight {tuple(w.shape)} with weight_scale "
                         f"{None if scale is None else tuple(scale.shape)} does not fit a [{n}, {k}] Linear")
    scale = scale.reshape(n)
    if name == "lm_head":
        return {"lm_head.weight": w.float() * scale.float()[:, None]}
    return {f"{name}.wq": w, f"{name}.wscale": scale}


def _dims(module, group_size):
    n, k = module.out_features, module.in_features
    g = k if group_size in (None, -1) else group_size
    if k % g:
        raise ValueError(f"in_features {k} is not divisible by the checkpoint's group size {g}")
    return n, k, g


def _contiguous_groups(qweight, g_idx, name, k, g):
    """-> (qweight with its K rows sorted by group, the permutation or None if already sorted)."""
    groups = torch.arange(k) // g
    if g_idx is None or torch.equal(g_idx.long(), groups):
        return qweight, None
    perm = torch.argsort(g_idx.long(), stable=True)
    if not torch.equal(g_idx.long()[perm], groups):
        raise ValueError(f"{name}: g_idx does not give each of the {k // g} groups {g} rows of K")
    return w4a16.pack(w4a16.unpack(qweight)[perm]), perm


def _float_zeros(zeros, dtype):
    """Integer zero points [K // G, N] -> floats, or None where all are the symmetric 8."""
    return None if bool((zeros == w4a16.SYMMETRIC_ZERO).all()) else zeros.to(dtype).contiguous()


def _bias(raw, weights, name, module):
    """Exporters may store an all-zero bias for a Linear without one: drop it; refuse any other."""
    bias = raw.pop(f"{name}.bias", None)
    if bias is None:
        return
    if module.bias is not None:
        weights[f"{name}.bias"] = bias
    elif bool(bias.any()):
        raise ValueError(f"{name}: the checkpoint has a nonzero bias, but the model's config gives this Linear none")
