"""Tree verification over the static cache: every node's logits equal those of its root-to-node
path run sequentially; after acceptance and compaction decoding continues as if sequential."""
import pytest
import torch
from hypothesis import given, strategies as st

import hsd
from hsd import testing


@st.composite
def trees(draw, max_nodes=12):
    n = draw(st.integers(1, max_nodes))
    return [-1] + [draw(st.integers(0, i - 1)) for i in range(1, n)]


def path_to(parents, node):
    path = [node]
    while parents[path[-1]] >= 0:
        path.append(parents[path[-1]])
    return path[::-1]


def sequential_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits[0, -1]


@given(testing.model_configs(), testing.seeds(), trees(), st.integers(1, 9))
def test_tree_logits_equal_per_path_sequential_logits(config, seed, parents, prompt_len):
    model = testing.tiny_model(config, seed, dtype=torch.float64)
    engine = hsd.compile(model, max_seq_len=32, prefill_chunk=4)
    prompt = testing.random_ids(config, seed, length=prompt_len)
    nodes = testing.random_ids(config, seed + 1, length=len(parents))
    engine(prompt)  # prefill: the cache now holds the prompt
    logits, _ = engine.verify(nodes, parents)
    for node in range(len(parents)):
        ids = torch.cat([prompt, nodes[:, path_to(parents, node)]], 1)
        torch.testing.assert_close(logits[0, node], sequential_logits(model, ids), atol=1e-9, rtol=1e-9)


@given(testing.model_configs(), testing.seeds(), trees(), st.data())
def test_decoding_after_accepting_a_path_equals_sequential(config, seed, parents, data):
    model = testing.tiny_model(config, seed, dtype=torch.float64)
    engine = hsd.compile(model, max_seq_len=32, prefill_chunk=4)
    prompt = testing.random_ids(config, seed, length=5)
    nodes = testing.random_ids(config, seed + 1, length=len(parents))
    engine(prompt)
    engine.verify(nodes, parents)
    path = path_to(parents, data.draw(st.integers(0, len(parents) - 1)))
    engine.accept(torch.tensor([path]))
    assert int(engine.cache.length) == 5 + len(path)
    nxt = testing.random_ids(config, seed + 2, length=1)
    logits, _ = engine.verify(nxt, [-1])
    ids = torch.cat([prompt, nodes[:, path], nxt], 1)
    torch.testing.assert_close(logits[0, 0], sequential_logits(model, ids), atol=1e-9, rtol=1e-9)


def test_bad_trees_are_refused_and_leave_the_cache_unchanged():
    config = testing.tiny_config()
    engine = hsd.compile(testing.tiny_model(config), max_seq_len=16, prefill_chunk=4)
    engine(testing.random_ids(config, length=10))
    k, length = engine.cache.k.clone(), engine.cache.length.clone()
    with pytest.raises(ValueError, match="0 <= parent\\[i\\] < i"):
        engine.verify(testing.random_ids(config, length=3), [-1, 2, 0])
    with pytest.raises(ValueError, match="does not fit: the cache holds 10 of max_seq_len=16"):
        engine.verify(testing.random_ids(config, length=7), [-1, 0, 1, 2, 3, 4, 5])
    with pytest.raises(ValueError, match="exceeds the attention op's limit of 128"):
        engine.verify(testing.random_ids(config, length=129), [-1] + list(range(128)))
    assert torch.equal(engine.cache.k, k) and torch.equal(engine.cache.length, length)
