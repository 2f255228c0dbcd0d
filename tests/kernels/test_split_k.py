"""The split-K reduction shared by the GEMM kernels (kernels/split_k.py), on the interpreter."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from hsd.kernels import scaled_mm, split_k
from hsd.kernels.act_quant import quantize_per_token_reference
from hsd.kernels.w4a16 import quantize_rtn, w4a16_linear_reference, w4a16_linear_triton


def _counters():
    return split_k._BUFFERS[torch.device("cpu")][1]


@settings(deadline=None, max_examples=8)
@given(m=st.integers(1, 20), split=st.sampled_from([2, 3, 4]), seed=st.integers(0, 2**16))
def test_repeated_launches_reduce_every_split_once(m, split, seed):
    """Each launch leaves its counters at zero, so the next launch (another M, other data)
    reduces right too; the bias is added once; the same inputs give bit-identical outputs
    (the last program sums the partials in a fixed order)."""
    g = torch.Generator().manual_seed(seed)
    qw, s, z = quantize_rtn(torch.randn(64, 512, generator=g), 128, symmetric=False)
    bias = torch.randn(64, generator=g)
    cfg = dict(KERNEL="mma", BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, SPLIT_K=split, num_warps=4, num_stages=2)
    for rows in (m, m + 17):
        x = torch.randn(rows, 512, generator=g)
        y = w4a16_linear_triton(x, qw, s, z, bias, 128, cfg)
        torch.testing.assert_close(y, w4a16_linear_reference(x, qw, s, z, bias, 128), rtol=1e-5, atol=1e-4)
        assert not _counters().any()
        assert torch.equal(y, w4a16_linear_triton(x, qw, s, z, bias, 128, cfg))


def test_buffers_grow_and_keep_the_old_ones():
    """A larger launch replaces the workspace; the old one stays referenced (captured CUDA graphs
    hold its address)."""
    cpu = torch.device("cpu")
    ws, counters = split_k._buffers(cpu, 1, 1)
    bigger = split_k._buffers(cpu, ws.numel() + 1, counters.numel() + 1)
    assert bigger[0].numel() > ws.numel() and bigger[1].numel() > counters.numel()
    assert any(t is ws for t in split_k._RETIRED) and any(t is counters for t in split_k._RETIRED)
    assert not bigger[1].any()


def test_scaled_mm_split_matches_reference():
    g = torch.Generator().manual_seed(1)
    wq, wscale = scaled_mm.quantize_weight(torch.randn(96, 256, generator=g), "int8")
    xq, xscale = quantize_per_token_reference(torch.randn(5, 256, generator=g), "int8")
    bias = torch.randn(96, generator=g)
    cfg = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, SPLIT_K=4, WEIGHTS_AS_A=False, num_warps=4, num_stages=2)
    y = scaled_mm.scaled_mm_triton(xq, xscale, wq, wscale, bias, cfg)
    torch.testing.assert_close(y, scaled_mm.scaled_mm_reference(xq, xscale, wq, wscale, bias), rtol=1e-5, atol=1e-4)
    assert not _counters().any()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_graph_replays_reduce_right():
    """Many split programs per tile, replayed from a CUDA graph: every replay equals the eager
    result bit for bit (a missed partial or a stale read would change it)."""
    qw, s, _ = quantize_rtn(torch.randn(4096, 4096, device="cuda"), 128)
    s = s.half()
    for m, split in ((1, 16), (16, 32)):
        cfg = dict(KERNEL="mma", BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, SPLIT_K=split, num_warps=4,
                   num_stages=3, WEIGHTS_AS_A=True)
        x = torch.randn(m, 4096, device="cuda", dtype=torch.float16)
        want = w4a16_linear_triton(x, qw, s, None, None, 128, cfg)
        ref = w4a16_linear_reference(x.float(), qw, s.float(), None, None, 128)
        assert ((want.float() - ref).norm() / ref.norm()) < 2e-3
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = w4a16_linear_triton(x, qw, s, None, None, 128, cfg)
        for _ in range(50):
            graph.replay()
            assert torch.equal(y, want)
