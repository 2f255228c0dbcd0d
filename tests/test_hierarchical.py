"""Hierarchical speculation: EAGLE head -> intermediate model -> target, lossless against AR."""
import copy

import pytest
import torch
from hypothesis import given, strategies as st

import hsd
from hsd import testing
from hsd.eagle import save_random_eagle_head
from hsd.eagle2 import Eagle2Config
from hsd.hierarchical import HierarchicalConfig
from hsd.sampling import accept_chain

SMALL = dict(tree=Eagle2Config(depth=2, top_k=3, total_tokens=6), min_draft=3, chain=6)


def intermediate_for(kind, target, config, seed):
    if kind == "copy":
        return target
    if kind == "perturbed":
        torch.manual_seed(seed)
        mid = copy.deepcopy(target)
        with torch.no_grad():
            for p in mid.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        return mid
    other = testing.tiny_config("qwen2", vocab_size=config.vocab_size, num_hidden_layers=1)
    return testing.tiny_model(other, seed + 1, dtype=torch.float64)


@given(testing.model_configs(), testing.seeds(), st.sampled_from(["copy", "perturbed", "other"]),
       st.integers(1, 24), st.booleans())
def test_hierarchical_is_lossless(tmp_path_factory, config, seed, kind, max_new_tokens, with_eos):
    target = testing.tiny_model(config, seed, dtype=torch.float64)
    mid = intermediate_for(kind, target, config, seed)
    head_dir = tmp_path_factory.mktemp("head")
    save_random_eagle_head(head_dir, mid.config, seed)
    ids = testing.random_ids(config, seed, length=5)
    ar = hsd.compile(target, max_seq_len=64, prefill_chunk=4)
    eos = None
    if with_eos:  # a token the AR output produces mid-way, so a speculative step overshoots it
        free = ar.generate(ids, max_new_tokens=max_new_tokens)[0, 5:].tolist()
        eos = free[len(free) // 2]
    expected = ar.generate(ids, max_new_tokens=max_new_tokens, eos_token_id=eos)
    engine = hsd.compile(target, max_seq_len=64, prefill_chunk=4, spec="hierarchical", intermediate=mid,
                         draft=str(head_dir), spec_config=HierarchicalConfig(**SMALL))
    out = engine.generate(ids, max_new_tokens=max_new_tokens, eos_token_id=eos)
    assert out.tolist() == expected.tolist()
    assert engine.stats.new_tokens == out.shape[1] - 5
    assert engine.stats.tau == pytest.approx(engine.stats.new_tokens / engine.stats.target_steps)


def test_deterministic_draft_keeps_the_target_distribution():
    """accept_chain with a one-hot draft (the hierarchical sequence draft): the first output
    token is distributed as p. 20000 trials; fails by chance with p < 1e-3."""
    torch.manual_seed(0)
    p_logits = torch.randn(2, 6, dtype=torch.float64)
    draft = torch.tensor([2])
    one_hot = torch.nn.functional.one_hot(draft, 6).double()
    counts = torch.zeros(6, dtype=torch.float64)
    for _ in range(20000):
        n, nxt = accept_chain(p_logits[None], draft[None], one_hot[None], 1.0)
        counts[int(draft[0]) if int(n[0]) == 1 else int(nxt[0])] += 1
    from tests.test_spec import chi_square_p_value
    assert chi_square_p_value(counts, torch.softmax(p_logits[0], -1)) > 1e-3


def test_bad_hierarchical_settings(tmp_path):
    config = testing.tiny_config()
    target = testing.tiny_model(config)
    save_random_eagle_head(tmp_path, config, 0)
    with pytest.raises(ValueError, match="needs intermediate="):
        hsd.compile(target, spec="hierarchical", draft=str(tmp_path))
    with pytest.raises(ValueError, match='intermediate= is for spec="hierarchical"'):
        hsd.compile(target, spec="draft", draft=target, intermediate=target)
    other = testing.tiny_model(testing.tiny_config(vocab_size=64))
    with pytest.raises(ValueError, match="intermediate vocab 64 != target vocab 96"):
        hsd.compile(target, spec="hierarchical", intermediate=other, draft=str(tmp_path))
    with pytest.raises(ValueError, match="min_draft < chain"):
        hsd.compile(target, spec="hierarchical", intermediate=target, draft=str(tmp_path),
                    spec_config=HierarchicalConfig(min_draft=10, chain=10))
