"""Online Hadamard transform: y = x @ H_n / sqrt(n) along the last dim of x [..., n].

Sizes: n = m * 2^a with m in {1, 12, 20, 28} (``split_size`` says how n factors, or raises).
H_n = kron(H_m, H_{2^a}), so column j = i * 2^a + k of x is element (i, k) of an [m, 2^a] block:
  H_{2^a}  Sylvester: H[k, k'] = (-1)^popcount(k & k'), symmetric
  H_12     Paley I over GF(11)        H_20  Paley I over GF(19)
  H_28     Paley II over GF(13)       (H_m H_m^T = m I; only H_1 and H_28 are symmetric)
H_n / sqrt(n) is orthogonal, so the transform keeps norms and spreads a few large channels over
all n of them: that is what makes 4-bit per-token activations work in front of down_proj (QuaRot).
Llama-3-8B needs n = 4096 = 2^12 and n = 14336 = 28 * 2^9.

The Triton kernel runs one row per program: for each of the m sub-rows it runs the fast
Walsh-Hadamard butterflies of the 2^a part in registers, then adds the sub-row into all m output
sub-rows weighted by row i of H_m (fp32 FMAs, exact; m <= 28 is too small for a tensor-core dot to
pay off and fp32 dots would round through tf32). The torch reference does the same factorised
transform (O(n log n), any float dtype, fp64 included), so the passes can rotate weights with it.
"""
import functools
import math

import torch
import triton
import triton.language as tl

from hsd.kernels import registry

SMALL_SIZES = (1, 12, 20, 28)
MAX_BLOCK = 2**16  # registers of one program: next_power_of_two(m) * 2^a fp32 values


def _legendre(q: int) -> list:
    squares = {(i * i) % q for i in range(1, q)}
    return [0] + [1 if r in squares else -1 for r in range(1, q)]


def _jacobsthal(q: int) -> torch.Tensor:
    chi = _legendre(q)
    return torch.tensor([[chi[(a - b) % q] for b in range(q)] for a in range(q)], dtype=torch.float64)


def _paley1(q: int) -> torch.Tensor:
    """Order q + 1 for a prime q = 3 (mod 4): I + S with S = [[0, 1^T], [-1, Jacobsthal]] skew."""
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, _jacobsthal(q)
    return torch.eye(q + 1, dtype=torch.float64) + s


def _paley2(q: int) -> torch.Tensor:
    """Order 2 (q + 1) for a prime q = 1 (mod 4), from the symmetric conference matrix C."""
    c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, _jacobsthal(q)
    a = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)


@functools.cache
def small_hadamard(m: int) -> torch.Tensor:
    """H_m (fp64, entries +-1) for m in SMALL_SIZES."""
    build = {1: lambda: torch.ones(1, 1, dtype=torch.float64), 12: lambda: _paley1(11),
             20: lambda: _paley1(19), 28: lambda: _paley2(13)}
    if m not in build:
        raise ValueError(f"no Hadamard matrix of order {m}; known small orders: {SMALL_SIZES}")
    return build[m]()


def split_size(n: int) -> tuple[int, int]:
    """n -> (m, 2^a) with n = m * 2^a, m in SMALL_SIZES; ValueError if n has no such form."""
    for m in SMALL_SIZES[::-1]:
        p = n // m if n > 0 and n % m == 0 else 0
        if p and p & (p - 1) == 0:
            return m, p
    raise ValueError(f"hadamard: size {n} is not m * 2^a with m in {SMALL_SIZES} "
                     "(e.g. 4096 = 2^12, 14336 = 28 * 2^9, 11008 has no Hadamard matrix here)")


def hadamard_matrix(n: int, dtype=torch.float64) -> torch.Tensor:
    """The dense [n, n] H_n = kron(H_m, Sylvester H_{2^a}), entries +-1 (for tests and small n)."""
    m, p = split_size(n)
    sylvester = torch.ones(1, 1, dtype=torch.float64)
    while sylvester.shape[0] < p:
        sylvester = torch.cat([torch.cat([sylvester, sylvester], 1), torch.cat([sylvester, -sylvester], 1)])
    return torch.kron(small_hadamard(m), sylvester).to(dtype)


