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
