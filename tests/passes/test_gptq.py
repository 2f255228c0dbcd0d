"""GPTQ: layer error vs round-to-nearest on correlated inputs, RTN as its white-input limit,
act-order's static groups, the W4A16 format and kernel, Hessians from calibration, hsd.compile
with quantizer="gptq" vs RTN, bad input."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

import hsd
from hsd import calibration, testing
from hsd.kernels import w4a16
from hsd.kernels.w4a16 import quantize_rtn, w4a16_linear_reference, w4a16_linear_triton
from hsd.passes import QUANT_SCHEMES, QuantizeLinear
from hsd.passes.gptq import gptq, hessians
from hsd.passes.linear import Scheme, W4A16


def layer_case(n, k, seed, samples=256, correlated=True):
    """A weight [n, k] and inputs X = z @ A (correlated) or z (white), with H = 2/m X^T X."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, k, generator=g)
    if correlated:
        x = x @ torch.randn(k, k, generator=g) / k ** 0.5
    w = torch.randn(n, k, generator=g)
    return w, x, 2 * x.t() @ x / samples


def layer_error(x, w, tensors, group_size):
    """|| X W^T - X Wq^T || with Wq applied through the W4A16 reference op."""
    g = w.shape[1] if group_size == -1 else group_size
    return (x @ w.t() - w4a16_linear_reference(x, *tensors, None, g)).norm().item()


groups = st.sampled_from([32, 64, 128, -1])


@given(n=st.sampled_from([8, 24, 64]), k=st.sampled_from([64, 128, 256]), group=groups,
       symmetric=st.booleans(), act_order=st.booleans(), seed=testing.seeds())
def test_gptq_beats_rtn_on_correlated_inputs(n, k, group, symmetric, act_order, seed):
    group = min(group, k)
    w, x, h = layer_case(n, k, seed)
    rtn = layer_error(x, w, quantize_rtn(w, group, symmetric), group)
    got = layer_error(x, w, gptq(w, h, group, symmetric, act_order), group)
    assert got < 0.9 * rtn, (got, rtn)


@given(group=st.sampled_from([32, 96, 192, -1]), symmetric=st.booleans(), act_order=st.booleans(),
       seed=testing.seeds())
def test_lazy_block_updates_equal_one_block(group, symmetric, act_order, seed):
    """Blocks of 128 columns (groups of 96 and 192 straddle them: their grids need the pending
    lazy update) give what updating every later column at once gives, up to float rounding."""
    w, _, h = layer_case(16, 384, seed)
    (qa, sa, za), (qb, sb, zb) = (gptq(w, h, group, symmetric, act_order, block=b) for b in (128, 384))
    assert (w4a16.unpack(qa) != w4a16.unpack(qb)).float().mean() < 0.005
    torch.testing.assert_close(sa, sb, rtol=1e-4, atol=1e-5)
    assert symmetric or (za - zb).abs().sum() <= 2


@given(group=groups, symmetric=st.booleans(), act_order=st.booleans(), seed=testing.seeds())
def test_identity_hessian_gives_rtn(group, symmetric, act_order, seed):
    """H = I: no error is worth spreading, so every column rounds to nearest, bit for bit."""
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(seed))
    for got, ref in zip(gptq(w, torch.eye(128), group, symmetric, act_order), quantize_rtn(w, group, symmetric)):
        assert (got is None and ref is None) or torch.equal(got, ref)


@pytest.mark.parametrize("symmetric", [True, False])
def test_white_inputs_are_close_to_rtn(symmetric):
    w, x, h = layer_case(32, 64, seed=1, samples=4096, correlated=False)
    rtn = layer_error(x, w, quantize_rtn(w, 32, symmetric), 32)
    got = layer_error(x, w, gptq(w, h, 32, symmetric), 32)
    assert 0.9 * rtn < got <= rtn, (got, rtn)


