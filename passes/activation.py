"""QuantizeActivations: low-precision activations in front of the quantized GEMMs (QSpec drafts)."""
import torch
import torch.fx

from hsd.passes.base import Pass


def quantize_per_token(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric per-token (last-dim) fake quantization to ``bits``-bit integers."""
    top = 2 ** (bits - 1) - 1
    scale = x.abs().amax(-1, keepdim=True).float().clamp(min=1e-8) / top
    return (torch.round(x.float() / scale).clamp(-top - 1, top) * scale).to(x.dtype)


class QuantizeActivations(Pass):
    """Matches the input of every ``hsd::w4a16_linear`` node; emits per-token symmetric
    ``bits``-bit quantization of it (``quantize_per_token``), so the GEMM sees W4A``bits``
    numerics while reading the very same 4-bit weight tensors. On CUDA this is still the W4A16
    kernel after a fused elementwise quantize: it models the accuracy of W4A8/W4A4, not its speed.
    """
    name = "quantize_activations"

    def __init__(self, bits: int = 8):
        if bits not in (4, 8):
            raise ValueError(f"activation bits must be 4 or 8, got {bits}")
        self.bits = bits

    def settings(self):
        return {"bits": self.bits}

    def __call__(self, gm: torch.fx.GraphModule):
        for node in list(gm.graph.nodes):
            if node.op == "call_function" and node.target is torch.ops.hsd.w4a16_linear.default:
                with gm.graph.inserting_before(node):
                    q = gm.graph.call_function(quantize_per_token, (node.args[0], self.bits))
                node.replace_input_with(node.args[0], q)
