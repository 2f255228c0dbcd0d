"""4-bit GPTQ checkpoints (AutoGPTQ / GPTQModel, "gptq" and "gptq_v2" formats) into hsd's W4 layout.

``hsd.compile(path)`` calls ``load`` when the checkpoint's config.json has a
``quantization_config`` (or the directory a quantize_config.json). It returns a model skeleton on
the meta device and the tensors by Hugging Face name, which compile through the meta-device path:
no Linear is ever dequantized, so a 70B W4A16 checkpoint loads in its 4-bit size.

Per Linear the checkpoint holds (N outputs, K inputs, group size G):
  qweight int32 [K // 8, N]      nibble i of word r is k = 8 r + i: hsd's layout, taken as is
  qzeros  int32 [K // G, N // 8] nibble j of word c is column 8 c + j; "gptq" (v1) stores zero - 1
  scales  [K // G, N]
  g_idx   int32 [K]              group of each k: must be k // G (act-order without static groups
                                 permutes it; refused, hsd's kernels read contiguous groups)
A quantized lm_head is dequantized (hsd keeps the lm_head 16-bit).
"""
import json
import pathlib

import torch

from hsd.kernels import w4a16

FORMATS = ("gptq", "gptq_v2")


def quantization_config(path) -> dict | None:
    """The checkpoint's quantization settings, or None for a plain 16-bit checkpoint."""
    path = pathlib.Path(path)
    config = path / "config.json"
    settings = json.loads(config.read_text()).get("quantization_config") if config.is_file() else None
    legacy = path / "quantize_config.json"
    if settings is None and legacy.is_file():
        settings = {"quant_method": "gptq", **json.loads(legacy.read_text())}
    return settings


def check(settings: dict) -> tuple:
    """-> (group size, -1 for per channel; checkpoint format); ValueError for what hsd cannot load."""
    method, bits = settings.get("quant_method", "gptq"), settings.get("bits")
    fmt = settings.get("checkpoint_format", "gptq")
    if method != "gptq" or bits != 4 or fmt not in FORMATS:
        raise ValueError(f"hsd loads 4-bit GPTQ checkpoints (quant_method 'gptq', bits 4, checkpoint_format "
                         f"{' or '.join(FORMATS)}); this one has quant_method={method!r}, bits={bits!r}, "
                         f"checkpoint_format={fmt!r}")
    return settings.get("group_size", 128), fmt


def load(path, device, dtype) -> tuple:
    """-> (model skeleton on the meta device, {name: tensor} on the CPU, group size or -1)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    group_size, fmt = check(quantization_config(path))
    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config          # the skeleton is a plain model; hsd quantizes it
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    raw = read_safetensors(path)
    weights = {}
    for name, module in skeleton.named_modules():
        if isinstance(module, torch.nn.Linear) and f"{name}.qweight" in raw:
            tensors = _linear(raw, name, module, group_size, fmt)
            if name == "lm_head":   # in fp32: the 16-bit copy is rounded once, to the model's dtype
                qweight, scales, zeros = tensors
                weights["lm_head.weight"] = w4a16.dequantize(
                    qweight, scales.float(), None if zeros is None else zeros.float(),
                    qweight.shape[0] * 8 // scales.shape[0])
            else:
                weights.update({f"{name}.{t}": v for t, v in zip(("qweight", "scales", "zeros"), tensors) if v is not None})
            _bias(raw, weights, name, module)
    stray = sorted(n for n in raw if n.endswith((".qweight", ".qzeros", ".scales", ".g_idx")))
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
        raise ValueError(f"{path}: no .safetensors files (hsd reads GPTQ checkpoints in safetensors only)")
    tensors = {}
    for f in files:
        tensors.update(load_file(f))
    return tensors


def _linear(raw, name, module, group_size, fmt):
    """(qweight, scales, zeros or None) of one Linear, checked against its shape."""
    n, k = module.out_features, module.in_features
    g = k if group_size in (None, -1) else group_size
    qweight, qzeros, scales = (raw.pop(f"{name}.{t}") for t in ("qweight", "qzeros", "scales"))
    if k % g or qweight.shape != (k // 8, n) or scales.shape != (k // g, n) or qzeros.shape != (k // g, -(-n // 8)):
        raise ValueError(f"{name}: GPTQ tensors qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)}, "
                         f"scales {tuple(scales.shape)} do not fit a [{n}, {k}] Linear with group size {g}")
    g_idx = raw.pop(f"{name}.g_idx", None)
    if g_idx is not None and not torch.equal(g_idx.long(), torch.arange(k) // g):
        raise ValueError(f"{name}: g_idx is permuted (desc_act / act-order without static_groups); hsd's kernels "
                         "read contiguous groups: quantize with static_groups=True or desc_act=False")
    zeros = w4a16.unpack(qzeros.t().contiguous()).t()[:, :n] + (1 if fmt == "gptq" else 0)
    zeros = None if bool((zeros == w4a16.SYMMETRIC_ZERO).all()) else zeros.to(scales.dtype)
    return qweight, scales, zeros


def _bias(raw, weights, name, module):
    """GPTQ exporters may store an all-zero bias for a Linear without one: drop it; refuse any other."""
    bias = raw.pop(f"{name}.bias", None)
    if bias is None:
        return
    if module.bias is not None:
        weights[f"{name}.bias"] = bias
    elif bool(bias.any()):
        raise ValueError(f"{name}: the checkpoint has a nonzero bias, but the model's config gives this Linear none")
