"""Calibration: run the float model on sample tokens and show each Linear its inputs.

Schemes that need data (SmoothQuant's per-channel activation maxima, GPTQ's Hessians) gather it
here, before capture, from the eager Hugging Face model: statistics are keyed by the Linear's
module name, which is what ``node.meta["hsd_module"]`` (and ``"hsd_parts"`` after fusion) holds
in the captured graphs.
"""
import contextlib
import pathlib

import torch

TEXT = pathlib.Path(__file__).with_name("calibration.txt")  # prose, code and numbers of our own


def linear_inputs(model: torch.nn.Module, input_ids: torch.Tensor, observe, batch: int = 1,
                  include_lm_head: bool = False):
    """Run ``model`` over ``input_ids`` [n, T] in batches of ``batch`` rows; for every nn.Linear
    call ``observe(module_name, x)`` with its input flattened to [tokens, in_features]."""
    if input_ids.dim() != 2 or input_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"calibration input_ids must be integer [n, T], got {input_ids.dtype} {tuple(input_ids.shape)}")
    if next(model.parameters()).is_meta:
        raise ValueError("calibration needs real weights; the model is on the meta device")
    vocab = model.config.vocab_size
    if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= vocab):
        raise ValueError(f"calibration token ids must lie in [0, {vocab})")
    device = next(model.parameters()).device
    with contextlib.ExitStack() as stack, torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and (include_lm_head or name != "lm_head"):
                hook = module.register_forward_pre_hook(
                    lambda m, args, name=name: observe(name, args[0].reshape(-1, args[0].shape[-1])))
                stack.callback(hook.remove)
        for rows in input_ids.split(batch):
            model(rows.to(device), use_cache=False)


def random_ids(config, n: int = 8, length: int = 128, seed: int = 0) -> torch.Tensor:
    """Uniform random token ids: the calibration set of a synthetic model without a tokenizer."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (n, length), generator=g)


def text_ids(tokenizer, length: int = 128) -> torch.Tensor:
    """The embedded calibration text (``calibration.txt``) as token ids [n, length], split into
    full rows. ``tokenizer``: a Hugging Face tokenizer or a path/name to load one from."""
    if isinstance(tokenizer, (str, pathlib.Path)):
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
    ids = torch.tensor(tokenizer(TEXT.read_text())["input_ids"], dtype=torch.long).reshape(-1)
    n = ids.numel() // length
    if n == 0:
        raise ValueError(f"the calibration text is {ids.numel()} tokens, fewer than one row of {length}")
    return ids[:n * length].reshape(n, length)
