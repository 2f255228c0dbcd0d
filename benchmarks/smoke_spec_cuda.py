"""Every speculative pipeline on CUDA (inductor + CUDA graphs) against autoregressive decoding.

A tiny random fp32 Llama target, a perturbed copy as draft / intermediate, a random EAGLE head:
prints, per pipeline, whether the greedy tokens equal AR's, tau and tokens/s; JSON to $OUT.
    python benchmarks/smoke_spec_cuda.py
"""
import copy
import datetime
import json
import os
import pathlib
import tempfile

import torch

import hsd
from hsd import testing
from hsd.eagle import save_random_eagle_head
from hsd.eagle2 import Eagle2Config
from hsd.hierarchical import HierarchicalConfig


def main():
    torch.backends.cuda.matmul.allow_tf32 = False
    config = testing.tiny_config("llama", hidden_size=128, intermediate_size=256, head_dim=32)
    target = testing.tiny_model(config, 0).cuda()
    near = copy.deepcopy(target)
    with torch.no_grad():
        for p in near.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    head = tempfile.mkdtemp()
    save_random_eagle_head(head, config, 0)
    ids = testing.random_ids(config, 0, length=12).cuda()
    common = dict(max_seq_len=160, prefill_chunk=16)
    ar = hsd.compile(target, **common)
    expected = ar.generate(ids, max_new_tokens=64)
    runs = {"draft": dict(spec="draft", draft=near),
            "qspec (w4a16, A4 drafts, rotated)": dict(quant="w4a16", spec="qspec"),
            "qspec (w4a16, A8 drafts)": dict(quant="w4a16", spec="qspec", spec_config=hsd.spec.QSpecConfig(act_bits=8)),
            "eagle2": dict(spec="eagle2", draft=head, spec_config=Eagle2Config(depth=3, top_k=4, total_tokens=16)),
            "hierarchical": dict(spec="hierarchical", intermediate=near, draft=head,
                                 spec_config=HierarchicalConfig(Eagle2Config(3, 4, 16), min_draft=4, chain=8))}
    rows = []
    for name, kwargs in runs.items():
        engine = hsd.compile(target, **common, **kwargs)
        # lossless means: equal to the target engine's own AR (with QSpec's A4 drafts the target
        # is the Hadamard-rotated W4A16 model)
        reference = expected if "quant" not in kwargs else engine.target.generate(ids, max_new_tokens=64)
        engine.generate(ids, max_new_tokens=64)  # warm-up: compiles and captures
        out = engine.generate(ids, max_new_tokens=64)
        rows.append(dict(pipeline=name, equal_to_ar=out.tolist() == reference.tolist(), tau=round(engine.stats.tau, 2),
                         tok_s=round(engine.stats.decode_tokens_per_s, 1)))
        print(rows[-1], flush=True)
    out = pathlib.Path(os.environ.get("OUT", "out"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "smoke_spec_cuda.json").write_text(json.dumps(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                                                              date=datetime.date.today().isoformat(), rows=rows), indent=1))


if __name__ == "__main__":
    main()
