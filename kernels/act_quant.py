"""Per-token dynamic activation quantization: x [..., K] -> (q, scale), x ~ q * scale[..., None].

Kinds (symmetric, one fp32 scale per token, scale = max|x| / top):
  "int8"  q int8 in -127..127
  "int4"  q int8 in -7..7: Hopper has no int4 MMA, so 4-bit activations travel in int8
          registers and run on the int8 MMA (their speed is W4A8's; their accuracy is 4-bit's)
  "fp8"   q float8_e4m3fn, |q| <= 448
The GEMMs of the W8A8 / W4A8 / W4A4 / FP8 schemes take (q, scale) and apply the scale in their
epilogue. This file holds the torch reference; CUDA kernels register themselves beside it.
"""
import torch

from hsd.kernels import registry

KINDS = {"int8": (torch.int8, 127.0), "int4": (torch.int8, 7.0), "fp8": (torch.float8_e4m3fn, 448.0)}


def check_kind(kind: str):
    if kind not in KINDS:
        raise ValueError(f"unknown activation quantization {kind!r}; known: {', '.join(KINDS)}")
    return KINDS[kind]


@registry.register("quantize_per_token", "cpu", "reference")
def quantize_per_token_reference(x: torch.Tensor, kind: str):
    dtype, top = check_kind(kind)
    scale = x.float().abs().amax(-1).clamp(min=1e-8) / top
    q = x.float() / scale[..., None]
    if dtype == torch.int8:
        q = torch.round(q).clamp(-top, top)
    return q.to(dtype), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale[..., None]
