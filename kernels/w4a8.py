"""W4A8 / W4A4 GEMM on the int8 tensor cores: y = (xq * xscale) @ dequant(W).T + b.

Weights: exactly the W4A16 format (``hsd.kernels.w4a16``'s docstring: GPTQ layout, qweight int32
[K // 8, N], scales [K // G, N], zeros [K // G, N] or None = 8), so one stored tensor serves the
W4A16, W4A8 and W4A4 kernels (QSpec drafts and verifies from the same weights). Zero points must
hold integers (round-to-nearest and GPTQ write integers).
Activations: per-token int8 from ``hsd::quantize_per_token`` (``hsd.kernels.act_quant``): kind
"int8" (-127..127) or "int4" (-7..7, still int8 in memory). Hopper has no int4 MMA, so W4A4 runs
this very kernel: it costs what W4A8 costs, only its accuracy differs.

The math, per tile of BLOCK_K rows of K (BLOCK_K = G; per-channel G = K: a multiple of 32):
    part[m, n] = -zero[g, n] * sum_k xq[m, k]          the zero point: seeds the int32 accumulator
    part      += sum_k xq[m, k] * q[k, n]              int8 x int8 -> int32 MMA, q = nibble 0..15
    acc       += part * scale[g, n]                    fp32, the per-group ("second-level") scale
    y          = acc * xscale[m] + bias
So the zero point never touches the BLOCK_K x BLOCK_N weights, only the BLOCK_M x BLOCK_N partial
product. With per-channel scales the whole K sums in int32 (|sum| <= 127 * 15 * K fits for
K < 1.1M) and is scaled once at the end. Small M splits K over programs that add into y
atomically (as W4A16); BLOCK_M = 16 serves M = 1 too (the MMA is not the cost, unpacking is).

Unpacking: the weights are loaded as bytes, 16 per thread per load. A 32-bit register of 4 bytes
becomes 4 low nibbles (one AND) and 4 high nibbles (one shift, one AND) that are directly int8
MMA operand bytes (inline PTX on the GPU; the interpreter does the same per byte). The low
nibbles hold k = 8 r + 2 j, the high ones 8 r + 2 j + 1: two dots, against the even and the odd
columns of x. On CUDA hsd's lowering has the quantization store x with those halves apart
(``dot_order``, X_DOT_ORDER), so each dot loads its half straight into the operand instead of
splitting a tile in registers (H100, 8B layer: -7% at M = 32..128; benchmarks/results/README.md).
sass_stats-style check: ``benchmarks/sass_w4a8.py [--dot-order]`` (no GPU needed).
"""
import functools

import torch
import triton
import triton.language as tl

from hsd.kernels import registry, tuning, w4a16
from hsd.kernels.w4a16 import DOT_BLOCK, _dot_order_base, _k_range, _load_tile, _write, check_dot_order


