import torch
from hypothesis import given

import hsd
from hsd import testing
from hsd.passes import PassManager, RewriteAttention, node_kinds


@given(testing.model_configs(), testing.seeds())
def test_rewrite_attention_removes_sdpa_and_mask_code(config, seed):
    gm = hsd.capture.capture(testing.tiny_model(config, seed), 1, 5)
    assert node_kinds(gm)["scaled_dot_product_attention"] == config.num_hidden_layers
    gm, _ = PassManager([RewriteAttention()])(gm)
    kinds = node_kinds(gm)
    assert kinds["hsd.attention"] == config.num_hidden_layers
    assert kinds["scaled_dot_product_attention"] == 0 and kinds["cumsum"] == 0 and kinds["repeat_interleave"] == 0
    assert [n.target for n in gm.graph.nodes if n.op == "placeholder"] == list(hsd.passes.STEP_INPUTS)


@given(testing.model_configs(), testing.seeds())
def test_cached_chunks_equal_one_full_pass(config, seed):
    """Prefill in chunks of 3 over the static cache == the cache-less forward over all tokens."""
    model = testing.tiny_model(config, seed)
    ids = testing.random_ids(config, seed, length=8)
    engine = hsd.compile(model, max_seq_len=16, prefill_chunk=3, fuse=False)
    testing.assert_engine_matches_model(engine, model, ids, atol=1e-5, rtol=1e-5)
    assert int(engine.cache.length) == 8
