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
