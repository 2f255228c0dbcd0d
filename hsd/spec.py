"""Speculative pipelines composed from compiled engines.

``Speculative`` wraps a target engine and a pipeline; it has the engine's interface
(``__call__`` gives the target's logits, ``generate``, ``stats``). Pipelines only call the
engines' step functions (``prefill``, ``verify``, ``accept``, ``step``), so every speculative
step has a fixed shape that compiles once and replays as a CUDA graph.
"""
import dataclasses

import torch

from hsd.eagle2 import eagle2_pipeline
from hsd.engine import Engine
from hsd.hierarchical import hierarchical_pipeline
from hsd.passes import FuseRMSNormQuant, LowBitActivations
from hsd.passes.w4a8 import KIND_OF_BITS
from hsd.sampling import accept_chain, finish, probs, select
from hsd.stats import Clock, Stats


@dataclasses.dataclass
class DraftConfig:
    """Vanilla speculation: a smaller LM drafts ``k`` tokens, the target verifies k + 1."""
    k: int = 6

    def validate(self):
        if not 1 <= self.k <= 127:
            raise ValueError(f"draft k must be in 1..127 (the target verifies k + 1 <= 128 tokens), got {self.k}")


@dataclasses.dataclass
class QSpecConfig:
    """QSpec: the target itself drafts ``k`` tokens with ``act_bits``-bit activations (same 4-bit
    weights, same KV cache; W4A8 / W4A4 GEMMs on the int8 MMA), then verifies k + 1 with 16-bit
    activations (W4A16)."""
    k: int = 3
    act_bits: int = 4

    def validate(self):
        DraftConfig(self.k).validate()
        if self.act_bits not in (4, 8):
            raise ValueError(f"QSpec act_bits must be 4 or 8, got {self.act_bits}")


class DraftPipeline:
    """Draft model proposes a chain greedily (or by sampling), the target verifies it in one step.

    Both engines hold the accepted text in their caches, except the newest token. The draft's
    cache may also lack the last draft token when all k were accepted: ``pending`` holds the
    1 or 2 tokens it must consume before drafting again (two fixed step shapes).
    When the draft shares the target's cache (QSpec), the draft's K/V land in the slots the
    verification then overwrites, and nothing is ever pending but the newest token; then rows
    of a batch advance independently (each row's cache length is its own): a row that is done
    keeps drafting in place, its length frozen, until every row is done.
    """

    def __init__(self, target: Engine, draft: Engine, config: DraftConfig):
        config.validate()
        self.shared = draft.cache is target.cache
        if not self.shared:
            target.check_drafter(draft, "draft")
        self.target, self.draft, self.config = target, draft, config

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens=32, temperature=0.0, eos_token_id=None, pad_token_id=None):
        """Returns [B, P + n], n <= max_new_tokens; a row stops after its first EOS and is
        padded with ``pad_token_id`` (default: the EOS id) up to the longest row."""
        k = self.config.k
        target, draft = self.target, self.draft
        input_ids, eos, pad = target.prepare(input_ids, max_new_tokens, eos_token_id, pad_token_id,
                                             room=k + 1, steps=(k + 1,))
        draft.prepare(input_ids, max_new_tokens, room=k + 1, steps=(1,) if self.shared else (1, 2))
        eos = set(eos.tolist())
        stats = Stats(prompt_tokens=input_ids.shape[1], target_steps=1)
        clock = Clock(target.device)
        start = clock()
        first = select(target.prefill(input_ids)[0], temperature)          # [B]
        if not self.shared:
            draft.prefill(input_ids)
        clock.add("prefill_s", start, clock())
        rows = [[t] for t in first.tolist()]
        active = [t not in eos and max_new_tokens > 1 for t in first.tolist()]
        pending = [first[:, None]]
        begin = clock()
        while any(active):
            tick = clock()
            tokens, q = self._draft(pending, k, temperature)                  # [B, k], [B, k, V]
            if self.shared:  # verification rewrites the k slots the draft just filled
                target.cache.length -= k
            tock = clock.add("draft_s", tick, clock())
            logits, _ = target.verify_chain(torch.cat([pending[-1], tokens], 1))
            n, nxt = accept_chain(logits, tokens, q, temperature)
            # a chain's accepted prefix already sits in place: no K/V moves, only lengths
            live = torch.tensor(active, device=target.device)
            target.cache.length += torch.where(live, n + 1, 0).to(torch.int32)
            steps = torch.cat([n[:, None], tokens, nxt[:, None]], 1).tolist()   # the step's one host read
            for b, (n_b, *toks) in enumerate(steps):
                if active[b]:
                    rows[b] += toks[:n_b] + [toks[-1]]
                    active[b] = eos.isdisjoint(toks[:n_b] + [toks[-1]]) and len(rows[b]) < max_new_tokens
            if self.shared:
                pending = [nxt[:, None]]
            else:  # batch 1: the draft's cache holds pending + tokens[:k-1]: drop the rejected ones
                n_0 = steps[0][0]
                draft.cache.length -= (k - 1) - min(n_0, k - 1)
                pending = [tokens[:, k - 1:], nxt[:, None]] if n_0 == k else [nxt[:, None]]
            clock.add("verify_s", tock, clock())
            stats.target_steps += 1
        clock.add("decode_s", begin, clock())
        clock.settle(stats)
        self.stats = stats
        return finish(input_ids, rows, max_new_tokens, eos, stats, pad)

    def _draft(self, pending, k, temperature):
        """Feed the pending tokens, then draft k tokens per row; returns (tokens [B, k], their
        distributions [B, k, V], or None when greedy)."""
        draft = self.draft
        ids = torch.cat(pending, 1)
        tokens, dists = [], []
        for _ in range(k):
            logits, _ = draft.verify_chain(ids)
            draft.cache.length += ids.shape[1]
            last = logits[:, -1]
            token = select(last, temperature)                              # [B]
            tokens.append(token)
            if temperature > 0:
                dists.append(probs(last, temperature))
            ids = token[:, None]
        return torch.stack(tokens, 1), torch.stack(dists, 1) if dists else None


