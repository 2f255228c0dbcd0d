"""GPTQ (Frantar et al., 2022): 4-bit weights that minimise the layer's output error on data.

For a Linear y = x W^T with calibration inputs X [n, K], GPTQ quantizes W column by column (along
K) and spreads each column's rounding error over the columns not yet quantized, weighted by the
inverse Hessian of the layer's squared output error, H = 2/n X^T X. It works on the Cholesky
factor of H^-1 (numerically stable, one factorisation per Linear) and applies the updates lazily
in blocks of 128 columns so most of the work is one matrix product per block.

The result is exactly what ``hsd.kernels.w4a16.quantize_rtn`` returns (qweight, scales, zeros in
the GPTQ layout), on the same 4-bit grid (``w4a16.grid`` / ``w4a16.to_grid``): every 4-bit
scheme reads it unchanged. Group scales are computed on the error-updated weights when the
loop reaches the group's first column. With ``act_order`` (GPTQ's desc_act) columns are visited
in order of decreasing Hessian diagonal, and the grid of every group is fixed up front from the
weights before any update ("static groups"), so group g still covers the K rows g*G .. (g+1)*G:
the plain layout, no g_idx permutation.

The Hessians come from the float model (``hessians``: one eager pass over the calibration
tokens through ``hsd.calibration.linear_inputs``), so every layer is calibrated on float inputs,
not on the outputs of the already-quantized layers before it. Re-calibrating layer by layer on
the quantized model's activations (what GPTQ's reference implementation does) is a possible
upgrade that needs the model run in pieces.
"""
import torch

from hsd import calibration
from hsd.kernels import w4a16

PERCDAMP = 0.01  # dampening added to H's diagonal, as a fraction of its mean
BLOCK = 128      # columns per lazy update


def hessians(model, input_ids: torch.Tensor, include_lm_head: bool = False, dtype=torch.float32,
             batch: int = 1) -> dict:
    """{Linear module name: H = 2/n sum x x^T [K, K] in ``dtype``} over the inputs the float
    ``model`` shows each Linear on ``input_ids`` [n, T], accumulated on the model's device.
    Linears reading the very same tensor (q/k/v, gate/up: the ones FuseSiblingLinears fuses)
    share one accumulator, so their Hessian is computed once and is one tensor object."""
    sums, counts, owner = {}, {}, {}
    last = [None, None]  # (owner, input) of the previous call; holding the input keeps its memory

    def observe(name, x):
        prev_owner, prev_x = last
        shared = prev_x is not None and _same_tensor(x, prev_x)
        key = prev_owner if shared else name
        if owner.setdefault(name, key) != key:
            raise RuntimeError(f"{name}: shares its input with {key} on one batch but not another")
        last[:] = key, x
        if key == name:
            if name not in sums:
                sums[name] = torch.zeros(x.shape[-1], x.shape[-1], dtype=dtype, device=x.device)
                counts[name] = 0
            x = x.to(dtype)
            sums[name].addmm_(x.t(), x)
            counts[name] += x.shape[0]

    calibration.linear_inputs(model, input_ids, observe, batch=batch, include_lm_head=include_lm_head)
    for name, s in sums.items():
        s.mul_(2 / max(counts[name], 1))
    return {name: sums[key] for name, key in owner.items()}


def _same_tensor(a, b) -> bool:
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype and a.device == b.device)


def _inverse_cholesky(h: torch.Tensor, percdamp: float, name: str) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp I)^-1, in fp64 (H's condition number can be large)."""
    h = h.to(torch.float64, copy=True)
    h.diagonal().add_(percdamp * h.diagonal().mean())
    try:
        return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except torch.linalg.LinAlgError as e:
        raise ValueError(f"{name}: GPTQ Hessian is not positive definite after dampening "
                         f"(percdamp={percdamp}); raise percdamp or use more calibration data") from e


def gptq(w: torch.Tensor, hessian: torch.Tensor, group_size: int = 128, symmetric: bool = True,
         act_order: bool = False, percdamp: float = PERCDAMP, block: int = BLOCK, name: str = "linear"):
    """GPTQ 4-bit quantization of a [N, K] weight for inputs with Hessian ``hessian`` [K, K].
    Returns (qweight, scales, zeros) exactly as ``w4a16.quantize_rtn`` does (scales and zeros in
    w's dtype; group_size -1: one group per output channel). ``name`` labels errors."""
    n, k = w.shape
    g = w4a16.group_length(k, group_size)
    if hessian.shape != (k, k):
        raise ValueError(f"{name}: Hessian {tuple(hessian.shape)} does not fit the weight {tuple(w.shape)}")
    if not hessian.is_floating_point() or not w.is_floating_point():
        raise TypeError(f"{name}: GPTQ needs float weight and Hessian, got {w.dtype} and {hessian.dtype}")
    work = w.detach().to(torch.float32, copy=True)
    h = hessian.to(work.device, copy=True)
    dead = h.diagonal() == 0  # inputs that were always zero: their weights cannot matter
    h[dead, dead] = 1
    work[:, dead] = 0
    scale = torch.empty(n, k // g, device=work.device)
    zero = torch.empty_like(scale)
    if act_order:
        scale[:], zero[:] = w4a16.grid(work.reshape(n, k // g, g), symmetric)
        order = torch.argsort(h.diagonal(), descending=True)
    else:
        order = torch.arange(k, device=work.device)
    work, h = work[:, order], h[order][:, order]
    u = _inverse_cholesky(h, percdamp, name).to(torch.float32)
    q = _quantize_columns(work, u, order.tolist(), g, scale, zero, symmetric, not act_order, block)
    return w4a16.pack_quantized(q[:, torch.argsort(order)], scale, zero, w.dtype, symmetric)


def _quantize_columns(work, u, columns, g, scale, zero, symmetric, dynamic_groups, block):
    """The GPTQ loop over ``work``'s columns (already in visiting order; ``columns[j]`` is the
    original index of column j) with the upper Cholesky factor ``u`` of H^-1. Fills ``scale``
    and ``zero`` at each group's first column when ``dynamic_groups``. Returns the grid ints."""
    n, k = work.shape
    q = torch.empty_like(work)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1, u1 = work[:, i1:i2], u[i1:i2, i1:i2]  # views: updates land in work
        err = torch.zeros(n, i2 - i1, device=work.device)
        for i in range(i2 - i1):
            col = columns[i1 + i]
            if dynamic_groups and col % g == 0:
                current = _group_now(work, u, err, i1, i, i2, g)
                scale[:, col // g], zero[:, col // g] = w4a16.grid(current, symmetric)
            s, z = scale[:, col // g], zero[:, col // g]
            q[:, i1 + i] = w4a16.to_grid(w1[:, i], s, z)
            err[:, i] = (w1[:, i] - (q[:, i1 + i] - z) * s) / u1[i, i]
            w1[:, i:] -= err[:, i, None] * u1[i, i:]
        work[:, i2:] -= err @ u[i1:i2, i2:]
    return q


def _group_now(work, u, err, i1, i, i2, g):
    """Columns i1 + i .. i1 + i + g as they stand now: inside the block they are up to date,
    past it they still lack this block's lazy update (added here, without writing it back)."""
    inside = work[:, i1 + i:min(i1 + i + g, i2)]
    end = i1 + i + g
    if end <= i2:
        return inside
    beyond = work[:, i2:end] - err[:, :i] @ u[i1:i1 + i, i2:end]
    return torch.cat([inside, beyond], 1)