def test_act_order_uses_static_groups_in_the_plain_layout():
    """Columns with very different input energy: act-order visits them by decreasing H diagonal,
    yet group g keeps rows g*G .. (g+1)*G, with the grid of the unmodified weights."""
    w, x, _ = layer_case(32, 128, seed=2)
    x = x * torch.linspace(0.05, 3, 128)[torch.randperm(128, generator=torch.Generator().manual_seed(0))]
    h = 2 * x.t() @ x / x.shape[0]
    qweight, scales, zeros = gptq(w, h, 32, symmetric=False, act_order=True)
    scale, zero = w4a16.grid(w.reshape(32, 4, 32), symmetric=False)
    torch.testing.assert_close(scales, scale.t().contiguous())
    torch.testing.assert_close(zeros, zero.t().contiguous())
    rtn = layer_error(x, w, quantize_rtn(w, 32, False), 32)
    assert layer_error(x, w, (qweight, scales, zeros), 32) < 0.9 * rtn


def test_dead_inputs_get_zero_weights():
    w, x, _ = layer_case(16, 64, seed=3)
    x[:, [5, 40]] = 0
    h = 2 * x.t() @ x / x.shape[0]
    tensors = gptq(w, h, 32, symmetric=False)
    dq = w4a16.dequantize(*tensors, 32)
    assert torch.isfinite(dq).all() and (dq[:, [5, 40]] == 0).all()
    assert layer_error(x, w, tensors, 32) < layer_error(x, w, quantize_rtn(w, 32, False), 32)


@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_tensors_run_in_the_w4a16_kernel(symmetric):
    """fp16 weight -> fp16 scales/zeros in the GPTQ layout; the Triton kernel (interpreter)
    computes the same layer as the reference."""
    w, x, h = layer_case(64, 256, seed=4)
    qweight, scales, zeros = gptq(w.half(), h, 128, symmetric)
    assert qweight.dtype == torch.int32 and qweight.shape == (32, 64)
    assert scales.dtype == torch.float16 and scales.shape == (2, 64)
    assert (zeros is None) == symmetric and (symmetric or zeros.shape == (2, 64))
    xh = x[:16].half()
    zeros32 = None if zeros is None else zeros.float()
    ref = w4a16_linear_reference(xh.float(), qweight, scales.float(), zeros32, None, 128)
    out = w4a16_linear_triton(xh, qweight, scales, zeros, None, 128)
    assert testing.sqnr_db(ref, out.float()) > 50


def test_hessians_from_calibration():
    """H = 2/n X^T X of each Linear's inputs; q/k/v and gate/up share one tensor; no lm_head."""
    config = testing.tiny_config(intermediate_size=64)
    model = testing.tiny_model(config)
    ids = calibration.random_ids(config, n=2, length=8)
    hs = hessians(model, ids)
    seen = {}
    calibration.linear_inputs(model, ids, lambda name, x: seen.setdefault(name, []).append(x.clone()))
    assert set(hs) == set(seen) and "lm_head" not in hs
    for name, xs in seen.items():
        x = torch.cat(xs)
        torch.testing.assert_close(hs[name], 2 * x.t() @ x / x.shape[0], rtol=1e-4, atol=1e-5)
    layer = "model.layers.1."
    attn, mlp = layer + "self_attn.", layer + "mlp."
    assert hs[attn + "q_proj"] is hs[attn + "k_proj"] is hs[attn + "v_proj"]
    assert hs[mlp + "gate_proj"] is hs[mlp + "up_proj"]
    assert len({id(h) for h in hs.values()}) == 4 * config.num_hidden_layers  # qkv, o, gate/up, down


@settings(max_examples=4)
@given(testing.model_configs(width_multiple=32), testing.seeds(), st.booleans())
def test_compile_gptq_beats_rtn(config, seed, act_order):
    """Logits SQNR against the float model on fresh tokens drawn like the calibration tokens."""
    model = testing.tiny_model(config, seed)
    cal = calibration.random_ids(config, n=4, length=64, seed=seed)
    ids = calibration.random_ids(config, n=4, length=64, seed=seed + 1)
    with torch.no_grad():
        ref = model(ids).logits
    sqnr = {}
    for quantizer in ("rtn", "gptq"):
        engine = hsd.compile(model, quant="w4a16", group_size=32, quantizer=quantizer, calibration=cal,
                             act_order=act_order and quantizer == "gptq", max_seq_len=64, batch_size=4)
        sqnr[quantizer] = testing.sqnr_db(ref, engine(ids).logits)
    assert sqnr["gptq"] >= sqnr["rtn"], sqnr