@registry.register("hadamard", "cpu", "reference")
def hadamard_reference(x: torch.Tensor) -> torch.Tensor:
    """x @ H_n / sqrt(n) along the last dim, factorised; fp64 stays fp64, other dtypes run in fp32."""
    n = x.shape[-1]
    m, p = split_size(n)
    work = x.double() if x.dtype == torch.float64 else x.float()
    y = work.reshape(-1, m, p)
    h = 1
    while h < p:  # butterflies on bit log2(h) of k
        y = y.reshape(-1, m, p // (2 * h), 2, h)
        y = torch.stack([y[..., 0, :] + y[..., 1, :], y[..., 0, :] - y[..., 1, :]], -2)
        h *= 2
    y = y.reshape(-1, m, p)
    if m > 1:
        y = torch.einsum("bip,ij->bjp", y, small_hadamard(m).to(y.device, y.dtype))
    return (y.reshape(x.shape) / math.sqrt(n)).to(x.dtype)


@triton.jit
def _fwht(v, P: tl.constexpr, LOG_P: tl.constexpr):
    """Walsh-Hadamard transform of v [P]: each round applies H_2 to the lowest index bit and
    rotates that bit to the top, so after log2(P) rounds every bit is done and back in place."""
    for _ in tl.static_range(LOG_P):
        a, b = tl.split(tl.reshape(v, (P // 2, 2)))
        v = tl.reshape(tl.trans(tl.join(a + b, a - b), 1, 0), (P,))
    return v


@triton.jit
def _hadamard_kernel(x_ptr, h_ptr, y_ptr, stride_x, stride_y, scale, M: tl.constexpr,
                     M_PAD: tl.constexpr, P: tl.constexpr, LOG_P: tl.constexpr):
    """Row r of y = row r of x @ kron(H_M, H_P) * scale; h_ptr: H_M fp32 [M, M] row-major."""
    row = tl.program_id(0).to(tl.int64)
    offs_k = tl.arange(0, P)
    if M == 1:
        v = tl.load(x_ptr + row * stride_x + offs_k).to(tl.float32)
        out = _fwht(v, P, LOG_P) * scale
        tl.store(y_ptr + row * stride_y + offs_k, out.to(y_ptr.dtype.element_ty))
    else:
        offs_j = tl.arange(0, M_PAD)
        acc = tl.zeros((M_PAD, P), dtype=tl.float32)
        for i in range(M):  # sub-row i goes into output sub-row j with weight H_M[i, j]
            v = _fwht(tl.load(x_ptr + row * stride_x + i * P + offs_k).to(tl.float32), P, LOG_P)
            h = tl.load(h_ptr + i * M + offs_j, mask=offs_j < M, other=0.0)
            acc += h[:, None] * v[None, :]
        offs = offs_j[:, None] * P + offs_k[None, :]
        tl.store(y_ptr + row * stride_y + offs, (acc * scale).to(y_ptr.dtype.element_ty),
                 mask=(offs_j < M)[:, None])


@functools.cache
def _small_fp32(m: int, device: torch.device) -> torch.Tensor:
    return small_hadamard(m).to(device, torch.float32).contiguous()


def check(x: torch.Tensor):
    """Raise TypeError / ValueError for inputs the Triton kernel cannot take, before any launch."""
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"hadamard: x must be fp16, bf16 or fp32, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError("hadamard: x must have a last dim to transform, got a scalar")
    m, p = split_size(x.shape[-1])
    if triton.next_power_of_2(m) * p > MAX_BLOCK:
        raise ValueError(f"hadamard: size {x.shape[-1]} = {m} * {p} needs more than {MAX_BLOCK} "
                         "values in registers per row; the Triton kernel stops there")
    return m, p


@registry.register("hadamard", "cuda", "triton")
@registry.register("hadamard", "cpu", "triton")  # CPU only under TRITON_INTERPRET=1
def hadamard_triton(x: torch.Tensor, num_warps: int = None) -> torch.Tensor:
    m, p = check(x)
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    assert y.stride(-1) == 1 and x2.stride(-1) == 1, (x2.stride(), y.stride())
    if x2.shape[0] == 0:
        return y.reshape(x.shape)
    m_pad = triton.next_power_of_2(m)
    if num_warps is None:
        num_warps = max(1, min(8, m_pad * p // 1024))
    _hadamard_kernel[(x2.shape[0],)](x2, _small_fp32(m, x.device), y, x2.stride(0), y.stride(0),
                                     1.0 / math.sqrt(n), M=m, M_PAD=m_pad, P=p,
                                     LOG_P=p.bit_length() - 1, num_warps=num_warps)
    return y.reshape(x.shape)
