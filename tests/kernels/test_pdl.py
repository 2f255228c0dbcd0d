"""Programmatic dependent launch (hsd/kernels/pdl.py): the switch, and on a Hopper GPU, chains of
dependent kernels replayed from a CUDA graph give the same result with PDL on as off."""
import pytest
import torch

from hsd.kernels import attention, pdl, w4a16


def test_off_the_gpu_and_when_switched_off(monkeypatch):
    assert pdl.launch_args(torch.device("cpu")) == dict(PDL=False)
    monkeypatch.setenv("HSD_PDL", "0")
    assert not pdl.enabled(torch.device("cpu"))
    if torch.cuda.is_available():
        assert pdl.launch_args(torch.device("cuda")) == dict(PDL=False)


def _chain(x, weights, kv):
    """Each linear reads the previous one's output (split K and not), then attention reads it."""
    configs = [None, dict(KERNEL="mma", BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, SPLIT_K=1,
                          num_warps=4, num_stages=3, WEIGHTS_AS_A=True)]
    for i, (qw, s) in enumerate(weights):
        x = w4a16.w4a16_linear_triton(x, qw, s, None, None, 128, configs[i % 2]) / 32
    k, v, kc, vc, cache_len = kv
    q = x.view(1, 8, 1, 512 // 8)
    return attention.attention_triton(q, k, v, kc, vc, 0, cache_len,
                                      torch.ones(1, 1, dtype=torch.int32, device="cuda"), 0.125)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                    reason="PDL needs a Hopper GPU")
def test_graph_replays_match_without_pdl(monkeypatch):
    torch.manual_seed(0)
    weights = [w4a16.quantize_rtn(torch.randn(512, 512, device="cuda", dtype=torch.float16), 128)[:2]
               for _ in range(6)]
    kc, vc = (torch.randn(1, 1, 2, 1024, 64, device="cuda", dtype=torch.float16) for _ in range(2))
    k, v = (torch.randn(1, 2, 1, 64, device="cuda", dtype=torch.float16) for _ in range(2))
    kv = (k, v, kc, vc, torch.tensor([900], device="cuda", dtype=torch.int32))
    x = torch.randn(1, 512, device="cuda", dtype=torch.float16)
    for setting in ("0", "1"):
        monkeypatch.setenv("HSD_PDL", setting)
        out = torch.empty(1, 8, 1, 64, device="cuda", dtype=torch.float16)
        _chain(x, weights, kv)      # compile outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out.copy_(_chain(x, weights, kv))
        for _ in range(10):
            x.normal_()             # new inputs each replay: a kernel reading early would see stale x
            graph.replay()
            want = _chain(x, weights, kv)
            torch.testing.assert_close(out, want, atol=2e-3, rtol=1e-2)
