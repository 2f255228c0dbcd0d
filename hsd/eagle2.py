"""EAGLE-2 speculative decoding: an EAGLE head drafts a dynamic tree, the target verifies it.

Each step (Li et al., 2024, "EAGLE-2"):
  1. draft (``draft_tree``): the root's top_k children, then depth - 1 rounds in which the head
     runs the global top_k frontier in one call under the tree mask and each frontier node
     proposes top_k children scored by the cumulative log-probability of their path; the
     total_tokens - 1 best of all candidates form the tree.
  2. verify: one target step over the tree (``Engine.verify``).
  3. accept (``greedy_accept``) the longest path the target agrees with, plus one token;
     ``Engine.accept`` keeps the path's K/V.
  4. the head drops its draft entries (its cache length never moved past them) and takes the
     accepted tokens with the target's features of the path, as if it had drafted sequentially.
Drafting and acceptance stay on the device; the accepted path is the step's one host read.
"""
import dataclasses

import torch

from hsd.eagle import EagleHead, load_eagle_head
from hsd.engine import Engine
from hsd.kernels.attention import MAX_NEW_TOKENS, ancestor_mask
from hsd.sampling import finish, select
from hsd.stats import Clock, Stats


@dataclasses.dataclass
class Eagle2Config:
    """depth: drafted tokens on the longest path (EAGLE-2's code runs depth - 1 expansion
    rounds for our depth); top_k: children per node and frontier width; total_tokens: tree
    nodes the target verifies per step, the root included; quantize_lm_head: the head's logits
    through a 4-bit copy of the lm_head (fewer bytes per draft round; drafts only, lossless)."""
    depth: int = 6
    top_k: int = 10
    total_tokens: int = 60
    quantize_lm_head: bool = True

    def __post_init__(self):
        self.validate()

    def validate(self):
        d, k, n = self.depth, self.top_k, self.total_tokens
        if d < 1 or k < 1 or n < 2:
            raise ValueError(f"EAGLE-2 needs depth >= 1, top_k >= 1 and total_tokens >= 2, got {self}")
        if n > MAX_NEW_TOKENS:
            raise ValueError(f"total_tokens={n} exceeds the attention op's limit of {MAX_NEW_TOKENS} tokens per step")
        if n - 1 > k + (d - 1) * k * k:
            raise ValueError(f"depth={d}, top_k={k} draft only {k + (d - 1) * k * k} candidates, "
                             f"fewer than total_tokens - 1 = {n - 1}")
        if (d - 1) * k > MAX_NEW_TOKENS:
            raise ValueError(f"(depth - 1) * top_k = {(d - 1) * k} draft entries exceed the attention op's "
                             f"limit of {MAX_NEW_TOKENS} tokens per head step")


