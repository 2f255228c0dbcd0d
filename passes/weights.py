"""LoadWeights: fill a graph captured from a meta-device skeleton with real tensors."""
import torch
import torch.fx

from hsd.capture import set_attr
from hsd.passes.base import Pass


class LoadWeights(Pass):
    """Matches every graph attribute still on the meta device whose name (the Hugging Face
    parameter name, e.g. ``model.norm.weight``) is in ``weights``; emits the same attribute
    holding that tensor on ``device`` (floating tensors cast to ``dtype``). Linear weights
    absent from ``weights`` stay on meta: ``QuantizeLinear`` builds them from pre-quantized
    entries (``<module>.qweight``, ``.scales``, ``.zeros``), so 16-bit copies never exist.
    """
    name = "load_weights"

    def __init__(self, weights: dict, device, dtype):
        self.weights, self.device, self.dtype = weights, torch.device(device), dtype

    def settings(self):
        return {"names": hash(tuple(sorted(self.weights))), "dtype": str(self.dtype)}

    def __call__(self, gm: torch.fx.GraphModule):
        for name, buffer in list(gm.named_buffers()):
            if buffer.is_meta and name in self.weights:
                value = self.weights[name]
                if value.shape != buffer.shape:
                    raise ValueError(f"{name}: checkpoint tensor {tuple(value.shape)} != model {tuple(buffer.shape)}")
                dtype = self.dtype if value.is_floating_point() and buffer.is_floating_point() else value.dtype
                set_attr(gm, name, value.to(self.device, dtype))


def check_materialised(gm: torch.fx.GraphModule):
    missing = [name for name, b in gm.named_buffers() if b.is_meta]
    if missing:
        raise ValueError(f"no weights were given for {len(missing)} tensors of the meta-device model, "
                         f"e.g. {', '.join(missing[:4])}")
