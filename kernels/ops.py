"""The ``hsd`` torch ops that passes put into graphs.

Each op is a ``torch.library.custom_op`` with a fake (meta) implementation so dynamo, AOT
autograd and inductor see one opaque node; its real implementation is looked up in the kernel
registry by the device of its inputs (Triton on CUDA, torch reference elsewhere).
"""
from typing import Optional

import torch

from hsd.kernels import act_quant as _act_quant  # noqa: F401  (registers implementations)
from hsd.kernels import attention as _attention  # noqa: F401
from hsd.kernels import hadamard as _hadamard  # noqa: F401
from hsd.kernels import registry
from hsd.kernels import rmsnorm_quant as _rmsnorm_quant  # noqa: F401
from hsd.kernels import scaled_mm as _scaled_mm  # noqa: F401
from hsd.kernels import w4a16 as _w4a16  # noqa: F401
from hsd.kernels import w4a8 as _w4a8  # noqa: F401


@torch.library.custom_op("hsd::w4a16_linear", mutates_args=())
def w4a16_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                 zeros: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                 group_size: int, x_dot_order: bool = False) -> torch.Tensor:
    """x_dot_order: x's columns are in ``hsd.kernels.w4a16.dot_order`` (set by lowering)."""
    return registry.lookup("w4a16_linear", x.device.type)(x, qweight, scales, zeros, bias, group_size,
                                                           x_dot_order=x_dot_order)


@w4a16_linear.register_fake
def _(x, qweight, scales, zeros, bias, group_size, x_dot_order=False):
    return x.new_empty((*x.shape[:-1], scales.shape[1]))


@torch.library.custom_op("hsd::w4a8_linear", mutates_args=())
def w4a8_linear(xq: torch.Tensor, xscale: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                zeros: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                group_size: int, x_dot_order: bool = False) -> torch.Tensor:
    """W4A8 / W4A4: int8 per-token activations (q, scale) times W4A16-format weights.
    x_dot_order: xq's columns are in ``hsd.kernels.w4a8.dot_order`` (set by lowering)."""
    return registry.lookup("w4a8_linear", xq.device.type)(xq, xscale, qweight, scales, zeros, bias,
                                                          group_size, x_dot_order=x_dot_order)


@w4a8_linear.register_fake
def _(xq, xscale, qweight, scales, zeros, bias, group_size, x_dot_order=False):
    return xq.new_empty((*xq.shape[:-1], scales.shape[1]), dtype=scales.dtype)


@torch.library.custom_op("hsd::quantize_per_token", mutates_args=())
def quantize_per_token(x: torch.Tensor, kind: str, dot_order: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """dot_order: q's columns in ``hsd.kernels.w4a8.dot_order`` (set by lowering)."""
    return registry.lookup("quantize_per_token", x.device.type)(x, kind, dot_order)


@quantize_per_token.register_fake
def _(x, kind, dot_order=False):
    dtype, _ = _act_quant.check_kind(kind)
    return x.new_empty(x.shape, dtype=dtype), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("hsd::attention", mutates_args=("k_cache", "v_cache"))
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
              v_cache: torch.Tensor, layer: int, cache_len: torch.Tensor,
              tree_bits: torch.Tensor, scale: float) -> torch.Tensor:
    # graphs hand over q/k/v as transposed views; the kernels want [B, H, T, D] rows (a small copy)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return registry.lookup("attention", q.device.type)(q, k, v, k_cache, v_cache, layer,
                                                       cache_len, tree_bits, scale)


@attention.register_fake
def _(q, k, v, k_cache, v_cache, layer, cache_len, tree_bits, scale):
    return q.new_empty(q.shape)  # contiguous [B, Hq, T, D], whatever q's strides


@torch.library.custom_op("hsd::compact_kv", mutates_args=("k_cache", "v_cache"))
def compact_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, cache_len: torch.Tensor,
               src: torch.Tensor) -> None:
    registry.lookup("compact_kv", k_cache.device.type)(k_cache, v_cache, cache_len, src)


@compact_kv.register_fake
def _(k_cache, v_cache, cache_len, src):
    return None


@torch.library.custom_op("hsd::hadamard", mutates_args=())
def hadamard(x: torch.Tensor) -> torch.Tensor:
    return registry.lookup("hadamard", x.device.type)(x)


@hadamard.register_fake
def _(x):
    _hadamard.split_size(x.shape[-1])  # an unsupported size fails at trace time, naming it
    return x.new_empty(x.shape)


@torch.library.custom_op("hsd::scaled_mm", mutates_args=())
def scaled_mm(xq: torch.Tensor, xscale: torch.Tensor, wq: torch.Tensor, wscale: torch.Tensor,
              bias: Optional[torch.Tensor]) -> torch.Tensor:
    return registry.lookup("scaled_mm", xq.device.type)(xq, xscale, wq, wscale, bias)


@scaled_mm.register_fake
def _(xq, xscale, wq, wscale, bias):
    return xq.new_empty((*xq.shape[:-1], wq.shape[0]), dtype=wscale.dtype)  # output dtype = wscale's


@torch.library.custom_op("hsd::rmsnorm_quant", mutates_args=())
def rmsnorm_quant(x: torch.Tensor, weight: torch.Tensor, eps: float, kind: str,
                  dot_order: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """dot_order: q's columns in ``hsd.kernels.w4a8.dot_order`` (set by lowering)."""
    return registry.lookup("rmsnorm_quant", x.device.type)(x, weight, eps, kind, dot_order)


@rmsnorm_quant.register_fake
def _(x, weight, eps, kind, dot_order=False):
    dtype, _ = _act_quant.check_kind(kind)
    return x.new_empty(x.shape, dtype=dtype), x.new_empty(x.shape[:-1], dtype=torch.float32)
