"""EAGLE-1 head and EAGLE-2 pipeline: greedy output equals autoregressive decoding token for
token, sampled output follows the target's distribution, the head's state equals sequential
drafting, tree acceptance and reranking on hand-made trees, checkpoint loading."""
import itertools
import json
import tempfile

import pytest
import torch
from hypothesis import given, settings, strategies as st
from safetensors.torch import load_file, save_file

import hsd
from hsd import testing
from hsd.eagle import load_eagle_head, save_random_eagle_head
from hsd.eagle2 import Eagle2Config, Eagle2Pipeline, _rerank, draft_tree, greedy_accept

SMALL_TREE = Eagle2Config(depth=3, top_k=4, total_tokens=12, quantize_lm_head=False)


def build(config, seed, tree=SMALL_TREE, max_seq_len=64, prefill_chunk=4):
    """A compiled fp64 target and an EAGLE-2 pipeline with a random head written to disk and
    loaded back in the public layout."""
    model = testing.tiny_model(config, seed, torch.float64)
    engine = hsd.compile(model, max_seq_len=max_seq_len, prefill_chunk=prefill_chunk)
    with tempfile.TemporaryDirectory() as d:
        head = load_eagle_head(save_random_eagle_head(d, config, seed + 1), model)
    return engine, Eagle2Pipeline(engine, head, tree)


# ---- acceptance and reranking on hand-made trees ----------------------------------------------

def accept(parents, tokens, choice):
    return greedy_accept(torch.tensor(parents), torch.tensor(tokens), torch.tensor(choice))


def test_greedy_accept_takes_the_deepest_correct_path_and_the_bonus():
    #          0
    #        /   \
    #   1 (a=1)  2 (b=2)
    #    /  \       \
    # 3(3)  4(4)    5(5)
    #  |
    # 6(6)
    parents = [-1, 0, 0, 1, 1, 2, 3]
    tokens = [9, 1, 2, 3, 4, 5, 6]
    assert accept(parents, tokens, [1, 3, 0, 6, 0, 0, 7]) == ([0, 1, 3, 6], [1, 3, 6, 7])
    assert accept(parents, tokens, [1, 4, 0, 0, 8, 0, 0]) == ([0, 1, 4], [1, 4, 8])
    assert accept(parents, tokens, [7, 3, 5, 6, 0, 0, 0]) == ([0], [7])   # root's choice is no child
    # node 3 matches its parent's choice, but node 1 is wrong: only the other branch counts
    assert accept(parents, tokens, [2, 3, 5, 6, 0, 8, 0]) == ([0, 2, 5], [2, 5, 8])


def test_greedy_accept_on_a_chain():
    assert accept([-1, 0, 1, 2], [5, 6, 7, 8], [6, 7, 8, 9]) == ([0, 1, 2, 3], [6, 7, 8, 9])
    assert accept([-1, 0, 1, 2], [5, 6, 7, 8], [6, 0, 8, 9]) == ([0, 1], [6, 0])


def test_rerank_keeps_a_connected_tree_under_score_ties():
    # candidates 0, 1: the root's children; 2..5: children of 0, 0, 1, 1; all scores tie
    scores = torch.zeros(6)
    tokens = torch.tensor([10, 11, 12, 13, 14, 15])
    parents = torch.tensor([-1, -1, 0, 0, 1, 1])
    for n in range(2, 8):
        node_tokens, node_parents = _rerank(scores, tokens, parents, torch.tensor(99), n)
        assert node_parents[0] == -1 and all(0 <= p < i for i, p in enumerate(node_parents.tolist()) if i)
        assert node_tokens.tolist() == [99, 10, 11, 12, 13, 14, 15][:n]


def test_rerank_keeps_the_best_scores():
    scores = torch.tensor([-1.0, -0.5, -3.0, -1.2, -0.7, -4.0])
    tokens = torch.tensor([10, 11, 12, 13, 14, 15])
    parents = torch.tensor([-1, -1, 0, 0, 1, 1])
    node_tokens, node_parents = _rerank(scores, tokens, parents, torch.tensor(99), 5)
    assert node_tokens.tolist() == [99, 10, 11, 13, 14]
    assert node_parents.tolist() == [-1, 0, 0, 1, 2]


