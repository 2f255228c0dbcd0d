"""Generation statistics, the same for every pipeline.

A *target step* is one forward of the target model that yields tokens: the prefill (1 token)
and each decode or verification step (1 token for AR, accepted drafts + 1 for speculation), so
tau = new_tokens / target_steps is 1.0 for AR and the mean tokens per target step otherwise.
"""
import dataclasses
import time

import torch


@dataclasses.dataclass
class Stats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    target_steps: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0     # everything after the prefill: drafting and verification
    draft_s: float = 0.0
    verify_s: float = 0.0

    @property
    def tau(self) -> float:
        return self.new_tokens / self.target_steps if self.target_steps else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after the first (which the prefill yields) per second of decoding."""
        return (self.new_tokens - 1) / self.decode_s if self.decode_s > 0 and self.new_tokens > 1 else 0.0

    def __str__(self):
        text = (f"prompt {self.prompt_tokens} tok in {self.prefill_s * 1e3:.1f} ms, {self.new_tokens} new tok, "
                f"decode {self.decode_tokens_per_s:.1f} tok/s, tau {self.tau:.2f} ({self.target_steps} target steps)")
        if self.draft_s:
            text += f", draft {self.draft_s * 1e3:.0f} ms / verify {self.verify_s * 1e3:.0f} ms"
        return text


class Clock:
    """Stage timing that adds no host syncs: on a GPU each mark is a CUDA event in the stream,
    and ``settle`` waits once, at the end of a generation, to read them all."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.spans = []   # (Stats field, start mark, end mark)

    def __call__(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def add(self, field: str, start, end):
        self.spans.append((field, start, end))
        return end

    def settle(self, stats: Stats) -> Stats:
        """Add every span's seconds to its field of ``stats``."""
        if self.cuda and self.spans:
            self.spans[-1][2].synchronize()
        for field, start, end in self.spans:
            seconds = start.elapsed_time(end) / 1e3 if self.cuda else end - start
            setattr(stats, field, getattr(stats, field) + seconds)
        self.spans.clear()
        return stats