def draft_tree(head: EagleHead, root, root_hidden, config: Eagle2Config):
    """Draft a tree after ``root`` (0-d token) from the head's output ``root_hidden`` [H] for
    it. Returns (tokens [n], parents [n]) with node 0 the root and parents before children;
    the head's cache length is unchanged (its draft entries lie past it)."""
    k, device = config.top_k, root.device
    scores, tokens = _log_probs(head, root_hidden).topk(k)           # the root's children
    feed = root_hidden.expand(k, -1)           # a node's feature input: its parent's head output
    mask = torch.eye(k, dtype=torch.bool, device=device)              # among the head's draft entries
    frontier = torch.arange(k, device=device)                         # candidate ids of the frontier
    cand_scores, cand_tokens, cand_parents = [scores], [tokens], [torch.full_like(tokens, -1)]
    first = k                                                         # candidate id of the next level's first
    for depth in range(1, config.depth):
        positions = head.cache.length.long()[:, None] + depth - 1
        hidden = head.step(tokens[None], feed[None], positions.expand(1, k), mask)[0]  # [k, H]
        child_scores, child_tokens = _log_probs(head, hidden).topk(k)                # [k, k]
        child_scores = (child_scores + scores[:, None]).flatten()
        cand_scores.append(child_scores)
        cand_tokens.append(child_tokens.flatten())
        cand_parents.append(frontier.repeat_interleave(k))
        if depth + 1 < config.depth:
            pick = child_scores.topk(k).indices
            scores, tokens, feed = child_scores[pick], child_tokens.flatten()[pick], hidden[pick // k]
            rows = torch.cat([mask[-k:][pick // k], torch.eye(k, dtype=torch.bool, device=device)], 1)
            mask = torch.cat([torch.cat([mask, mask.new_zeros(mask.shape[0], k)], 1), rows])
            frontier = first + pick
            first += k * k
    return _rerank(torch.cat(cand_scores), torch.cat(cand_tokens), torch.cat(cand_parents), root,
                   config.total_tokens)


def _log_probs(head, hidden):
    return torch.log_softmax(head.logits(hidden).float(), -1)


def _rerank(scores, tokens, parents, root, n):
    """Keep the n - 1 best candidates. A child scores at most its parent (log p <= 0) and has
    a larger candidate id, so a stable descending sort ranks every parent before its children:
    the kept set is a tree. Sorting it by id puts parents first."""
    keep = torch.sort(scores, descending=True, stable=True).indices[:n - 1].sort().values
    parent = parents[keep]
    node_parent = torch.where(parent >= 0, torch.searchsorted(keep, parent) + 1, 0)
    return torch.cat([root[None], tokens[keep]]), torch.cat([node_parent.new_full((1,), -1), node_parent])


def greedy_accept(parents, tokens, choice):
    """The longest root path of a verified tree whose tokens the target chose, plus its next token.

    parents [n], tokens [n] (node 0 the root), choice [n]: the target's token after each node
    (argmax, or one sample per node). Node i is correct if tokens[i] == choice[parents[i]];
    the deepest node with all ancestors correct ends the path. Returns host lists (path node
    indices root first, the tokens it yields: choice at each path node, the last the bonus).

    With sampled choices this is EAGLE-2's q = 1 rule: at a node, trying children x in order
    with acceptance p(x) (q = 1), zeroing p(x) and renormalising on rejection, and sampling the
    bonus from what is left, accepts child x with probability p(x) and stops with bonus y
    (not a child) with probability p(y); sampling y ~ p once and following the child whose
    token is y has the same law, as siblings hold distinct tokens (top_k of one distribution).
    """
    mask = ancestor_mask(parents, check=False)
    correct = (tokens == choice[parents.clamp(min=0)]) | (parents < 0)
    ok = ~(mask & ~correct).any(-1)
    best = torch.where(ok, mask.sum(-1), 0).argmax()
    on_path, chosen = torch.stack([mask[best].long(), choice]).tolist()  # the one host read
    path = [i for i, on in enumerate(on_path) if on]
    return path, [chosen[i] for i in path]


class Eagle2Pipeline:
    """EAGLE-2 on a compiled target ``Engine`` with an ``EagleHead`` (batch 1)."""

    def __init__(self, target: Engine, head: EagleHead, config: Eagle2Config):
        config.validate()
        if target.batch_size != 1:
            raise ValueError("EAGLE-2 runs at batch size 1")
        head.attach(target.model, config.quantize_lm_head)
        if config.top_k > target.config.vocab_size:
            raise ValueError(f"top_k={config.top_k} exceeds the vocabulary ({target.config.vocab_size})")
        head.allocate_cache(target.cache.max_seq_len)
        self.target, self.head, self.config = target, head, config
        self.stats = Stats()

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens=32, temperature=0.0, eos_token_id=None, pad_token_id=None):
        """Returns [1, P + n], n <= max_new_tokens, stopping after the first EOS."""
        target, head, n = self.target, self.head, self.config.total_tokens
        input_ids, eos, _ = target.prepare(input_ids, max_new_tokens, eos_token_id, pad_token_id, room=n, steps=(n,))
        eos = set(eos.tolist())
        stats = Stats(prompt_tokens=input_ids.shape[1], target_steps=1)
        clock = Clock(target.device)
        start = clock()
        logits, features = target.prefill(input_ids)
        root = select(logits[0], temperature)
        head.cache.reset()
        root_hidden = head.extend(torch.cat([input_ids[:, 1:], root.view(1, 1)], 1), features)[0]
        out = [int(root)]
        done = out[0] in eos
        begin = clock.add("prefill_s", start, clock())
        while len(out) < max_new_tokens and not done:
            tick = clock()
            tokens, parents = draft_tree(head, root, root_hidden, self.config)
            tock = clock.add("draft_s", tick, clock())
            logits, hidden = target.verify(tokens[None], parents, check=False)
            path, new = greedy_accept(parents, tokens, select(logits[0], temperature))
            target.accept(torch.tensor([path], device=target.device))
            tick = clock.add("verify_s", tock, clock())
            new_t = torch.tensor(new, device=target.device)
            root, root_hidden = new_t[-1], head.extend(new_t[None], hidden[:, path])[0]
            clock.add("draft_s", tick, clock())
            out += new
            done = not eos.isdisjoint(new)
            stats.target_steps += 1
        clock.add("decode_s", begin, clock())
        clock.settle(stats)
        self.stats = stats
        return finish(input_ids, [out], max_new_tokens, eos, stats)


def eagle2_pipeline(target: Engine, draft, config, compile_model=None, intermediate=None) -> Eagle2Pipeline:
    """spec="eagle2": ``draft`` is an EagleHead or an EAGLE-1 checkpoint directory."""
    if draft is None:
        raise ValueError('spec="eagle2" needs draft= (an EAGLE-1 head checkpoint directory or an hsd.eagle.EagleHead)')
    head = draft if isinstance(draft, EagleHead) else load_eagle_head(draft, target.model)
    return Eagle2Pipeline(target, head, config or Eagle2Config())
