"""Token selection and speculative acceptance, shared by every pipeline.

Greedy (temperature 0) takes the argmax; sampling draws from softmax(logits / temperature).
``accept_chain`` is the speculative-sampling rule for a drafted chain: draft token x_i drawn from
q_i is kept with probability min(1, p_i(x_i) / q_i(x_i)); at the first rejection the next token
is drawn from norm(max(p_i - q_i, 0)); if all are kept a bonus token is drawn from p_k. The
output is distributed exactly as the target's own sampling (Leviathan et al., Chen et al.).
"""
import torch


def probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.softmax(logits.double() / temperature, dim=-1)


def select(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """[..., V] -> [...] token ids: argmax, or a sample at ``temperature``."""
    if temperature <= 0:
        return logits.argmax(-1)
    p = probs(logits, temperature)
    return torch.multinomial(p.reshape(-1, p.shape[-1]), 1).reshape(p.shape[:-1])


def accept_chain(target_logits, draft_tokens, draft_probs, temperature: float):
    """Verify drafted chains, one per row.

    target_logits [B, k + 1, V]: the target's logits at the last accepted token and at each
    draft token; draft_tokens [B, k]; draft_probs [B, k, V] the distributions they were drawn
    from (None when greedy). Returns (n [B] accepted draft tokens, the next token [B] after them).
    """
    k = draft_tokens.shape[1]
    if temperature <= 0:
        target = target_logits.argmax(-1)
        n = (draft_tokens == target[:, :k]).long().cumprod(1).sum(1)
        return n, target.gather(1, n[:, None])[:, 0]
    rows = [_sample_chain(*row, temperature) for row in zip(target_logits, draft_tokens, draft_probs)]
    return torch.stack([n for n, _ in rows]), torch.stack([t for _, t in rows])


def _sample_chain(target_logits, draft_tokens, draft_probs, temperature):
    k = draft_tokens.shape[0]
    p = probs(target_logits, temperature)
    idx = torch.arange(k, device=draft_tokens.device)
    p_x = p[idx, draft_tokens]
    q_x = draft_probs[idx, draft_tokens].double()
    keep = torch.rand(k, device=p.device, dtype=torch.float64) * q_x < p_x   # u < p/q, without dividing by 0
    n = keep.long().cumprod(0).sum()
    if int(n) == k:
        return n, torch.multinomial(p[k], 1)[0]
    residual = (p[n] - draft_probs[n].double()).clamp(min=0)
    return n, torch.multinomial(residual / residual.sum(), 1)[0]


def finish(input_ids, rows: list, max_new_tokens: int, eos, stats, pad: int = 0) -> torch.Tensor:
    """The [B, P + n] output of a speculative run from each row's new tokens. A last step may
    overshoot: each row is cut at max_new_tokens and just after its first EOS, shorter rows are
    padded with ``pad``; ``stats.new_tokens`` counts the longest row."""
    kept = []
    for tokens in rows:
        tokens = tokens[:max_new_tokens]
        stop = next((i for i, t in enumerate(tokens) if t in eos), len(tokens) - 1)
        kept.append(tokens[:stop + 1])
    stats.new_tokens = max(len(t) for t in kept)
    new = torch.tensor([t + [pad] * (stats.new_tokens - len(t)) for t in kept], device=input_ids.device)
    return torch.cat([input_ids, new], 1)
