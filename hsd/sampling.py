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
    """Verify one drafted chain for one sequence.

    target_logits [k + 1, V]: the target's logits at the last accepted token and at each draft
    token; draft_tokens [k]; draft_probs [k, V] the distributions they were drawn from (unused
    when greedy). Returns (n accepted draft tokens, the next token after them), both tensors.
    """
    k = draft_tokens.shape[0]
    if temperature <= 0:
        target = target_logits.argmax(-1)
        ok = (draft_tokens == target[:k]).long().cumprod(0)
        n = ok.sum()
        return n, target[n]
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


def finish(input_ids, tokens: list, max_new_tokens: int, eos, stats) -> torch.Tensor:
    """The [1, P + n] output of a speculative run. Its last step may overshoot: cut at
    max_new_tokens and just after the first EOS, and count what is kept in ``stats``."""
    tokens = tokens[:max_new_tokens]
    stop = next((i for i, t in enumerate(tokens) if t in eos), len(tokens) - 1)
    stats.new_tokens = stop + 1
    return torch.cat([input_ids, torch.tensor([tokens[:stop + 1]], device=input_ids.device)], 1)
