"""The command line on a local checkpoint (with a tiny tokenizer written by the test)."""
import json

import pytest
import torch

from hsd import cli, testing


@pytest.fixture
def checkpoint(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {f"w{i}": i for i in range(96)}
    vocab["[UNK]"] = 95
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(tmp_path)
    testing.tiny_model(testing.tiny_config("llama")).save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.parametrize("extra", [[], ["--spec", "draft", "--draft", "SELF"]])
def test_generate_prints_text_passes_and_stats(checkpoint, capsys, extra):
    extra = [str(checkpoint) if a == "SELF" else a for a in extra]
    assert cli.main(["generate", "--model", str(checkpoint), "--prompt", "w1 w2 w3", "--dtype", "float32",
                     "--max-new-tokens", "6", "--max-seq-len", "64", *extra]) == 0
    out = capsys.readouterr().out
    assert "rewrite_attention" in out and "tok/s" in out and "tau" in out
    assert out.splitlines()[0].split()[0].startswith("w")   # decoded words


def test_linear_shapes_match_the_model():
    """`hsd tune --model` tunes the (N, K) of the GEMMs hsd runs: q/k/v and gate/up fused (their
    widths add up), o_proj, down_proj and the lm_head, read here off the model's own Linears."""
    for arch in ("llama", "qwen2", "mistral"):
        config = testing.tiny_config(arch)
        model = testing.tiny_model(config)
        attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp

        def fused(*linears):
            assert len({m.in_features for m in linears}) == 1
            return sum(m.out_features for m in linears), linears[0].in_features
        want = [fused(attn.q_proj, attn.k_proj, attn.v_proj), fused(attn.o_proj),
                fused(mlp.gate_proj, mlp.up_proj), fused(mlp.down_proj), fused(model.lm_head)]
        assert cli.linear_shapes(config) == want, arch


def test_tune_runs_every_kernel_on_the_model_shapes(checkpoint, monkeypatch, tmp_path):
    from hsd.kernels import scaled_mm, w4a8, w4a16
    calls = []
    for module in (w4a16, w4a8, scaled_mm):
        monkeypatch.setattr(module, "tune", lambda shapes, name=module.__name__, **kw: calls.append((name, shapes, kw)))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    assert cli.main(["tune", "--model", str(checkpoint), "--shapes", "48,128", "--m-buckets", "1", "16",
                     "--budget-s", "30", "--out", str(tmp_path)]) == 0
    config = testing.tiny_config("llama")
    assert [c[0].rsplit(".", 1)[1] for c in calls] == ["w4a16", "w4a8", "scaled_mm"]
    for name, shapes, kw in calls:
        assert shapes == [(48, 128)] + cli.linear_shapes(config)
        assert kw["m_buckets"] == (1, 16) and kw["budget_s"] == 30
        assert kw["path"] == tmp_path / f"{name.rsplit('.', 1)[1]}_h100.json"


def test_tune_bad_input(monkeypatch, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["tune", "--shapes", "64x128"])
    assert exc.value.code == 2 and "a GEMM shape is N,K" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        cli.main(["tune", "--shapes", "64,128"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(SystemExit, match="give --model PATH"):
        cli.main(["tune"])
