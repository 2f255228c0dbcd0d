"""Per-GPU config tables of the GEMM kernels (w4a16, w4a8, scaled_mm): one reader and one
tuner for all.

``tune`` writes ``configs/<kernel>_<gpu>.json`` = {"device": GPU name, "configs": {"N,K": {"M
bucket": config}}}; the kernel loads every such file at import (``load``) and looks its launch
config up in the table of the GPU it runs on, else an H100's (``for_device``).
"""
import functools
import json
import math
import pathlib
import time

import torch
import triton

from hsd.kernels import timing

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


def tune(kernel: str, tables: dict, shapes, m_buckets, candidates, weights, inputs, launch, out=None,
         reps: int = 10, budget_s: float = math.inf, verbose: bool = True, device="cuda", meta=None):
    """Time ``candidates(m, n, k)`` for each (N, K) in ``shapes`` and M bucket on this GPU and merge
    the fastest into the file ``out`` (default ``path(kernel, gpu)``) and the live ``tables``.

    A config is timed as a decode step runs it (``timing.bench_stream_us``): ``launch(x, w, cfg)``
    over ``timing.stream_copies`` distinct copies w of ``weights(n, k)`` (a tuple of tensors),
    x = ``inputs(m, k)``. The file is rewritten after every shape, so an interrupted run keeps
    what it measured; no config is tried after ``budget_s`` seconds."""
    device = torch.device(device)
    name = device_info(device)[0]
    out = pathlib.Path(out or path(kernel, name))
    old = json.loads(out.read_text()) if out.exists() else {}
    table = tables[name] = old.get("configs", {}) if old.get("device") == name else {}
    start = time.perf_counter()
    for n, k in shapes:
        first = weights(n, k)
        nbytes = sum(t.nbytes for t in first if t is not None)
        copies = [first] + [tuple(None if t is None else t.clone() for t in first)
                            for _ in range(timing.stream_copies(nbytes) - 1)]
        entry = table.setdefault(f"{n},{k}", {})
        for m in m_buckets:
            x, best = inputs(m, k), (math.inf, None)
            for cfg in candidates(m, n, k):
                if time.perf_counter() - start > budget_s:
                    break
                try:
                    us = timing.bench_stream_us([functools.partial(launch, x, w, cfg) for w in copies], reps)
                except Exception as e:  # e.g. out of shared memory: not a candidate on this GPU
                    if verbose:
                        print(f"  skip {cfg}: {type(e).__name__}: {str(e)[:200]}")
                    continue
                if us < best[0]:
                    best = (us, cfg)
            if best[1] is not None:
                entry[str(m)] = best[1]
            if verbose:
                print(f"{kernel} N={n} K={k} M<={m}: {best[0]:.1f} us {best[1]}", flush=True)
        del copies
        if device.type == "cuda":
            torch.cuda.empty_cache()
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"device": name, **(meta or {}), "timing": "stream", "configs": table},
                                  indent=1))
    return out
