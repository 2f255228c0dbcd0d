"""Split-K for the GEMM kernels (w4a16, w4a8, scaled_mm): the launch plan and the reduction.

At small M a GEMM has too few output tiles to fill the GPU, so K is cut into SPLIT_K ranges and
program (i, j, s) sums range s of output tile (i, j). The partial tiles are reduced without
touching the output twice: each program stores its fp32 partial in a workspace, then takes a
ticket from its tile's counter; the last program of the tile adds the partials in a fixed order
(the same result whatever order the programs ran in), adds the bias, writes the output and resets
the counter to 0 for the next launch. No memset of the output is needed first: with atomic adds
into a zeroed output that memset was one more CUDA-graph node per Linear (1.1 us on an H100,
benchmarks/results/README.md), and fp16 atomics rounded every partial sum.

Ordering: a program's partial stores happen before its ticket (a barrier, then one acq_rel
atomic for the program), and the last program reads the partials after its ticket, through L2
(.cg), so it sees every other program's partial.

The workspace and counters are shared by all split-K launches on a device and only grow; the
buffers they replace stay alive because captured CUDA graphs keep their addresses. Sharing is
safe for launches that run one after the other (one stream: how hsd runs a model).
"""
import torch
import triton
import triton.language as tl

_BUFFERS = {}   # device -> (workspace fp32, counters int32), the current (largest) pair
_RETIRED = []   # replaced buffers: CUDA graphs captured before a growth still use them


def _buffers(device: torch.device, workspace: int, tiles: int):
    ws, counters = _BUFFERS.get(device, (None, None))
    if ws is None or ws.numel() < workspace:
        _RETIRED.append(ws)
        ws = torch.empty(max(workspace, 1 << 16), device=device, dtype=torch.float32)
    if counters is None or counters.numel() < tiles:
        _RETIRED.append(counters)
        counters = torch.zeros(max(tiles, 1 << 12), device=device, dtype=torch.int32)
    _BUFFERS[device] = ws, counters
    return ws, counters


def launch(m: int, n: int, k: int, block_m: int, block_n: int, block_k: int, split_k: int, device, dtype):
    """(grid, K tiles per split, output [m, n], workspace, counters) of a GEMM launch. Splits
    that would get no K tile are dropped; with one split the workspace and counters are unused
    (the output itself is passed for them)."""
    k_tiles = triton.cdiv(k, block_k)
    tiles_per_split = triton.cdiv(k_tiles, split_k)
    split = triton.cdiv(k_tiles, tiles_per_split)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n), split)
    y = torch.empty((m, n), device=device, dtype=dtype)
    if split == 1 or m == 0:
        return grid, tiles_per_split, y, y, y
    assert split * m * n < 2**31, f"split-K workspace of {split} x {m} x {n} needs 64-bit offsets"
    ws, counters = _buffers(torch.device(device), split * m * n, grid[0] * grid[1])
    return grid, tiles_per_split, y, ws, counters


@triton.jit
def k_range(K, tiles_per_split, BLOCK_K: tl.constexpr):
    """The tiles of K this program sums: split program_id(2) of the launch."""
    first = tl.program_id(2) * tiles_per_split
    return first, tl.minimum(first + tiles_per_split, tl.cdiv(K, BLOCK_K))


@triton.jit
def write(y_ptr, b_ptr, ws_ptr, counter_ptr, acc, offs_m, offs_n, M, N, stride_ym,
          HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr):
    """Store the [BLOCK_M, BLOCK_N] fp32 tile acc (+ bias) into y; with SPLIT, reduce the
    program's partial with the other splits' first (see the module doc)."""
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    write_y = mask
    if SPLIT:
        splits = tl.num_programs(2)
        rows = offs_m[:, None] * N + offs_n[None, :]
        tl.store(ws_ptr + tl.program_id(2) * M * N + rows, acc, mask=mask)
        tl.debug_barrier()
        counter = counter_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
        ticket = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
        last = ticket == splits - 1
        # broadcast through a tensor: the interpreter cannot AND a mask with a scalar atomic's result
        write_y = mask & (tl.zeros_like(rows) + ticket == splits - 1)
        if last:
            acc = tl.zeros_like(acc)
            for s in range(0, splits):
                acc += tl.load(ws_ptr + s * M * N + rows, mask=mask, other=0.0, cache_modifier=".cg")
            tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=write_y)
