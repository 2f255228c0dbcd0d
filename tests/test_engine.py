import pytest
import torch
from hypothesis import given, strategies as st

import hsd
from hsd import testing
from hsd.kernels import registry


@given(testing.model_configs(), testing.seeds(), st.integers(1, 12))
def test_compiled_logits_equal_eager(config, seed, length):
    model = testing.tiny_model(config, seed)
    engine = hsd.compile(model, max_seq_len=32, prefill_chunk=5)
    testing.assert_engine_matches_model(engine, model, testing.random_ids(config, seed, length=length))


@given(testing.model_configs(), testing.seeds())
def test_generate_equals_transformers_greedy(config, seed):
    model = testing.tiny_model(config, seed, dtype=torch.float64)
    engine = hsd.compile(model, max_seq_len=48, prefill_chunk=4)
    testing.assert_generate_matches_hf(engine, model, testing.random_ids(config, seed, length=5), max_new_tokens=16)


def test_generate_stops_at_eos_like_transformers():
    config = testing.tiny_config("qwen2")
    model = testing.tiny_model(config, dtype=torch.float64)
    engine = hsd.compile(model, max_seq_len=48, prefill_chunk=4)
    ids = testing.random_ids(config, length=5)
    free = engine.generate(ids, max_new_tokens=12)
    eos = int(free[0, 5 + 6])  # the 7th generated token
    out = engine.generate(ids, max_new_tokens=12, eos_token_id=eos)
    assert out.shape[1] <= 5 + 7 and int(out[0, -1]) == eos
    testing.assert_generate_matches_hf(engine, model, ids, max_new_tokens=12, eos_token_id=eos)
    assert engine.stats.new_tokens == out.shape[1] - 5


def test_batched_generate_equals_per_row():
    config = testing.tiny_config("mistral")
    model = testing.tiny_model(config, dtype=torch.float64)
    ids = testing.random_ids(config, batch=3, length=6)
    batched = hsd.compile(model, max_seq_len=32, batch_size=3, prefill_chunk=4).generate(ids, max_new_tokens=8)
    single = hsd.compile(model, max_seq_len=32, prefill_chunk=4)
    for row in range(3):
        assert batched[row].tolist() == single.generate(ids[row:row + 1], max_new_tokens=8)[0].tolist()


@given(testing.model_configs(width_multiple=32), testing.seeds(), st.sampled_from([32, -1]))
def test_w4a16_engine_equals_round_to_nearest_reference(config, seed, group_size):
    model = testing.tiny_model(config, seed)
    ids = testing.random_ids(config, seed, length=6)
    engine = hsd.compile(model, quant="w4a16", group_size=group_size, max_seq_len=16, prefill_chunk=6)
    reference = testing.fake_quantized(model, group_size)
    testing.assert_engine_matches_model(engine, reference, ids, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        expected = testing.sqnr_db(model(ids).logits, reference(ids).logits)
    testing.assert_engine_matches_model(engine, model, ids, min_sqnr_db=expected - 0.5)


def test_w4a16_engine_with_the_triton_kernel_under_the_interpreter():
    config = testing.tiny_config()
    model = testing.tiny_model(config)
    ids = testing.random_ids(config, length=6)
    with registry.use("w4a16_linear", "triton"):
        engine = hsd.compile(model, quant="w4a16", group_size=32, max_seq_len=16, prefill_chunk=6)
        testing.assert_engine_matches_model(engine, testing.fake_quantized(model, 32), ids, atol=1e-4, rtol=1e-4)


def test_bad_inputs_give_clear_errors():
    config = testing.tiny_config()
    engine = hsd.compile(testing.tiny_model(config), max_seq_len=16, prefill_chunk=4)
    ids = testing.random_ids(config, length=10)
    with pytest.raises(ValueError, match="exceeds the KV cache's max_seq_len=16"):
        engine.generate(ids, max_new_tokens=7)
    with pytest.raises(ValueError, match="compiled for batch_size=1"):
        engine.generate(testing.random_ids(config, batch=2), max_new_tokens=2)
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, 96\)"):
        engine(torch.full((1, 3), 96))
    with pytest.raises(ValueError, match="shape \\[batch, tokens\\]"):
        engine(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown backend"):
        hsd.compile(testing.tiny_model(config), backend="tvm")
    assert engine.generate(ids, max_new_tokens=6).shape == (1, 16)  # the engine still works


def test_compile_from_a_checkpoint_path(tmp_path):
    config = testing.tiny_config("qwen2")
    model = testing.tiny_model(config)
    model.save_pretrained(tmp_path)
    engine = hsd.compile(str(tmp_path), dtype=torch.float32, max_seq_len=16, prefill_chunk=4)
    testing.assert_engine_matches_model(engine, model, testing.random_ids(config))


def test_engine_with_triton_attention_under_the_interpreter():
    config = testing.tiny_config("qwen2")
    model = testing.tiny_model(config)
    with registry.use("attention", "triton"):
        engine = hsd.compile(model, max_seq_len=24, prefill_chunk=4)
        ids = testing.random_ids(config, length=6)
        testing.assert_engine_matches_model(engine, model, ids)
        tokens = engine.generate(ids, max_new_tokens=6)
    reference = hsd.compile(model, max_seq_len=24, prefill_chunk=4).generate(ids, max_new_tokens=6)
    assert tokens.tolist() == reference.tolist()