# ---- drafting ---------------------------------------------------------------------------------

def test_draft_tree_nodes_are_top_k_of_sequential_drafting():
    """Every drafted node's token is among the top_k of the head run sequentially along its
    path: the tree-masked batched drafting computes what drafting each path alone would."""
    config = testing.tiny_config(vocab_size=64)
    tree = Eagle2Config(depth=4, top_k=3, total_tokens=16)
    engine, pipe = build(config, 3, tree)
    head = pipe.head
    prompt = testing.random_ids(config, 3, length=6)
    _, features = engine.prefill(prompt)
    root = torch.tensor(5)
    root_hidden = head.extend(torch.cat([prompt[:, 1:], root.view(1, 1)], 1), features)[0]
    tokens, parents = draft_tree(head, root, root_hidden, tree)
    committed = head.cache.length.clone()
    parents, tokens = parents.tolist(), tokens.tolist()
    assert len(tokens) == 16 and parents[0] == -1 and all(0 <= p < i for i, p in enumerate(parents) if i)
    for i in range(1, len(tokens)):
        siblings = [tokens[j] for j in range(1, len(tokens)) if parents[j] == parents[i]]
        assert len(set(siblings)) == len(siblings)
        path = []
        node = parents[i]
        while node > 0:
            path.insert(0, tokens[node])
            node = parents[node]
        assert len(path) < tree.depth
        hidden = root_hidden
        for token in path:
            hidden = head.extend(torch.tensor([[token]]), hidden.view(1, 1, -1))[0]
        head.cache.length.copy_(committed)
        assert tokens[i] in torch.log_softmax(head.logits(hidden), -1).topk(tree.top_k).indices.tolist()


# ---- greedy: lossless -------------------------------------------------------------------------

@settings(max_examples=5, deadline=None)
@given(testing.model_configs(), testing.seeds(), st.integers(1, 20), st.booleans(),
       st.sampled_from([SMALL_TREE, Eagle2Config()]), st.data())
def test_eagle2_greedy_equals_autoregressive(config, seed, max_new_tokens, use_eos, tree, data):
    engine, pipe = build(config, seed, tree, max_seq_len=96)
    prompt = testing.random_ids(config, seed, length=data.draw(st.integers(1, 9)))
    eos = None
    if use_eos:
        ref = engine.generate(prompt, max_new_tokens)
        eos = data.draw(st.sampled_from(ref[0, prompt.shape[1]:].tolist()))
    ref = engine.generate(prompt, max_new_tokens, eos_token_id=eos)
    out = pipe.generate(prompt, max_new_tokens, eos_token_id=eos)
    assert out.tolist() == ref.tolist()


@pytest.fixture(scope="module")
def accepting():
    """A vocabulary-8 target whose random head gets several tokens accepted per step."""
    config = testing.tiny_config(vocab_size=8)
    engine, pipe = build(config, 1, max_seq_len=200, prefill_chunk=64)
    return engine, pipe, testing.random_ids(config, 1, length=9)


def test_eagle2_greedy_stops_inside_speculative_steps(accepting):
    """Steps accept several tokens (tau > 1.5), so some of these limits and EOS tokens fall
    inside a step: the tokens accepted past them are dropped."""
    engine, pipe, prompt = accepting
    ref = engine.generate(prompt, 24)
    assert pipe.generate(prompt, 24).tolist() == ref.tolist()
    assert pipe.stats.tau > 1.5 and pipe.stats.new_tokens == 24
    for max_new_tokens in range(1, 13):
        assert pipe.generate(prompt, max_new_tokens).tolist() == ref[:, :prompt.shape[1] + max_new_tokens].tolist()
    for eos in set(ref[0, prompt.shape[1]:].tolist()):
        assert pipe.generate(prompt, 24, eos_token_id=eos).tolist() == \
            engine.generate(prompt, 24, eos_token_id=eos).tolist()


