"""SmoothQuant: move activation outliers into the weights before W8A8 quantization.

Xiao et al.: per input channel j of the Linears that read one RMSNorm's output,
    s_j = max|X_j| ** alpha / max|W_j| ** (1 - alpha)
(max|X_j| over calibration tokens, max|W_j| over the rows of all those Linears). X / s has flatter
channels, W * s absorbs them, and X / s costs nothing: it folds into the RMSNorm weight.
"""
import collections
import weakref

import torch
import torch.fx

from hsd.calibration import linear_inputs
from hsd.capture import is_linear, set_attr
from hsd.passes.base import Pass
from hsd.passes.norm import match_rmsnorm


def activation_absmax(model, input_ids) -> dict:
    """{Linear module name: fp32 [in_features] max |x_j| over the calibration tokens}."""
    stats = {}

    def observe(name, x):
        amax = x.detach().abs().amax(0).float()
        stats[name] = torch.maximum(stats[name], amax) if name in stats else amax
    linear_inputs(model, input_ids, observe)
    return stats


class SmoothQuant(Pass):
    """Matches each captured RMSNorm (``match_rmsnorm``) whose every user is a Linear with a
    get_attr weight and calibration statistics (input_layernorm -> q/k/v, post_attention_layernorm
    -> gate/up; the final norm, read by the graph output, is left alone). Emits nothing new: it
    sets the norm weight to ``weight / s`` and each Linear weight to ``W * s`` (new tensors, shared
    by every step graph; the model's own are never touched), so the float graph computes the same
    function. ``absmax``: ``activation_absmax(model, calibration_ids)``.
    """
    name = "smoothquant"

    def __init__(self, absmax: dict, alpha: float = 0.5):
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"SmoothQuant alpha must lie in [0, 1], got {alpha}")
        self.absmax, self.alpha = absmax, alpha
        # attribute name -> smoothed tensor, shared by the step graphs that hold it. Weak, as in
        # RotateHadamard: once QuantizeLinear has replaced a smoothed weight, its 16-bit copy is
        # freed (a later step graph smooths it again) instead of doubling the model's memory.
        self._done = weakref.WeakValueDictionary()

    def settings(self):
        return {"alpha": self.alpha, "channels": sorted(self.absmax)}

    def __call__(self, gm: torch.fx.GraphModule):
        users = collections.defaultdict(list)
        for node in gm.graph.nodes:
            if is_linear(node):
                users[node.args[0]].append(node)
        for norm, linears in users.items():
            match = match_rmsnorm(norm)
            if match is None or len(norm.users) != len(linears):
                continue
            if all(self._smoothable(gm, n) for n in linears):
                self._smooth(gm, match[1].target, [n.args[1].target for n in linears],
                             [p for n in linears for p in n.meta.get("hsd_parts", [n.meta.get("hsd_module")])])

    def _smoothable(self, gm, node):
        parts = node.meta.get("hsd_parts", [node.meta.get("hsd_module")])
        return node.args[1].op == "get_attr" and all(p in self.absmax for p in parts)

    def _smooth(self, gm, norm_target, weight_targets, parts):
        targets = (norm_target, *weight_targets)
        smoothed = [self._done.get(t) for t in targets]
        if any(t is None for t in smoothed):
            get = gm.get_submodule("").get_buffer
            weights = [get(t) for t in weight_targets]
            x_max = torch.stack([self.absmax[p] for p in parts]).amax(0).double().clamp(min=1e-5)
            w_max = torch.cat(weights).abs().amax(0).double().clamp(min=1e-5)
            s = (x_max.pow(self.alpha) / w_max.pow(1 - self.alpha)).clamp(min=1e-5)
            norm = get(norm_target)
            smoothed = [(norm.double() / s.to(norm.device)).to(norm.dtype),
                        *((w.double() * s.to(w.device)).to(w.dtype) for w in weights)]
            for t, tensor in zip(targets, smoothed):
                self._done[t] = tensor
        for t, tensor in zip(targets, smoothed):
            set_attr(gm, t, tensor)
