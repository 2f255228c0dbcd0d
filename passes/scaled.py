"""W8A8 and FP8: 8-bit per-channel weights times 8-bit per-token activations (``hsd::scaled_mm``).

Both quantize each Linear weight per output channel, round-to-nearest (``scaled_mm.quantize_weight``:
int8 in -127..127, or float8_e4m3fn), and emit ``hsd::quantize_per_token(x, kind)`` followed by
``hsd::scaled_mm(xq, xscale, wq, wscale, bias)``; ``FuseRMSNormQuant`` later folds the
quantization of a normed hidden state into the RMSNorm. ``hsd.compile(quant="w8a8")`` also runs
``SmoothQuant`` first. Neither scheme has groups: ``group_size`` is ignored.
"""
import torch

from hsd.kernels import scaled_mm
from hsd.passes.linear import Scheme, quantize_input, register_scheme


class W8A8(Scheme):
    """int8 weights (per output channel) x int8 activations (per token), int32 accumulation."""
    name = "w8a8"
    kind = "int8"
    tensors = ("wq", "wscale")
    smoothquant = True  # hsd.compile runs SmoothQuant before quantizing

    def quantize(self, w, group_size, symmetric):
        return scaled_mm.quantize_weight(w, self.kind)

    def load(self, parts, prequantized, w):
        """Pre-quantized wq / wscale of each (fused) part, concatenated along N."""
        wq, wscale = (torch.cat([prequantized[f"{p}.{t}"] for p in parts], 0) for t in self.tensors)
        if wq.shape != w.shape or wq.dtype != scaled_mm.check_kind(self.kind)[0] or wscale.shape != (w.shape[0],):
            raise ValueError(f"{'+'.join(parts)}: wq {wq.dtype} {tuple(wq.shape)}, wscale {tuple(wscale.shape)} "
                             f"do not fit a {self.kind} [{w.shape[0]}, {w.shape[1]}] weight")
        return wq, wscale

    def emit(self, graph, x, attrs, bias, tensors):
        xq, xscale = quantize_input(graph, x, self.kind)
        return graph.call_function(torch.ops.hsd.scaled_mm.default,
                                   (xq, xscale, attrs["wq"], attrs["wscale"], bias))


class FP8(W8A8):
    """float8_e4m3fn weights (per output channel) x e4m3 activations (per token), fp32
    accumulation. CUDA needs compute capability 8.9+ (Ada, Hopper); the CPU runs the reference."""
    name = "fp8"
    kind = "fp8"
    smoothquant = False  # e4m3's range holds the activation outliers

    def check_device(self, device):
        device = torch.device(device)
        if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
            major, minor = torch.cuda.get_device_capability(device)
            raise ValueError(f"quant 'fp8' needs a GPU of compute capability 8.9 or newer (Ada, Hopper) "
                             f"for e4m3 tensor cores; {torch.cuda.get_device_name(device)} is {major}.{minor}: "
                             "use quant='w8a8'")


register_scheme(W8A8())
register_scheme(FP8())
