"""The pass interface.

A pass rewrites a ``torch.fx.GraphModule`` in place (or returns a new one). Built-in passes
subclass ``Pass``: a ``name``, a docstring saying what the pass matches and what it emits, and
``uuid()``, a stable hash of the pass's source and settings that compile caches can key on.
User passes are plain callables; ``as_pass`` wraps them so they report and dump like the rest.
"""
import hashlib
import inspect

import torch.fx


class Pass:
    name = "pass"

    def __call__(self, gm: torch.fx.GraphModule):
        raise NotImplementedError

    def settings(self) -> dict:
        """What changes this pass's output besides its source (quant scheme, group size...)."""
        return {}

    def uuid(self) -> str:
        return _hash(_source(type(self)), repr(sorted(self.settings().items())))


class FunctionPass(Pass):
    """A user's callable on a GraphModule, run as a pass."""

    def __init__(self, fn):
        self.fn = fn
        self.name = getattr(fn, "__name__", type(fn).__name__)

    def __call__(self, gm):
        return self.fn(gm)

    def uuid(self) -> str:
        return _hash(_source(self.fn))


def as_pass(p) -> Pass:
    if isinstance(p, Pass):
        return p
    if not callable(p):
        raise TypeError(f"a pass must be an hsd.Pass or a callable taking a torch.fx.GraphModule, got {p!r}")
    return FunctionPass(p)


def _source(obj) -> str:
    try:
        return inspect.getsource(obj)
    except (OSError, TypeError):
        return getattr(obj, "__qualname__", repr(obj))


def _hash(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
