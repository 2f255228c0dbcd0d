"""Hierarchical speculation (SpecMQuant's HierSpec): EAGLE head -> intermediate model -> target.

Per target step:
  1. sequence draft: the EAGLE head (trained for the intermediate model I) drafts trees that I
     verifies greedily (EAGLE-2 steps on I) until at least ``min_draft`` tokens are drafted;
  2. the target verifies a fixed-length chain (the newest token + up to chain - 1 drafts, padded,
     so its step keeps one shape) and keeps the longest matching prefix plus one token;
  3. I and the head are rolled back to that prefix and take the target's token.
The draft is deterministic (one-hot q), so sampling at the target keeps its distribution.
"""
import dataclasses

import torch

from hsd.eagle import EagleHead, load_eagle_head
from hsd.eagle2 import Eagle2Config, draft_tree, greedy_accept
from hsd.engine import Engine
from hsd.kernels.attention import MAX_NEW_TOKENS
from hsd.sampling import accept_chain, finish, select
from hsd.stats import Clock, Stats


@dataclasses.dataclass
class HierarchicalConfig:
    """tree: the head's trees for I; min_draft: sequence-draft tokens before the target checks;
    chain: tokens per target step (the newest + chain - 1 drafts); SpecMQuant: (3, 10, 30), 6, 10."""
    tree: Eagle2Config = dataclasses.field(default_factory=lambda: Eagle2Config(depth=3, top_k=10, total_tokens=30))
    min_draft: int = 6
    chain: int = 10

    def validate(self):
        self.tree.validate()
        if not 1 <= self.min_draft < self.chain <= MAX_NEW_TOKENS:
            raise ValueError(f"need 1 <= min_draft < chain <= {MAX_NEW_TOKENS}, got min_draft={self.min_draft}, "
                             f"chain={self.chain}")


class HierarchicalPipeline:
    def __init__(self, target: Engine, intermediate: Engine, head: EagleHead, config: HierarchicalConfig):
        config.validate()
        target.check_drafter(intermediate, "intermediate")
        head.attach(intermediate.model, config.tree.quantize_lm_head)
        head.allocate_cache(intermediate.cache.max_seq_len)
        self.target, self.mid, self.head, self.config = target, intermediate, head, config
        self.stats = Stats()

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens=32, temperature=0.0, eos_token_id=None, pad_token_id=None):
        cfg, target, mid, head = self.config, self.target, self.mid, self.head
        input_ids, eos, _ = target.prepare(input_ids, max_new_tokens, eos_token_id, pad_token_id,
                                           room=cfg.chain, steps=(cfg.chain,))
        mid.prepare(input_ids, max_new_tokens, room=cfg.chain + cfg.tree.total_tokens,
                    steps=(cfg.tree.total_tokens, 1))
        eos = set(eos.tolist())
        stats = Stats(prompt_tokens=input_ids.shape[1], target_steps=1)
        clock = Clock(target.device)
        start = clock()
        root = select(target.prefill(input_ids)[0][0], temperature)
        _, features = mid.prefill(input_ids)
        head.cache.reset()
        root_hidden = head.extend(torch.cat([input_ids[:, 1:], root.view(1, 1)], 1), features)[0]
        clock.add("prefill_s", start, clock())
        last = int(root)   # the newest token, known on the host
        out, done = [last], last in eos
        begin = clock()
        while len(out) < max_new_tokens and not done:
            tick = clock()
            mid_len, head_len = mid.cache.length.clone(), head.cache.length.clone()  # rollback points
            seq, feats = self._sequence_draft(root, root_hidden)
            tock = clock.add("draft_s", tick, clock())
            drafts = seq[:cfg.chain - 1]
            chain = torch.tensor([[last, *drafts, *[drafts[-1]] * (cfg.chain - 1 - len(drafts))]],
                                 device=target.device)
            logits, _ = target.verify_chain(chain)
            draft_t = chain[:, 1:len(drafts) + 1]
            # the draft is deterministic: q is one-hot (only sampling reads it)
            one_hot = torch.nn.functional.one_hot(draft_t, target.config.vocab_size).double() if temperature > 0 else None
            n, nxt = accept_chain(logits[:, :len(drafts) + 1], draft_t, one_hot, temperature)
            n, last = torch.cat([n, nxt]).tolist()   # the step's one host read
            nxt = nxt[0]
            target.accept(torch.arange(n + 1, device=target.device)[None])
            tick = clock.add("verify_s", tock, clock())
            if n == len(seq):  # every draft kept: I has not yet run the last one
                _, hidden = mid.verify_chain(torch.tensor([[seq[-1]]], device=mid.device))
                feats = torch.cat([feats, hidden[0]])
            mid.cache.length.copy_(mid_len + n + 1)     # the newest token and the kept drafts
            head.cache.length.copy_(head_len + n)
            root, root_hidden = nxt, head.extend(nxt.view(1, 1), feats[n].view(1, 1, -1))[0]
            clock.add("draft_s", tick, clock())
            new = [*drafts[:n], last]
            out += new
            done = not eos.isdisjoint(new)
            stats.target_steps += 1
        clock.add("decode_s", begin, clock())
        clock.settle(stats)
        self.stats = stats
        return finish(input_ids, [out], max_new_tokens, eos, stats)

    def _sequence_draft(self, root, root_hidden):
        """EAGLE-2 steps on I until min_draft tokens: returns (tokens after root, I's hidden
        states [len, H] at root and at each token but the last)."""
        mid, head = self.mid, self.head
        seq, feats = [], []
        while len(seq) < self.config.min_draft:
            tokens, parents = draft_tree(head, root, root_hidden, self.config.tree)
            logits, hidden = mid.verify(tokens[None], parents, check=False)
            path, new = greedy_accept(parents, tokens, logits[0].argmax(-1))
            mid.accept(torch.tensor([path], device=mid.device))
            new_t = torch.tensor(new, device=mid.device)
            root, root_hidden = new_t[-1], head.extend(new_t[None], hidden[:, path])[0]
            feats.append(hidden[0, path])
            seq += new
        return seq, torch.cat(feats)


def hierarchical_pipeline(target, draft, config, compile_model, intermediate=None):
    """spec="hierarchical": ``intermediate`` a smaller LM (or its path, compiled with
    ``intermediate_quant``), ``draft`` an EAGLE head trained for it (or its directory)."""
    if intermediate is None or draft is None:
        raise ValueError('spec="hierarchical" needs intermediate= (a smaller LM of the same tokenizer) and '
                         'draft= (an EAGLE head for it)')
    mid = intermediate if isinstance(intermediate, Engine) else compile_model(intermediate, "intermediate")
    target.check_drafter(mid, "intermediate")  # before the head is checked against it
    head = draft if isinstance(draft, EagleHead) else load_eagle_head(draft, mid.model)
    return HierarchicalPipeline(target, mid, head, config or HierarchicalConfig())
