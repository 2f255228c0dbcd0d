"""Per-GPU config tables of the GEMM kernels (w4a16, w4a8, scaled_mm): one reader for all.

A kernel's ``tune`` writes ``configs/<kernel>_<gpu>.json`` = {"device": GPU name, "configs":
{"N,K": {"M bucket": config}}}; the kernel loads every such file at import (``load``) and looks
its launch config up in the table of the GPU it runs on, else an H100's (``for_device``).
"""
import functools
import json
import pathlib

import torch
import triton

CONFIG_DIR = pathlib.Path(__file__).with_name("configs")
M_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


@functools.lru_cache(maxsize=None)
def device_info(device: torch.device):
    """(GPU name, SM count); off CUDA (the interpreter) an H100's SM count, so CPU tests cover
    the configs the GPU gets."""
    if device.type != "cuda":
        return "cpu", 132
    p = torch.cuda.get_device_properties(device)
    return p.name, p.multi_processor_count


def slug(device_name: str) -> str:
    """"NVIDIA H100 80GB HBM3" -> "h100": the first word with a digit in it."""
    words = device_name.lower().replace("-", " ").split()
    return next((w for w in words if any(c.isdigit() for c in w)), "_".join(words))


def bucket(m: int) -> int:
    """The M bucket holding m tokens (the last bucket for more)."""
    return next((b for b in M_BUCKETS if m <= b), M_BUCKETS[-1])


def path(kernel: str, device_name: str) -> pathlib.Path:
    return CONFIG_DIR / f"{kernel}_{slug(device_name)}.json"


def load(kernel: str, directory: pathlib.Path = CONFIG_DIR) -> dict:
    """{device name: {"N,K": {"M bucket": config}}} from every ``<kernel>_*.json`` in ``directory``."""
    tables = {}
    for file in sorted(directory.glob(f"{kernel}_*.json")):
        data = json.loads(file.read_text())
        tables[data["device"]] = data["configs"]
    return tables


def for_device(tables: dict, device_name: str) -> dict:
    return tables.get(device_name) or next((t for d, t in tables.items() if "H100" in d), {})


def split_k_launch(m: int, n: int, k: int, block_m: int, block_n: int, block_k: int, split_k: int,
                   device, dtype):
    """(grid, K tiles per split, output [m, n]) of a split-K GEMM launch: splits that would get
    no tile are dropped, and with several splits the output starts at zero (they add into it)."""
    k_tiles = triton.cdiv(k, block_k)
    tiles_per_split = triton.cdiv(k_tiles, split_k)
    split = triton.cdiv(k_tiles, tiles_per_split)
    y = (torch.zeros if split > 1 else torch.empty)((m, n), device=device, dtype=dtype)
    return (triton.cdiv(m, block_m), triton.cdiv(n, block_n), split), tiles_per_split, y
