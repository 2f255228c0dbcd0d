"""The config tables the GEMM kernels share."""
import json

from hsd.kernels import tuning


def test_slug():
    assert tuning.slug("NVIDIA H100 80GB HBM3") == "h100"
    assert tuning.slug("NVIDIA A100-SXM4-80GB") == "a100"


def test_load_and_for_device(tmp_path):
    (tmp_path / "k_h100.json").write_text(json.dumps({"device": "NVIDIA H100 80GB HBM3", "configs": {"1,2": {}}}))
    (tmp_path / "other_a100.json").write_text(json.dumps({"device": "NVIDIA A100", "configs": {}}))
    tables = tuning.load("k", tmp_path)
    assert list(tables) == ["NVIDIA H100 80GB HBM3"]
    assert tuning.for_device(tables, "some other GPU") == {"1,2": {}}   # an H100's table stands in
    assert tuning.bucket(5) == 8 and tuning.bucket(1000) == 128


def test_tune_picks_the_fastest_merges_and_keeps_to_its_budget(tmp_path, monkeypatch):
    """tuning.tune with a fake clock: each config is timed over distinct weight copies, the
    fastest per (shape, bucket) is written, an existing file's other shapes are kept, and no
    config is tried once the budget is spent."""
    import torch
    from hsd.kernels import timing
    seen = []

    def fake_bench(calls, reps):
        assert len({id(c.args[1][0]) for c in calls}) == len(calls) == 3  # distinct copies
        seen.append(calls[0].args[2])
        return float(calls[0].args[2]["cost"])
    monkeypatch.setattr(timing, "bench_stream_us", fake_bench)
    monkeypatch.setattr(timing, "stream_copies", lambda nbytes: 3)
    out = tmp_path / "k_cpu.json"
    out.write_text(json.dumps({"device": "cpu", "configs": {"9,9": {"1": {"cost": 0}}}}))
    tables = {}
    kwargs = dict(candidates=lambda m, n, k: [{"cost": 3}, {"cost": m}, {"cost": 5}],
                  weights=lambda n, k: (torch.ones(n, k), None), inputs=lambda m, k: torch.ones(m, k),
                  launch=lambda x, w, cfg: None, out=out, verbose=False, device="cpu")
    tuning.tune("k", tables, [(4, 8)], (1, 4), **kwargs)
    table = json.loads(out.read_text())["configs"]
    assert table == {"9,9": {"1": {"cost": 0}}, "4,8": {"1": {"cost": 1}, "4": {"cost": 3}}}
    assert tables["cpu"] == table and len(seen) == 6
    tuning.tune("k", tables, [(2, 8)], (1,), budget_s=0, **kwargs)
    assert json.loads(out.read_text())["configs"]["2,8"] == {} and len(seen) == 6