class _Int8Weights(Scheme):  # a scheme that is not 4-bit: GPTQ must refuse it
    name = "w8_test"
    tensors = ("weight",)


class _W4Subclass(W4A16):  # every 4-bit scheme subclasses W4A16 and inherits GPTQ
    name = "w4_test"


def test_four_bit_subclasses_inherit_gptq():
    w, _, h = layer_case(16, 64, seed=5)
    for got, ref in zip(_W4Subclass().quantize(w, 32, False, hessian=h), gptq(w, h, 32, False)):
        assert torch.equal(got, ref)


def test_bad_input(monkeypatch):
    config = testing.tiny_config()
    model = testing.tiny_model(config)
    with pytest.raises(ValueError, match="unknown quantizer 'awq'; known: rtn, gptq"):
        hsd.compile(model, quant="w4a16", quantizer="awq")
    with pytest.raises(ValueError, match="quantizer='gptq' needs a 4-bit weight scheme .*got quant=None"):
        hsd.compile(model, quantizer="gptq")
    monkeypatch.setitem(QUANT_SCHEMES, _Int8Weights.name, _Int8Weights())
    with pytest.raises(ValueError, match="quantizer='gptq' needs a 4-bit weight scheme .*got quant='w8_test'"):
        hsd.compile(model, quant="w8_test", quantizer="gptq")
    with pytest.raises(ValueError, match="GPTQ quantizes 4-bit weights only .* scheme 'w8_test' cannot use it"):
        QuantizeLinear("w8_test", hessians={})
    with pytest.raises(ValueError, match="act_order is a GPTQ option"):
        hsd.compile(model, quant="w4a16", act_order=True)
    with pytest.raises(TypeError, match="calibration must be a LongTensor"):
        hsd.compile(model, quant="w4a16", quantizer="gptq", calibration=[[1, 2, 3]])
    with pytest.raises(ValueError, match=r"calibration token ids must lie in \[0, 96\)"):
        hsd.compile(model, quant="w4a16", quantizer="gptq", calibration=torch.full((1, 4), 96))
    with torch.device("meta"):
        skeleton = testing.tiny_model(config)
    with pytest.raises(ValueError, match="quantizer='gptq' .* the model is on the meta device"):
        hsd.compile(skeleton, quant="w4a16", quantizer="gptq", weights={}, dtype=torch.float32, device="cpu")


def test_bad_hessians():
    w = torch.randn(16, 64)
    with pytest.raises(ValueError, match=r"down_proj: Hessian \(32, 32\) does not fit the weight \(16, 64\)"):
        gptq(w, torch.eye(32), 32, name="down_proj")
    with pytest.raises(ValueError, match="in_features 64 must be divisible by the group size 48"):
        gptq(w, torch.eye(64), 48)
    with pytest.raises(ValueError, match="not positive definite"):
        gptq(w, -torch.eye(64), 32)
    config = testing.tiny_config()
    model = testing.tiny_model(config)
    hs = hessians(model, calibration.random_ids(config, n=1, length=8))
    del hs["model.layers.1.mlp.up_proj"]
    with pytest.raises(hsd.PassError, match="model.layers.1.mlp.up_proj: no GPTQ Hessian"):
        testing.assert_pass_equivalent(QuantizeLinear("w4a16", group_size=32, hessians=hs), model,
                                       testing.random_ids(config))


def test_hessians_released_once_quantized():
    """GPTQ frees each Hessian as its Linear is quantized; a later step graph (another shape)
    reuses the quantized tensors, so it needs none, and the caller's dict is left alone."""
    config = testing.tiny_config()
    model = testing.tiny_model(config)
    hs = hessians(model, calibration.random_ids(config, n=1, length=8))
    n_layers = len(hs)
    quantize = QuantizeLinear("w4a16", group_size=32, hessians=hs)
    _, first = testing.assert_pass_equivalent(quantize, model, testing.random_ids(config, length=5),
                                              min_sqnr_db=10)
    assert quantize.hessians == {} and len(hs) == n_layers
    _, second = testing.assert_pass_equivalent(quantize, model, testing.random_ids(config, length=3),
                                               min_sqnr_db=10)
    assert any(name.endswith("qweight") for name, _ in first.named_buffers())
    for name, t in first.named_buffers():
        assert torch.equal(t, second.get_buffer(name)), name