class Speculative:
    """A target engine driven by a speculative pipeline; the Engine's user interface."""

    def __init__(self, target: Engine, pipeline):
        self.target, self.pipeline = target, pipeline
        self.stats = Stats()

    def __call__(self, input_ids):
        return self.target(input_ids)

    def generate(self, input_ids, max_new_tokens=32, temperature=0.0, eos_token_id=None, pad_token_id=None):
        out = self.pipeline.generate(input_ids, max_new_tokens, temperature, eos_token_id, pad_token_id)
        self.stats = self.pipeline.stats
        return out


def _draft_pipeline(target, draft, config, compile_model, intermediate=None):
    if draft is None:
        raise ValueError('spec="draft" needs draft= (a smaller causal LM of the same tokenizer, or its path)')
    return DraftPipeline(target, draft if isinstance(draft, Engine) else compile_model(draft, "draft"),
                         config or DraftConfig())


def _qspec_pipeline(target, draft, config, compile_model, intermediate=None):
    if draft is not None:
        raise ValueError('spec="qspec" drafts with the target itself: do not pass draft=')
    config = config or QSpecConfig()
    config.validate()
    drafter = target.with_passes(LowBitActivations(KIND_OF_BITS[config.act_bits]), FuseRMSNormQuant())
    return DraftPipeline(target, drafter, DraftConfig(config.k))


PIPELINES = {"draft": _draft_pipeline, "qspec": _qspec_pipeline, "eagle2": eagle2_pipeline,
             "hierarchical": hierarchical_pipeline}


def build(spec: str, target: Engine, draft, config, compile_model, intermediate=None) -> Speculative:
    """``compile_model(model_or_path, role)`` compiles a "draft" or "intermediate" model with the
    target's settings and that role's quantization."""
    if spec not in PIPELINES:
        raise ValueError(f"unknown spec {spec!r}; known: {', '.join(PIPELINES)} (or None for autoregressive)")
    if intermediate is not None and spec != "hierarchical":
        raise ValueError(f'intermediate= is for spec="hierarchical", not {spec!r}')
    return Speculative(target, PIPELINES[spec](target, draft, config, compile_model, intermediate=intermediate))