def test_head_state_equals_sequential_drafting(accepting):
    """After generation the head's cache holds what feeding it the whole text with the
    target's features would give (a 130-token prompt also runs its prefill in two chunks)."""
    engine, pipe, _ = accepting
    prompt = testing.random_ids(engine.config, 5, length=130)
    out = pipe.generate(prompt, 30)
    head = pipe.head
    n = min(int(head.cache.length), out.shape[1] - 1)
    k, v = head.cache.k[..., :n, :].clone(), head.cache.v[..., :n, :].clone()
    _, features = engine.prefill(out[:, :n])
    head.cache.reset()
    head.extend(out[:, 1:n + 1], features)
    torch.testing.assert_close(head.cache.k[..., :n, :], k, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(head.cache.v[..., :n, :], v, atol=1e-9, rtol=1e-9)


# ---- sampling: the target's distribution ------------------------------------------------------

def chi_square_p_value(counts, expected):
    """Pearson's test; cells expecting fewer than 5 are pooled."""
    small = expected < 5
    counts = torch.cat([counts[~small], counts[small].sum()[None]])
    expected = torch.cat([expected[~small], expected[small].sum()[None]])
    stat = ((counts - expected) ** 2 / expected.clamp(min=1e-12)).sum()
    dof = torch.tensor((expected > 0).sum().item() - 1, dtype=torch.float64)
    return float(torch.special.gammaincc(dof / 2, stat / 2))


def test_eagle2_sampling_follows_the_target_distribution():
    """The first three new tokens (the second and third through verified trees, accepted or
    not) are distributed as the target's own sampling: chi-square over the 64 triples of a
    vocabulary-4 target. A correct implementation fails for a fraction 1e-3 of seeds; the
    seed is fixed."""
    vocab, temperature, samples = 4, 0.8, 1500
    config = testing.tiny_config(vocab_size=vocab, num_hidden_layers=1)
    engine, pipe = build(config, 3, Eagle2Config(depth=2, top_k=2, total_tokens=6), max_seq_len=16, prefill_chunk=8)
    prompt = testing.random_ids(config, 3, length=5)
    expected = torch.ones(1, dtype=torch.float64)
    with torch.no_grad():
        for length in range(3):   # expected[t1 .. tn] = p(t1) p(t2 | t1) ... for every prefix
            prefixes = torch.tensor(list(itertools.product(range(vocab), repeat=length)), dtype=torch.long)
            prefixes = prefixes.reshape(vocab ** length, length)
            ids = torch.cat([prompt.expand(len(expected), -1), prefixes], 1)
            p = torch.softmax(engine.model(ids).logits[:, -1] / temperature, -1)
            expected = (expected[:, None] * p).flatten()
    torch.manual_seed(0)
    counts = torch.zeros(vocab ** 3, dtype=torch.float64)
    for _ in range(samples):
        x1, x2, x3 = pipe.generate(prompt, 3, temperature=temperature)[0, -3:].tolist()
        counts[(x1 * vocab + x2) * vocab + x3] += 1
    assert chi_square_p_value(counts, expected * samples) > 1e-3


# ---- configuration and loading ----------------------------------------------------------------

def test_config_and_request_errors():
    with pytest.raises(ValueError, match="limit of 128"):
        Eagle2Config(total_tokens=129)
    with pytest.raises(ValueError, match="only 6 candidates"):
        Eagle2Config(depth=2, top_k=2, total_tokens=10)
    with pytest.raises(ValueError, match="depth >= 1"):
        Eagle2Config(depth=0)
    config = testing.tiny_config()
    _, pipe = build(config, 0, max_seq_len=32)
    with pytest.raises(ValueError, match="exceeds the KV cache's max_seq_len=32"):
        pipe.generate(testing.random_ids(config, length=10), 12)


def test_spec_eagle2_in_compile():
    config = testing.tiny_config(vocab_size=8)
    model = testing.tiny_model(config, 1, torch.float64)
    prompt = testing.random_ids(config, 1, length=9)
    with tempfile.TemporaryDirectory() as d:
        save_random_eagle_head(d, config, 2)
        engine = hsd.compile(model, max_seq_len=64, prefill_chunk=8, spec="eagle2", draft=d, spec_config=SMALL_TREE)
    assert engine.generate(prompt, 16).tolist() == engine.target.generate(prompt, 16).tolist()
    assert engine.stats.tau > 1
    with pytest.raises(ValueError, match='spec="eagle2" needs draft='):
        hsd.compile(model, spec="eagle2")


@pytest.fixture
def head_dir(tmp_path):
    config = testing.tiny_config()
    return save_random_eagle_head(tmp_path / "head", config, 0), testing.tiny_model(config, 0)


def test_safetensors_and_bin_load_the_same_head(head_dir, tmp_path):
    path, model = head_dir
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((path / "config.json").read_text())
    torch.save(load_file(path / "model.safetensors"), tmp_path / "bin" / "pytorch_model.bin")
    a, b = load_eagle_head(path, model), load_eagle_head(tmp_path / "bin", model)
    for (key, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), key
    assert set(a.state_dict()) == {
        "fc.weight", "fc.bias", "layers.0.post_attention_layernorm.weight",
        *(f"layers.0.self_attn.{p}_proj.weight" for p in "qkvo"),
        *(f"layers.0.mlp.{p}_proj.weight" for p in ("gate", "up", "down"))}


def test_checkpoint_embedding_and_bias_flag(head_dir):
    path, model = head_dir
    weights = load_file(path / "model.safetensors")
    embedding = torch.randn(model.config.vocab_size, model.config.hidden_size)
    del weights["fc.bias"]
    save_file({**weights, "embed_tokens.weight": embedding}, path / "model.safetensors")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "bias": False}))
    head = load_eagle_head(path, model)
    assert head.fc.bias is None
    assert torch.equal(head.embed(torch.tensor([3])), embedding[3:4])


