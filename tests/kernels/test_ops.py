"""The hsd custom ops' fake kernels agree with their real ones (what inductor relies on)."""
import torch

from hsd.kernels import w4a16
from hsd.kernels.attention import pack_tree_mask


def test_w4a16_linear_opcheck():
    w = torch.randn(48, 64)
    qweight, scales, zeros = w4a16.quantize_rtn(w, 32, symmetric=False)
    args = (torch.randn(2, 3, 64), qweight, scales, zeros, torch.randn(48), 32)
    torch.library.opcheck(torch.ops.hsd.w4a16_linear.default, args)


def test_attention_opcheck():
    b, hq, hkv, t, d, slots = 2, 4, 2, 3, 16, 12
    q = torch.randn(b, t, hq, d).transpose(1, 2)  # strided like the captured graph's q
    k, v = torch.randn(b, hkv, t, d), torch.randn(b, hkv, t, d)
    cache = [torch.randn(2, b, hkv, slots, d) for _ in range(2)]
    args = (q, k, v, *cache, 1, torch.tensor([4, 0], dtype=torch.int32),
            pack_tree_mask(torch.ones(t, t, dtype=torch.bool).tril()), d ** -0.5)
    torch.library.opcheck(torch.ops.hsd.attention.default, args)


def test_w4a8_linear_opcheck():
    from hsd.kernels.act_quant import quantize_per_token_reference
    qweight, scales, zeros = w4a16.quantize_rtn(torch.randn(48, 64), 32, symmetric=False)
    xq, xscale = quantize_per_token_reference(torch.randn(2, 3, 64), "int4")
    args = (xq, xscale, qweight, scales.half(), zeros.half(), torch.randn(48).half(), 32)
    torch.library.opcheck(torch.ops.hsd.w4a8_linear.default, args)
