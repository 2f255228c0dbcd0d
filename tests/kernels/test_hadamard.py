"""Hadamard: the matrices, the factorised reference vs dense x @ H, the Triton kernel vs the
reference (under TRITON_INTERPRET=1; bf16 only on a GPU), the op, and bad inputs."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import hsd  # noqa: F401  (registers hsd::hadamard)
from hsd.kernels import registry
from hsd.kernels.hadamard import (MAX_BLOCK, SMALL_SIZES, hadamard_matrix, hadamard_reference,
                                  hadamard_triton, small_hadamard, split_size)

TOL = {torch.float16: 2e-3, torch.float32: 2e-6, torch.bfloat16: 1e-2}


def rel_err(y, ref):
    return ((y.double() - ref.double()).abs().max() / ref.double().abs().max().clamp(min=1e-12)).item()


@pytest.mark.parametrize("m", SMALL_SIZES)
@pytest.mark.parametrize("p", [1, 2, 8, 64])
def test_matrix_is_hadamard(m, p):
    n = m * p
    h = hadamard_matrix(n)
    assert h.shape == (n, n) and bool(((h == 1) | (h == -1)).all())
    assert torch.equal(h @ h.t(), n * torch.eye(n, dtype=torch.float64))


def test_small_orders_and_symmetry():
    for m in SMALL_SIZES:
        h = small_hadamard(m)
        assert torch.equal(h @ h.t(), m * torch.eye(m, dtype=torch.float64)), m
    # Paley II gives a symmetric matrix, Paley I (q = 3 mod 4) does not: H^T is a different transform
    assert torch.equal(small_hadamard(28), small_hadamard(28).t())
    assert not torch.equal(small_hadamard(12), small_hadamard(12).t())


def test_split_sizes_of_llama3_8b():
    assert split_size(4096) == (1, 4096)
    assert split_size(14336) == (28, 512)
    assert split_size(96) == (12, 8) and split_size(20) == (20, 1) and split_size(1) == (1, 1)


@settings(deadline=None, max_examples=20)
@given(m=st.sampled_from(SMALL_SIZES), a=st.integers(0, 6), rows=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_reference_matches_dense(m, a, rows, seed):
    n = m * 2**a
    x = torch.randn(rows, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    expected = x @ hadamard_matrix(n) / math.sqrt(n)
    torch.testing.assert_close(hadamard_reference(x), expected, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(hadamard_reference(x).norm(dim=-1), x.norm(dim=-1))  # orthogonal


@settings(deadline=None, max_examples=25)
@given(m=st.sampled_from(SMALL_SIZES), a=st.integers(0, 7),
       lead=st.lists(st.integers(1, 3), min_size=0, max_size=2),
       dtype=st.sampled_from([torch.float16, torch.float32]), seed=st.integers(0, 2**16))
def test_triton_matches_reference(m, a, lead, dtype, seed):
    n = m * 2**a
    x = (torch.randn(*lead, n, generator=torch.Generator().manual_seed(seed)) * 3).to(dtype)
    y = hadamard_triton(x)
    assert y.shape == x.shape and y.dtype == dtype
    assert rel_err(y, hadamard_reference(x.double())) < TOL[dtype]


@pytest.mark.parametrize("n", [4096, 14336])
def test_triton_llama3_8b_widths(n):
    x = torch.randn(2, n, generator=torch.Generator().manual_seed(n)).half()
    assert rel_err(hadamard_triton(x), hadamard_reference(x.double())) < TOL[torch.float16]


def test_triton_strided_input_and_empty_batch():
    x = torch.randn(5, 2 * 96)[:, ::2]  # last-dim stride 2
    torch.testing.assert_close(hadamard_triton(x), hadamard_reference(x), atol=1e-5, rtol=1e-5)
    assert hadamard_triton(torch.randn(0, 3, 64)).shape == (0, 3, 64)


def test_outlier_is_spread():
    """The reason for the transform: one huge channel becomes n equal-magnitude ones."""
    x = torch.zeros(1, 14336)
    x[0, 1234] = 1000.0
    y = hadamard_triton(x)
    torch.testing.assert_close(y.abs(), torch.full_like(y, 1000.0 / math.sqrt(14336)))


def test_op_dispatches_to_registry():
    x = torch.randn(3, 56)
    torch.testing.assert_close(torch.ops.hsd.hadamard(x), hadamard_reference(x))
    with registry.use("hadamard", "triton"):
        torch.testing.assert_close(torch.ops.hsd.hadamard(x.half()).float(), hadamard_reference(x),
                                   atol=5e-3, rtol=5e-3)
    assert torch.ops.hsd.hadamard(x.double()).dtype == torch.float64  # the reference keeps fp64


@pytest.mark.parametrize("n", [0, 3, 72, 36, 11008])
def test_unsupported_sizes_raise(n):
    with pytest.raises(ValueError, match=f"size {n} is not m"):
        split_size(n)
    with pytest.raises(ValueError, match=f"size {n}"):
        hadamard_triton(torch.zeros(2, n))
    with pytest.raises(ValueError, match=f"size {n}"):
        hadamard_reference(torch.zeros(2, n))
    with pytest.raises(ValueError, match=f"size {n}"):  # the fake: fails when a graph is traced
        with torch._subclasses.FakeTensorMode():
            torch.ops.hsd.hadamard(torch.empty(2, n))


def test_bad_dtype_and_too_large_raise():
    with pytest.raises(TypeError, match="float64"):
        hadamard_triton(torch.zeros(2, 64, dtype=torch.float64))
    with pytest.raises(TypeError, match="int32"):
        hadamard_triton(torch.zeros(2, 64, dtype=torch.int32))
    with pytest.raises(ValueError, match="registers"):
        hadamard_triton(torch.zeros(1, 28 * 4096))  # 32 (padded 28) * 4096 > MAX_BLOCK
    assert 32 * 4096 > MAX_BLOCK
    with pytest.raises(ValueError, match="scalar"):
        hadamard_triton(torch.tensor(1.0))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n", [128, 4096, 14336, 96 * 64])
def test_triton_on_gpu(n, dtype):
    x = torch.randn(33, n, device="cuda").to(dtype)
    assert rel_err(hadamard_triton(x), hadamard_reference(x.double())) < TOL[dtype]