def dot_order(xq: torch.Tensor) -> torch.Tensor:
    """xq [..., K] (K a multiple of 128) with its columns in the order the kernel's 2 dots read
    them: within each block of 128, column 64 a + r holds k = 2 r + a (the even k first, then
    the odd). Each dot then loads one contiguous slice of x, straight into its operand, instead
    of splitting a tile in registers. ``hsd::quantize_per_token`` and ``hsd::rmsnorm_quant``
    write this order themselves when hsd's lowering asks them to."""
    return xq.unflatten(-1, (-1, DOT_BLOCK // 2, 2)).movedim(-1, -2).flatten(-3)


def natural_order(xq: torch.Tensor) -> torch.Tensor:
    """The inverse of ``dot_order``."""
    return xq.unflatten(-1, (-1, 2, DOT_BLOCK // 2)).movedim(-2, -1).flatten(-3)


def reads_dot_order(k: int, group_size: int) -> bool:
    """Can the kernel read activations in ``dot_order`` for these weights? K a multiple of 128
    and K tiles of 64 or 128 columns: groups of that size, or per channel (tiles of 128)."""
    return k % DOT_BLOCK == 0 and (group_size == k or group_size in (64, 128))


def w4a8_linear_reference(xq, xscale, qweight, scales, zeros, bias, group_size: int,
                          x_dot_order: bool = False):
    """The kernel's function in fp32: dequantized activations times dequantized weights."""
    if x_dot_order:
        xq = natural_order(xq)
    x = xq.float() * xscale.float()[..., None]
    w = w4a16.dequantize(qweight, scales.float(), None if zeros is None else zeros.float(), group_size)
    y = torch.nn.functional.linear(x, w, None if bias is None else bias.float())
    return y.to(scales.dtype)


registry.register("w4a8_linear", "cpu", "reference")(w4a8_linear_reference)


@triton.jit
def _load_bytes(qw_ptr, k0, K, N, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The packed words of rows k0 .. k0 + BLOCK_K, columns of this program, as bytes
    [BLOCK_K // 8, BLOCK_N, 4]: byte j of word (r, n) holds nibbles 2 j (low) and 2 j + 1
    (high), i.e. k = 8 r + 2 j and 8 r + 2 j + 1. Loaded as rows of 4 BLOCK_N contiguous bytes,
    so the loads are 16 bytes wide."""
    rows = k0 // 8 + tl.arange(0, BLOCK_K // 8)
    cols = tl.program_id(1) * BLOCK_N * 4 + tl.arange(0, BLOCK_N * 4)
    mask = (rows < K // 8)[:, None] & (cols < N * 4)[None, :]
    b = tl.load(qw_ptr.to(tl.pointer_type(tl.int8)) + rows[:, None] * (N * 4) + cols[None, :],
                mask=mask, other=0)
    return tl.reshape(b, (BLOCK_K // 8, BLOCK_N, 4))


@triton.jit
def _split_nibbles(b, ASM: tl.constexpr):
    """bytes -> (low nibbles, high nibbles) as int8 in 0..15. On the GPU one instruction per
    register of 4 bytes each (inline PTX: and / shift on the whole 32-bit word); the interpreter
    cannot run PTX and takes the plain per-byte form."""
    if ASM:
        return tl.inline_asm_elementwise(
            "and.b32 $0, $2, 0x0F0F0F0F; shr.b32 $1, $2, 4; and.b32 $1, $1, 0x0F0F0F0F;",
            "=r,=r,r", [b], dtype=(tl.int8, tl.int8), is_pure=True, pack=4)
    else:
        return b & 0xF, (b >> 4) & 0xF


@triton.jit
def _rows(w):
    """[R, BLOCK_N, 4] -> [4 R, BLOCK_N], row 4 r + j."""
    w = tl.permute(w, (0, 2, 1))
    return tl.reshape(w, (w.shape[0] * 4, w.shape[2]))


@triton.jit
def _idot(x, w, acc, WEIGHTS_AS_A: tl.constexpr):
    """acc + x @ w in int32, or through its transpose when the weights are the A operand."""
    if WEIGHTS_AS_A:
        return tl.trans(tl.dot(tl.trans(w), tl.trans(x), tl.trans(acc), out_dtype=tl.int32))
    else:
        return tl.dot(x, w, acc, out_dtype=tl.int32)


# M and the split length only bound loops and masks: one compiled kernel serves every value
@triton.jit(do_not_specialize=["M", "tiles_per_split"])
def _w4a8_kernel(xq_ptr, xs_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K, stride_xm,
                 stride_ym, tiles_per_split, G: tl.constexpr, HAS_ZEROS: tl.constexpr,
                 HAS_BIAS: tl.constexpr, PER_CHANNEL: tl.constexpr, ATOMIC: tl.constexpr,
                 WEIGHTS_AS_A: tl.constexpr, ASM: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, X_DOT_ORDER: tl.constexpr):
    """One [BLOCK_M, BLOCK_N] tile of y over the K tiles of split tl.program_id(2).

    WEIGHTS_AS_A computes y.T = W @ x.T: with BLOCK_M >= 64 Triton uses Hopper's wgmma, which
    takes its A operand from registers (where the unpacked weights are) and B from shared memory."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    first, last = _k_range(K, tiles_per_split, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)  # per-channel: the whole split in int32
    for t in range(first, last):
        k0 = t * BLOCK_K
        # the tile's zero point and scale ([1, BLOCK_N] fp32); its words (unused, so never
        # loaded) come as bytes from _load_bytes
        _, zero, scale = _load_tile(qw_ptr, s_ptr, z_ptr, k0, K, N, offs_n, offs_n < N, G,
                                    HAS_ZEROS, True, BLOCK_K, False, tl.float32)
        lo, hi = _split_nibbles(_load_bytes(qw_ptr, k0, K, N, BLOCK_N, BLOCK_K), ASM)
        if X_DOT_ORDER:  # see dot_order: the even and the odd k are two slices, loaded as x.T
            offs_k = _dot_order_base(t, BLOCK_K, 2) + tl.arange(0, BLOCK_K // 2)
            xt = xq_ptr + offs_m[None, :] * stride_xm + offs_k[:, None]
            xt_even = tl.load(xt, mask=mask_m[None, :], other=0)
            xt_odd = tl.load(xt + 64, mask=mask_m[None, :], other=0)  # half a 128-block on
            x_sum = tl.sum(xt_even.to(tl.int32), axis=0) + tl.sum(xt_odd.to(tl.int32), axis=0)
        else:
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(xq_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                        mask=mask_m[:, None] & (offs_k < K)[None, :], other=0)
            x_sum = tl.sum(x.to(tl.int32), axis=1)
        # sum_k x (q - zero) = sum_k x q - zero sum_k x: the dots start from the second term
        dot = tl.broadcast_to(-zero.to(tl.int32) * x_sum[:, None], (BLOCK_M, BLOCK_N))
        if BLOCK_K >= 64:  # two dots, over the even and the odd k
            if X_DOT_ORDER:
                x_even, x_odd = tl.trans(xt_even), tl.trans(xt_odd)
            else:
                x_even, x_odd = tl.split(tl.reshape(x, (BLOCK_M, BLOCK_K // 2, 2)))
            dot = _idot(x_even, _rows(lo), dot, WEIGHTS_AS_A)
            dot = _idot(x_odd, _rows(hi), dot, WEIGHTS_AS_A)
        else:  # the int8 MMA needs K >= 32 per dot: one dot over the k in their natural order
            w = tl.reshape(tl.permute(tl.join(lo, hi), (0, 2, 3, 1)), (BLOCK_K, BLOCK_N))
            dot = _idot(x, w, dot, WEIGHTS_AS_A)
        if PER_CHANNEL:
            part += dot
        else:
            acc += dot.to(tl.float32) * scale
    if PER_CHANNEL:
        scale = tl.load(s_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
        acc = part.to(tl.float32) * scale[None, :]
    xs = tl.load(xs_ptr + offs_m, mask=mask_m, other=0.0)
    _write(y_ptr, b_ptr, acc * xs[:, None], offs_m, offs_n, M, N, stride_ym, HAS_BIAS, ATOMIC)


# --------------------------------------------------------------------------- configs

_TABLES = tuning.load("w4a8")


def default_config(m: int, n: int, k: int, sms: int = 132) -> dict:
    """The rule when the table has no entry for (M bucket, N, K): BLOCK_M 16..64 (the int8 MMA
    at BLOCK_M = 16 costs nothing next to unpacking the weights, so M = 1 takes it too), and a K
    split that gives every SM about two programs, the weights as the wgmma A operand. BLOCK_K
    applies to per-channel weights only (grouped weights use BLOCK_K = G)."""
    block_m = min(max(16, triton.next_power_of_2(m)), 64)
    block_n, block_k = 128, 128
    split = w4a16._split_k(triton.cdiv(m, block_m), triton.cdiv(n, block_n), triton.cdiv(k, block_k), sms)
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split, num_warps=4,
                num_stages=3, WEIGHTS_AS_A=True)


def get_config(m: int, n: int, k: int, device: torch.device) -> dict:
    """The table's entry for the smallest tuned M bucket >= m (the table holds a few buckets,
    e.g. 1, 16, 64: M = 2..16 take 16's), else ``default_config``."""
    name, sms = tuning.device_info(device)
    entry = tuning.for_device(_TABLES, name).get(f"{n},{k}", {})
    bucket = min((int(b) for b in entry if m <= int(b)), default=None)
    return entry[str(bucket)] if bucket is not None else default_config(m, n, k, sms)


# --------------------------------------------------------------------------- launcher

def check_group_size(k: int, group_size: int, what: str = "w4a8"):
    """The int8 MMA sums 32 values of K at a time: a group (one tile) must hold a multiple of 32."""
    if group_size <= 0 or k % group_size or k % 8 or (group_size < k and group_size % 32):
        raise ValueError(f"{what}: in_features {k} needs a group size that divides it and is a "
                         f"multiple of 32 (or group_size = K, per channel), got {group_size}")


def _check(xq, xscale, qweight, scales, zeros, bias, group_size):
    if xq.dtype != torch.int8:
        raise TypeError(f"w4a8: activations must be int8 (hsd::quantize_per_token), got {xq.dtype}")
    if xscale.dtype != torch.float32 or xscale.shape != xq.shape[:-1]:
        raise TypeError(f"w4a8: xscale must be float32 of shape {tuple(xq.shape[:-1])}, got "
                        f"{xscale.dtype} {tuple(xscale.shape)}")
    if qweight.dtype != torch.int32:
        raise TypeError(f"w4a8: qweight must be int32 (8 nibbles per word), got {qweight.dtype}")
    for name, t in (("scales", scales), ("zeros", zeros), ("bias", bias)):
        if t is not None and not t.is_floating_point():
            raise TypeError(f"w4a8: {name} must be a float tensor, got {t.dtype}")
    k, n = xq.shape[-1], scales.shape[-1]
    check_group_size(k, group_size)
    if qweight.shape != (k // 8, n) or scales.shape != (k // group_size, n):
        raise ValueError(f"w4a8: qweight {tuple(qweight.shape)} and scales {tuple(scales.shape)} do not "
                         f"fit activations {tuple(xq.shape)} with group size {group_size}")
    if zeros is not None and zeros.shape != scales.shape:
        raise ValueError(f"w4a8: zeros {tuple(zeros.shape)} != scales {tuple(scales.shape)}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"w4a8: bias {tuple(bias.shape)} != ({n},)")
    if any(t is not None and t.device != xq.device for t in (xscale, qweight, scales, zeros, bias)):
        raise ValueError(f"w4a8: every tensor must be on {xq.device}")


@registry.register("w4a8_linear", "cuda", "triton")
@registry.register("w4a8_linear", "cpu", "triton")  # CPU only under TRITON_INTERPRET=1
def w4a8_linear_triton(xq, xscale, qweight, scales, zeros, bias, group_size: int, config=None,
                       x_dot_order: bool = False):
    """config: dict(BLOCK_M, BLOCK_N, BLOCK_K (per-channel only), SPLIT_K, num_warps, num_stages,
    WEIGHTS_AS_A); default: the tuned table for this GPU, else ``default_config``.
    x_dot_order: xq's columns are in ``dot_order``."""
    _check(xq, xscale, qweight, scales, zeros, bias, group_size)
    k, n = xq.shape[-1], scales.shape[1]
    check_dot_order(k, x_dot_order, "w4a8")
    x2, xs = xq.reshape(-1, k), xscale.reshape(-1)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    xs = xs.contiguous()
    m = x2.shape[0]
    cfg = config or get_config(m, n, k, xq.device)
    per_channel = group_size == k
    block_m, block_n = cfg["BLOCK_M"], cfg["BLOCK_N"]
    block_k = cfg["BLOCK_K"] if per_channel else group_size
    # tl.dot needs M, N >= 16 and the int8 MMA K >= 32 on the GPU (the interpreter accepts less)
    assert all(b & (b - 1) == 0 for b in (block_m, block_n, block_k)), cfg
    assert block_m >= 16 and block_n >= 16 and block_k >= 32, cfg
    assert not x_dot_order or block_k in (64, 128), cfg  # two dots, a tile within one block
    grid, tiles_per_split, y = tuning.split_k_launch(m, n, k, block_m, block_n, block_k, cfg["SPLIT_K"],
                                                     xq.device, scales.dtype)
    if m == 0:
        return y.reshape(*xq.shape[:-1], n)
    _w4a8_kernel[grid](x2, xs, qweight, scales, zeros, bias, y, m, n, k, x2.stride(0), y.stride(0),
                       tiles_per_split, G=group_size, HAS_ZEROS=zeros is not None,
                       HAS_BIAS=bias is not None, PER_CHANNEL=per_channel, ATOMIC=grid[2] > 1,
                       WEIGHTS_AS_A=cfg.get("WEIGHTS_AS_A", block_m >= 64), ASM=xq.is_cuda,
                       BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, X_DOT_ORDER=x_dot_order,
                       num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return y.reshape(*xq.shape[:-1], n)


# --------------------------------------------------------------------------- tuning, benchmark

def candidate_configs(m: int, n: int, k: int):
    """The configs ``tune`` tries for one (M bucket, N, K): a few tiles times a few K splits."""
    if m <= 16:  # BLOCK_M, BLOCK_N, num_warps, num_stages, WEIGHTS_AS_A
        tiles = [(16, 64, 4, 4, False), (16, 128, 4, 3, False), (16, 128, 4, 5, False),
                 (16, 128, 8, 4, False), (16, 256, 8, 3, False)]
        # weights as the A operand (wgmma from registers): W4A16's fastest tiles at small M
        tiles += [(16, 64, 4, 4, True), (16, 128, 4, 3, True), (16, 128, 4, 5, True), (16, 256, 8, 3, True)]
    else:
        tiles = [(32, 128, 4, 3, False), (64, 64, 4, 4, True), (64, 128, 4, 3, True),
                 (64, 128, 8, 3, True), (64, 128, 4, 3, False)]
    k_tiles = triton.cdiv(k, 128)
    for block_m, block_n, num_warps, num_stages, swap in tiles:
        for split in (1, 2, 4, 8, 16):
            if split == 1 or k_tiles // split >= 2:
                yield dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=128, SPLIT_K=split,
                           num_warps=num_warps, num_stages=num_stages, WEIGHTS_AS_A=swap)


def random_inputs(m: int, n: int, k: int, group_size: int = 128, dtype=torch.float16,
                  zeros: bool = False, device="cuda"):
    """Non-zero random activations [m, k] (float) and W4 weights (random words, so every
    nibble value occurs): the kernel's speed must not depend on the data."""
    g = k if group_size in (None, -1) else group_size
    x = torch.randn(m, k, device=device, dtype=dtype)
    qweight = torch.randint(-2**31, 2**31 - 1, (k // 8, n), dtype=torch.int32, device=device)
    scales = (torch.rand(k // g, n, device=device) * 0.02 + 0.001).to(dtype)
    z = torch.randint(0, 16, scales.shape, device=device).to(dtype) if zeros else None
    return x, qweight, scales, z


def benchmark(m: int, n: int, k: int, group_size: int = 128, kind: str = "int8",
              dtype=torch.float16, config=None, device="cuda", dot_order: bool = True):
    """A zero-argument callable that runs what a W4A8 (kind "int8") or W4A4 ("int4") Linear
    runs on [m, k] random activations: hsd::quantize_per_token, then the GEMM (``config`` or
    the table's), with q in dot order where hsd's lowering puts it so (``dot_order=False``:
    never). For ``hsd.kernels.timing``."""
    x, qweight, scales, _ = random_inputs(m, n, k, group_size, dtype, device=device)
    g = k if group_size in (None, -1) else group_size
    dot_order = dot_order and reads_dot_order(k, g)
    quantize = registry.lookup("quantize_per_token", torch.device(device).type)
    gemm = functools.partial(w4a8_linear_triton, qweight=qweight, scales=scales, zeros=None,
                             bias=None, group_size=g, config=config, x_dot_order=dot_order)
    return lambda: gemm(*quantize(x, kind, dot_order))


def tune(shapes, m_buckets=(1, 16, 64), group_size: int = 128, path=None, reps: int = 10,
         budget_s: float = float("inf"), verbose: bool = True, device="cuda"):
    """``tuning.tune`` of ``candidate_configs`` (the GEMM alone, int8 activations, in dot order
    where hsd's lowering puts them so) per (N, K) in ``shapes`` and M bucket on this GPU; writes
    ``configs/w4a8_<gpu>.json`` unless ``path`` is given, and updates the live table."""
    quantize = registry.lookup("quantize_per_token", torch.device(device).type)
    return tuning.tune(
        "w4a8", _TABLES, shapes, m_buckets, candidate_configs,
        weights=lambda n, k: random_inputs(1, n, k, group_size, device=device)[1:3],
        inputs=lambda m, k: quantize(torch.randn(m, k, device=device, dtype=torch.float16), "int8"),
        launch=lambda x, w, cfg: w4a8_linear_triton(*x, *w, None, None, group_size, cfg,
                                                    x_dot_order=reads_dot_order(x[0].shape[-1], group_size)),
        out=path, reps=reps, budget_s=budget_s, verbose=verbose, device=device,
        meta=dict(group_size=group_size))