@pytest.mark.parametrize("change, error, match", [
    ("hidden", ValueError, "hidden_size 32 != target hidden_size 64"),
    ("vocab", ValueError, "vocab_size 64 != target vocab_size 96"),
    ("missing", KeyError, "lacks layers.0.mlp.up_proj.weight"),
    ("extra", KeyError, "unexpected keys layers.0.input_layernorm.weight"),
    ("no weights", FileNotFoundError, "no model.safetensors or pytorch_model.bin"),
])
def test_bad_checkpoints_are_refused_clearly(head_dir, tmp_path, change, error, match):
    path, model = head_dir
    weights = load_file(path / "model.safetensors")
    if change == "hidden":
        path = save_random_eagle_head(tmp_path / "h", testing.tiny_config(hidden_size=32, num_attention_heads=2,
                                                                          num_key_value_heads=1))
    elif change == "vocab":
        path = save_random_eagle_head(tmp_path / "v", testing.tiny_config(vocab_size=64))
    elif change == "missing":
        del weights["layers.0.mlp.up_proj.weight"]
        save_file(weights, path / "model.safetensors")
    elif change == "extra":
        weights["layers.0.input_layernorm.weight"] = torch.ones(64)
        weights["layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)   # old checkpoints: ignored
        save_file(weights, path / "model.safetensors")
    else:
        (path / "model.safetensors").unlink()
    with pytest.raises(error, match=match):
        load_eagle_head(path, model)


def test_a_target_without_materialised_embedding_is_refused(head_dir):
    path, model = head_dir
    with torch.device("meta"):
        skeleton = testing.tiny_model(model.config)
    with pytest.raises(ValueError, match="on the meta device"):
        load_eagle_head(path, skeleton)



@torch.no_grad()
def test_quantized_draft_lm_head_is_the_w4a16_lm_head(head_dir):
    """quantize_lm_head: the head's logits are the round-to-nearest W4A16 lm_head's."""
    from hsd.kernels import w4a16
    path, model = head_dir
    config = model.config
    head = load_eagle_head(path, model)
    hidden = torch.randn(3, config.hidden_size)
    exact = head.logits(hidden)
    head.attach(model, quantize_lm_head=True)
    w = model.lm_head.weight
    group = 128 if w.shape[1] % 128 == 0 else w.shape[1]
    expected = w4a16.w4a16_linear_reference(hidden, *w4a16.quantize_rtn(w, group), None, group)
    torch.testing.assert_close(head.logits(hidden), expected)
    assert testing.sqnr_db(exact, head.logits(hidden)) > 15
