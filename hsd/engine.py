"""The engine: compiled step graphs over one static KV cache, and greedy generation.

A *step* runs T new tokens per row against the cache: prefill chunks (T = prefill_chunk,
causal), decode (T = 1), and later chain and tree verification. Each T gets its own captured,
rewritten and lowered graph, built on first use; passes share converted weights between them.
"""
import time

import torch
from transformers.modeling_outputs import CausalLMOutput

from hsd.capture import capture
from hsd.kernels.attention import MAX_NEW_TOKENS, ancestor_mask
from hsd.kv_cache import KVCache
from hsd.lowering import lower
from hsd.passes import PassManager, QuantizeLinear, check_materialised
from hsd.sampling import select
from hsd.stats import Clock, Stats


class Engine:
    def __init__(self, model, passes: PassManager, cache: KVCache, backend: str, prefill_chunk: int):
        self.model = model
        self.config = model.config
        self.passes = passes
        self.cache = cache
        self.backend = backend
        self.cuda_graphs = cache.k.device.type == "cuda" and backend != "eager"
        self.prefill_chunk = prefill_chunk
        self.device = cache.k.device
        self.batch_size = cache.k.shape[1]
        self.graphs = {}        # T -> rewritten torch.fx.GraphModule
        self.pass_report = {}   # T -> list of PassRecord
        self.compile_s = {}     # T -> seconds spent capturing, rewriting and lowering
        self.stats = Stats()
        self._steps = {}
        self._masks = {}

    def with_passes(self, *extra) -> "Engine":
        """An engine over the same model, KV cache and converted weights (the passes are shared,
        so are their weight caches) whose step graphs also run ``extra`` passes at the end."""
        if not any(isinstance(p, QuantizeLinear) for p in self.passes.passes):
            raise ValueError("sharing weights between modes needs a quantized engine (quant='w4a16')")
        passes = PassManager([*self.passes.passes, *extra], dump_dir=self.passes.dump_dir)
        return Engine(self.model, passes, self.cache, self.backend, self.prefill_chunk)

    def check_drafter(self, other: "Engine", role: str):
        """A model that drafts for this one must share its tokenizer and run at batch 1."""
        if other.config.vocab_size != self.config.vocab_size:
            raise ValueError(f"{role} vocab {other.config.vocab_size} != target vocab {self.config.vocab_size}: "
                             f"the {role} must share the target's tokenizer")
        if self.batch_size != 1 or other.batch_size != 1:
            raise ValueError("speculative decoding with a separate drafter runs at batch size 1")

    # ---- steps -------------------------------------------------------------------------------
    def step(self, input_ids, position_ids, tree_mask):
        """Run T = input_ids.shape[1] tokens per row at positions ``position_ids`` after
        ``cache.length`` cached tokens; returns (logits [B, T, V], hidden [B, T, H]) in buffers
        that the next call of the same step may overwrite. The cache length is not advanced."""
        tokens = input_ids.shape[1]
        fn = self._steps.get(tokens) or self._build(tokens)
        try:
            return fn(input_ids=input_ids, position_ids=position_ids, cache_len=self.cache.length,
                      tree_mask=tree_mask, k_cache=self.cache.k, v_cache=self.cache.v)
        except Exception as e:
            names = ", ".join(r.name for r in self.pass_report[tokens])
            raise RuntimeError(f"the compiled {tokens}-token step failed (passes: {names}): "
                               f"{type(e).__name__}: {e}") from e

    def _build(self, tokens):
        start = time.perf_counter()
        with torch.no_grad():
            gm = capture(self.model, self.batch_size, tokens, self.device)
            gm, self.pass_report[tokens] = self.passes(gm, tag=f"t{tokens}_")
            check_materialised(gm)
        self.graphs[tokens] = gm
        inputs = dict(input_ids=torch.zeros(self.batch_size, tokens, dtype=torch.long, device=self.device),
                      position_ids=self._positions(tokens), cache_len=self.cache.length,
                      # a copy: a CUDA-graphed step copies each call's mask into this buffer
                      tree_mask=self.causal_mask(tokens).clone(), k_cache=self.cache.k, v_cache=self.cache.v)
        self._steps[tokens] = lower(gm, inputs, self.backend, self.cuda_graphs)
        self.compile_s[tokens] = time.perf_counter() - start
        return self._steps[tokens]

    def causal_mask(self, tokens):
        if tokens not in self._masks:
            self._masks[tokens] = torch.ones(tokens, tokens, dtype=torch.bool, device=self.device).tril()
        return self._masks[tokens]

    def _positions(self, tokens):
        return self.cache.length.long()[:, None] + torch.arange(tokens, device=self.device)

    # ---- trees: verification and acceptance ----------------------------------------------------
    def verify(self, tokens: torch.Tensor, parents, check: bool = True) -> tuple:
        """Run a tree of n new tokens [B, n] after the cached prefix in one step. ``parents``
        [n]: parents[0] = -1 (node 0, the root, is the newest token, not yet cached) and
        0 <= parents[i] < i; a chain is [-1, 0, 1, ...]. Node i sits at position
        prefix + depth(i) and sees the prefix and its ancestors. Returns (logits [B, n, V],
        hidden [B, n, H]); the cache length is unchanged until ``accept``. ``check=False``
        skips the checks that read the device (pipelines that reserved room with ``prepare``
        and build valid trees on the device use it to keep one host sync per step)."""
        parents = torch.as_tensor(parents, dtype=torch.long, device=self.device)
        n = parents.shape[0]
        if tokens.dim() != 2 or tokens.shape != (self.batch_size, n):
            raise ValueError(f"tokens must be [{self.batch_size}, {n}] for {n} tree nodes, got {tuple(tokens.shape)}")
        if n > MAX_NEW_TOKENS:
            raise ValueError(f"a tree of {n} nodes exceeds the attention op's limit of {MAX_NEW_TOKENS}")
        if check:
            free = self.cache.max_seq_len - int(self.cache.length.max())
            if n > free:
                raise ValueError(f"a tree of {n} nodes does not fit: the cache holds {self.cache.max_seq_len - free} "
                                 f"of max_seq_len={self.cache.max_seq_len} tokens")
        mask = ancestor_mask(parents, check=check)  # raises on a parent not before its child
        positions = self.cache.length.long()[:, None] + mask.sum(-1) - 1      # prefix + depth
        return self.step(tokens.to(self.device), positions, mask)

    def verify_chain(self, tokens: torch.Tensor) -> tuple:
        """``verify`` of a chain [B, n] (each token the parent of the next): a causal step whose
        mask is built once per length, with no check that reads the device."""
        n = tokens.shape[1]
        if n > MAX_NEW_TOKENS:
            raise ValueError(f"a chain of {n} tokens exceeds the attention op's limit of {MAX_NEW_TOKENS}")
        return self.step(tokens.to(self.device), self._positions(n), self.causal_mask(n))

    def accept(self, path: torch.Tensor):
        """Keep the tree nodes ``path`` [B, A] (root first, each the parent of the next): move
        their K/V to the slots right after the prefix in every layer, then advance the cache."""
        path = path.to(self.device, torch.long)
        torch.ops.hsd.compact_kv(self.cache.k, self.cache.v, self.cache.length, path)
        self.cache.length += path.shape[1]

    # ---- user API ----------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor) -> CausalLMOutput:
        """Logits of every position of ``input_ids`` [B, P], like the Hugging Face model."""
        input_ids = self._check(input_ids, 0)
        self.cache.reset()
        return CausalLMOutput(logits=self._prefill(input_ids, all_positions=True)[0])

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 32, temperature: float = 0.0,
                 eos_token_id=None, pad_token_id=None) -> torch.Tensor:
        """Autoregressive decoding, greedy or sampled at ``temperature``: returns [B, P + n] with
        n <= max_new_tokens; stops when every row has produced an EOS (rows that finished
        earlier are padded with ``pad_token_id``)."""
        input_ids, eos, pad = self.prepare(input_ids, max_new_tokens, eos_token_id, pad_token_id)
        stats = self.stats = Stats(prompt_tokens=input_ids.shape[1], target_steps=1)
        clock = Clock(self.device)
        start = clock()
        token = select(self.prefill(input_ids)[0], temperature)
        start = clock.add("prefill_s", start, clock())
        out = [token]
        done = torch.isin(token, eos)
        causal1 = self.causal_mask(1)
        while len(out) < max_new_tokens and not bool(done.all()):
            logits, _ = self.step(token[:, None], self._positions(1), causal1)
            self.cache.length += 1
            token = torch.where(done, pad, select(logits[:, -1], temperature))
            done |= torch.isin(token, eos)
            out.append(token)
            stats.target_steps += 1
        clock.add("decode_s", start, clock())
        clock.settle(stats)
        stats.new_tokens = len(out)
        return torch.cat([input_ids, torch.stack(out, 1)], 1)

    def prepare(self, input_ids, max_new_tokens, eos_token_id=None, pad_token_id=None, room=0, steps=(1,)):
        """Check a generation request and build the steps it needs (token counts ``steps``)
        before anything is timed. ``room``: extra cache slots a speculative step may use past
        max_new_tokens. Returns (input_ids on the device, EOS ids tensor, pad id)."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        input_ids = self._check(input_ids, max_new_tokens, room)
        eos = _as_list(eos_token_id if eos_token_id is not None else _generation(self.model, "eos_token_id"))
        pad = pad_token_id if pad_token_id is not None else _generation(self.model, "pad_token_id")
        pad = pad if pad is not None else (eos[0] if eos else 0)
        for tokens in (self.prefill_chunk, *steps):
            self._steps.get(tokens) or self._build(tokens)
        return input_ids, torch.tensor(eos, device=self.device, dtype=torch.long), pad

    def prefill(self, input_ids: torch.Tensor) -> tuple:
        """Reset the cache and run the prompt: returns (logits of its last position [B, V], hidden
        states of every position [B, P, H]: the features an EAGLE head drafts from)."""
        self.cache.reset()
        logits, hidden = self._prefill(input_ids)
        return logits[:, -1], hidden

    def _prefill(self, input_ids, all_positions=False):
        """Run the prompt in causal chunks of ``prefill_chunk`` tokens (the last one padded) and
        advance the cache; returns (logits of every prompt position or of the last chunk, hidden
        states of every position)."""
        chunk = self.prefill_chunk
        mask = self.causal_mask(chunk)
        logits, hidden = [], []
        for start in range(0, input_ids.shape[1], chunk):
            ids = input_ids[:, start:start + chunk]
            n = ids.shape[1]
            if n < chunk:
                ids = torch.nn.functional.pad(ids, (0, chunk - n))
            step_logits, step_hidden = self.step(ids, self._positions(chunk), mask)
            self.cache.length += n
            hidden.append(step_hidden[:, :n].clone())
            if all_positions or start + chunk >= input_ids.shape[1]:
                logits.append(step_logits[:, :n].clone())
        return torch.cat(logits, 1), torch.cat(hidden, 1)

    def _check(self, input_ids, new_tokens, room=0):
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int32):
            raise ValueError("input_ids must be an integer tensor of shape [batch, tokens]")
        b, p = input_ids.shape
        if b != self.batch_size:
            raise ValueError(f"this engine was compiled for batch_size={self.batch_size}, got input_ids of batch {b}")
        if p == 0:
            raise ValueError("input_ids is empty")
        if p + new_tokens + room > self.cache.max_seq_len:
            extra = f" + {room} slots for the last speculative step" if room else ""
            raise ValueError(f"prompt ({p} tokens) + max_new_tokens ({new_tokens}){extra} exceeds the KV cache's "
                             f"max_seq_len={self.cache.max_seq_len}; pass a larger max_seq_len to hsd.compile")
        vocab = self.config.vocab_size
        if int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab:
            raise ValueError(f"input_ids must lie in [0, {vocab})")
        return input_ids.to(self.device, torch.long)

    def weight_bytes(self, tokens: int = None) -> int:
        """Bytes of weights the T-token step reads; a table only gathered from (the embedding,
        unless tied to the lm_head) counts as not read."""
        gm = self.graphs[tokens if tokens is not None else min(self.graphs)]
        gathered = {n.target for n in gm.graph.nodes if n.op == "get_attr"
                    and all(u.target is torch.nn.functional.embedding for u in n.users)}
        return sum(b.numel() * b.element_size() for name, b in gm.named_buffers() if name not in gathered)


def _generation(model, key):
    cfg = getattr(model, "generation_config", None)
    value = getattr(cfg, key, None) if cfg is not None else None
    return value if value is not None else getattr(model.config, key, None)


def _as_list(x):
    return [] if x is None else ([x] if isinstance(x, int) else list(x))

