import operator

import pytest
import torch

import hsd
from hsd import testing
from hsd.capture import is_linear
from hsd.passes import FuseSiblingLinears, Pass, PassError, PassManager


def lm_head_node(gm):
    return next(n for n in gm.graph.nodes if is_linear(n) and n.meta["hsd_module"] == "lm_head")


def negate_logits(gm):
    """A user pass: the lm_head Linear becomes -(lm_head)."""
    node = lm_head_node(gm)
    with gm.graph.inserting_after(node):
        neg = gm.graph.call_function(operator.neg, (node,))
    node.replace_all_uses_with(neg, delete_user_cb=lambda user: user is not neg)


def test_user_pass_rewriting_lm_head_is_honoured():
    config = testing.tiny_config()
    model = testing.tiny_model(config)
    ids = testing.random_ids(config)
    engine = hsd.compile(model, passes=[negate_logits], max_seq_len=32, prefill_chunk=8)
    with torch.no_grad():
        torch.testing.assert_close(engine(ids).logits, -model(ids).logits, atol=1e-4, rtol=1e-4)
    report = engine.pass_report[8]
    assert [r.name for r in report] == ["negate_logits", "rewrite_attention", "fuse_sibling_linears"]
    assert report[0].added == {"neg": 1} and report[0].removed == {}


def test_pass_that_raises_names_the_pass():
    def broken(gm):
        raise KeyError("oops")
    engine = hsd.compile(testing.tiny_model(testing.tiny_config()), passes=[broken], max_seq_len=16)
    with pytest.raises(PassError, match=r"pass 'broken' failed: KeyError: 'oops'"):
        engine(testing.random_ids(testing.tiny_config()))


def test_pass_that_breaks_the_graph_names_the_pass():
    def dangling(gm):  # uses a node from another graph: lint must catch it
        other = torch.fx.Graph()
        x = other.placeholder("x")
        node = lm_head_node(gm)
        node.args = (x, *node.args[1:])
    with pytest.raises(PassError, match="pass 'dangling' left an invalid graph"):
        PassManager([dangling])(hsd.capture.capture(testing.tiny_model(testing.tiny_config()), 1, 4))


def test_pass_returning_garbage_is_refused():
    with pytest.raises(PassError, match="pass 'returns_int' returned int"):
        def returns_int(gm):
            return 3
        PassManager([returns_int])(hsd.capture.capture(testing.tiny_model(testing.tiny_config()), 1, 4))


def test_non_callable_pass_is_refused():
    with pytest.raises(TypeError, match="a pass must be an hsd.Pass or a callable"):
        hsd.compile(testing.tiny_model(testing.tiny_config()), passes=["fuse"])


def test_dump_graphs_writes_before_and_after(tmp_path):
    config = testing.tiny_config()
    engine = hsd.compile(testing.tiny_model(config), max_seq_len=16, prefill_chunk=4, dump_graphs=tmp_path)
    engine(testing.random_ids(config, length=3))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert "t4_00_rewrite_attention.before.py" in names and "t4_01_fuse_sibling_linears.after.py" in names
    assert "hsd.attention" in (tmp_path / "t4_00_rewrite_attention.after.py").read_text()


def test_uuid_is_stable_and_tracks_settings():
    assert FuseSiblingLinears().uuid() == FuseSiblingLinears().uuid()
    a, b = hsd.passes.QuantizeLinear(group_size=128), hsd.passes.QuantizeLinear(group_size=64)
    assert a.uuid() != b.uuid()

    class Custom(Pass):
        """Matches nothing, emits nothing."""
        name = "custom"

        def __call__(self, gm):
            pass
    assert len(Custom().uuid()) == 16
