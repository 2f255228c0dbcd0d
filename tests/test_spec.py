"""Speculative pipelines: lossless against autoregressive decoding, and distribution-preserving."""
import copy

import pytest
import torch
from hypothesis import given, strategies as st

import hsd
from hsd import testing
from hsd.spec import DraftConfig


def perturbed(model, scale, seed):
    torch.manual_seed(seed)
    draft = copy.deepcopy(model)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn_like(p) * scale)
    return draft


def make_draft(kind, target, config, seed):
    if kind == "copy":
        return target                                  # every draft token is accepted
    if kind == "perturbed":
        return perturbed(target, 0.05, seed)           # some accepted, some not
    other = testing.tiny_config("qwen2", vocab_size=config.vocab_size, num_hidden_layers=1)
    return testing.tiny_model(other, seed + 1, dtype=torch.float64)   # an unrelated small LM


@given(testing.model_configs(), testing.seeds(), st.sampled_from(["copy", "perturbed", "other"]),
       st.integers(1, 5), st.integers(1, 20))
def test_draft_pipeline_is_lossless(config, seed, kind, k, max_new_tokens):
    target = testing.tiny_model(config, seed, dtype=torch.float64)
    ids = testing.random_ids(config, seed, length=4)
    expected = hsd.compile(target, max_seq_len=48, prefill_chunk=4).generate(ids, max_new_tokens=max_new_tokens)
    engine = hsd.compile(target, max_seq_len=48, prefill_chunk=4, spec="draft",
                         draft=make_draft(kind, target, config, seed), spec_config=DraftConfig(k=k))
    out = engine.generate(ids, max_new_tokens=max_new_tokens)
    assert out.tolist() == expected.tolist()
    stats = engine.stats
    assert stats.new_tokens == max_new_tokens and stats.tau == pytest.approx(max_new_tokens / stats.target_steps)
    if kind == "copy":
        assert stats.target_steps == 1 + -(-(max_new_tokens - 1) // (k + 1))


def test_eos_inside_a_speculative_step():
    config = testing.tiny_config("mistral")
    target = testing.tiny_model(config, 3, dtype=torch.float64)
    ids = testing.random_ids(config, 3, length=4)
    ar = hsd.compile(target, max_seq_len=48, prefill_chunk=4)
    free = ar.generate(ids, max_new_tokens=16)[0, 4:].tolist()
    eos = next(t for i, t in enumerate(free) if i >= 3 and t not in free[:i])   # first seen mid-run
    expected = ar.generate(ids, max_new_tokens=16, eos_token_id=eos)
    engine = hsd.compile(target, max_seq_len=48, prefill_chunk=4, spec="draft", draft=target,
                         spec_config=DraftConfig(k=5))
    out = engine.generate(ids, max_new_tokens=16, eos_token_id=eos)
    assert out.tolist() == expected.tolist() and int(out[0, -1]) == eos


def chi_square_p_value(observed, expected_probs):
    """Pearson's chi-square test; cells expected below 5 counts are pooled."""
    n = observed.sum()
    expected = expected_probs * n
    small = expected < 5
    obs, exp = observed[~small], expected[~small]
    if small.any():
        obs = torch.cat([obs, observed[small].sum()[None]])
        exp = torch.cat([exp, expected[small].sum()[None]])
    stat = ((obs - exp) ** 2 / exp).sum()
    return float(torch.special.gammaincc(torch.tensor((len(obs) - 1) / 2), stat / 2))


def test_sampling_matches_the_target_distribution():
    """The first two sampled tokens under speculation follow the target's joint distribution.
    With the seed fixed the test is deterministic; for a random seed it fails with p < 1e-3."""
    config = testing.tiny_config("llama", vocab_size=8, hidden_size=32, intermediate_size=64,
                                 num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=1,
                                 initializer_range=0.3)
    target = testing.tiny_model(config, 0, dtype=torch.float64)
    draft = perturbed(target, 0.3, 1)
    ids = testing.random_ids(config, 0, length=3)
    engine = hsd.compile(target, max_seq_len=16, prefill_chunk=4, spec="draft", draft=draft,
                         spec_config=DraftConfig(k=2))
    torch.manual_seed(0)
    samples = 1200
    counts = torch.zeros(8 * 8, dtype=torch.float64)
    for _ in range(samples):
        first, second = engine.generate(ids, max_new_tokens=2, temperature=1.0)[0, 3:].tolist()
        counts[first * 8 + second] += 1
    with torch.no_grad():
        p1 = torch.softmax(target(ids).logits[0, -1], -1)
        nxt = torch.cat([ids.repeat(8, 1), torch.arange(8)[:, None]], 1)
        p2 = torch.softmax(target(nxt).logits[:, -1], -1)
    assert chi_square_p_value(counts, (p1[:, None] * p2).reshape(-1)) > 1e-3


def test_bad_speculation_settings_are_refused():
    config = testing.tiny_config()
    target = testing.tiny_model(config)
    with pytest.raises(ValueError, match="unknown spec 'medusa'; known: draft"):
        hsd.compile(target, spec="medusa")
    with pytest.raises(ValueError, match="needs draft="):
        hsd.compile(target, spec="draft")
    other = testing.tiny_model(testing.tiny_config(vocab_size=64))
    with pytest.raises(ValueError, match="draft vocab 64 != target vocab 96"):
        hsd.compile(target, spec="draft", draft=other)
    with pytest.raises(ValueError, match="draft k must be in 1..127"):
        hsd.compile(target, spec="draft", draft=target, spec_config=DraftConfig(k=200))
    engine = hsd.compile(target, max_seq_len=16, prefill_chunk=4, spec="draft", draft=target,
                         spec_config=DraftConfig(k=4))
    with pytest.raises(ValueError, match="exceeds the KV cache's max_seq_len=16"):
        engine.generate(testing.random_ids(config, length=6), max_new_tokens=6)


@given(testing.model_configs(width_multiple=32), testing.seeds(), st.sampled_from([4, 8]), st.integers(1, 4))
def test_qspec_is_lossless_against_w4a16_autoregressive(config, seed, bits, k):
    """With 4-bit drafts the target is the Hadamard-rotated W4A16 model: QSpec must equal its AR."""
    target = testing.tiny_model(config, seed, dtype=torch.float64)
    ids = testing.random_ids(config, seed, length=4)
    kwargs = dict(quant="w4a16", group_size=32, max_seq_len=40, prefill_chunk=4)
    engine = hsd.compile(target, **kwargs, spec="qspec", spec_config=hsd.spec.QSpecConfig(k=k, act_bits=bits))
    rotated = any(isinstance(p, hsd.passes.RotateHadamard) for p in engine.target.passes.passes)
    assert rotated == (bits == 4)
    reference = hsd.compile(target, **kwargs, passes=[hsd.passes.RotateHadamard()] if rotated else [])
    expected = reference.generate(ids, max_new_tokens=14)
    assert engine.generate(ids, max_new_tokens=14).tolist() == expected.tolist()
    assert engine.stats.tau >= 1.0


def test_qspec_shares_weights_and_cache():
    config = testing.tiny_config()
    engine = hsd.compile(testing.tiny_model(config), quant="w4a16", group_size=32, max_seq_len=32,
                         prefill_chunk=4, spec="qspec")
    engine.generate(testing.random_ids(config, length=4), max_new_tokens=8)
    target, draft = engine.pipeline.target, engine.pipeline.draft
    assert draft.cache is target.cache
    verify, drafting = target.graphs[4], draft.graphs[1]   # the k + 1 = 4 verify step, a draft step
    name = "model.layers.0.mlp.down_proj.qweight"
    assert verify.get_buffer(name).data_ptr() == drafting.get_buffer(name).data_ptr()
    kinds, verify_kinds = hsd.passes.node_kinds(drafting), hsd.passes.node_kinds(verify)
    quantized_inputs = kinds["hsd.quantize_per_token"] + kinds["hsd.rmsnorm_quant"]   # norm + quant fused
    assert quantized_inputs == kinds["hsd.w4a8_linear"] == verify_kinds["hsd.w4a16_linear"] > 0
    assert kinds["hsd.rmsnorm_quant"] == 2 * config.num_hidden_layers
    assert kinds["hsd.w4a16_linear"] == 0
    with pytest.raises(ValueError, match="needs a quantized engine"):
        hsd.compile(testing.tiny_model(config), spec="qspec")


def test_no_recompilation_after_warm_up():
    """Every step shape is captured once; later generations run the compiled steps only."""
    from torch._dynamo.utils import counters
    config = testing.tiny_config()
    target = testing.tiny_model(config, dtype=torch.float64)
    engine = hsd.compile(target, max_seq_len=48, prefill_chunk=4, spec="draft", draft=perturbed(target, 0.05, 0),
                         spec_config=DraftConfig(k=3))
    engine.generate(testing.random_ids(config, 0, length=6), max_new_tokens=12)
    captured = counters["stats"]["unique_graphs"]
    graphs = (set(engine.target.graphs), set(engine.pipeline.draft.graphs))
    for seed in (1, 2):
        engine.generate(testing.random_ids(config, seed, length=3 + seed), max_new_tokens=15)
    assert counters["stats"]["unique_graphs"] == captured
    assert (set(engine.target.graphs), set(engine.pipeline.draft.graphs)) == graphs == ({4}, {1, 2, 4})


def test_qspec_runs_a_batch_whose_rows_match_autoregressive():
    """Rows accept different numbers of drafts and stop at EOS at different steps."""
    config = testing.tiny_config()
    target = testing.tiny_model(config, 0, dtype=torch.float64)
    ids = testing.random_ids(config, 0, batch=3, length=5)
    kwargs = dict(quant="w4a16", group_size=32, max_seq_len=48, prefill_chunk=4, batch_size=3)
    ar = hsd.compile(target, **kwargs)
    eos = int(ar.generate(ids, max_new_tokens=16)[1, 5 + 6])   # row 1 stops early
    expected = ar.generate(ids, max_new_tokens=16, eos_token_id=eos)
    engine = hsd.compile(target, **kwargs, spec="qspec", spec_config=hsd.spec.QSpecConfig(k=3, act_bits=8))
    assert engine.generate(ids, max_new_tokens=16, eos_token_id=eos).tolist() == expected.tolist()
    assert 1.0 <= engine.stats.tau <= 4.0
