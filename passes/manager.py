"""The one pass manager: runs passes in order, lints after each, reports, and dumps graphs.

Order (``hsd.compile`` builds it): the user's passes on the captured graph, then the built-in
passes (``RewriteAttention``, ``FuseSiblingLinears``, ``QuantizeLinear``), then dead-code
elimination. After every pass the graph is linted and recompiled; a pass that raises or leaves an
invalid graph becomes a ``PassError`` naming the pass. With ``dump_dir`` set (or the environment
variable ``HSD_DUMP_GRAPHS=<dir>``) each pass writes ``NN_<name>.before.py`` / ``.after.py``.
"""
import collections
import dataclasses
import os
import pathlib
import time

import torch.fx

from hsd.passes.base import as_pass


class PassError(RuntimeError):
    pass


@dataclasses.dataclass
class PassRecord:
    name: str
    uuid: str
    added: dict
    removed: dict
    seconds: float

    def __str__(self):
        fmt = lambda d: ", ".join(f"{n} {k}" for k, n in sorted(d.items())) or "nothing"
        return f"{self.name}: +[{fmt(self.added)}] -[{fmt(self.removed)}] ({self.seconds * 1e3:.0f} ms)"


def node_kinds(gm: torch.fx.GraphModule) -> collections.Counter:
    """Count nodes by what they call: 'linear', 'hsd.w4a16_linear', 'get_attr', ..."""
    def kind(n):
        if n.op in ("call_function", "call_method"):
            t = n.target
            if isinstance(t, torch._ops.OpOverload) or isinstance(t, torch._ops.OpOverloadPacket):
                return str(t).replace("::", ".").removesuffix(".default")
            return getattr(t, "__name__", str(t))
        return n.op
    return collections.Counter(kind(n) for n in gm.graph.nodes)


class PassManager:
    def __init__(self, passes, dump_dir=None):
        self.passes = [as_pass(p) for p in passes]
        dump_dir = dump_dir or os.environ.get("HSD_DUMP_GRAPHS")
        self.dump_dir = pathlib.Path(dump_dir) if dump_dir else None

    def __call__(self, gm: torch.fx.GraphModule, tag: str = ""):
        records = []
        for i, p in enumerate(self.passes):
            before = node_kinds(gm)
            self._dump(gm, f"{tag}{i:02d}_{p.name}.before.py")
            start = time.perf_counter()
            gm = self._run_one(p, gm)
            seconds = time.perf_counter() - start
            self._dump(gm, f"{tag}{i:02d}_{p.name}.after.py")
            after = node_kinds(gm)
            records.append(PassRecord(p.name, p.uuid(), dict(after - before), dict(before - after), seconds))
        gm.graph.eliminate_dead_code()
        gm.recompile()
        return gm, records

    def _run_one(self, p, gm):
        try:
            out = p(gm)
        except PassError:
            raise
        except Exception as e:
            raise PassError(f"pass {p.name!r} failed: {type(e).__name__}: {e}") from e
        if out is not None and not isinstance(out, torch.fx.GraphModule):
            raise PassError(f"pass {p.name!r} returned {type(out).__name__}; return None "
                            "(graph rewritten in place) or a torch.fx.GraphModule")
        gm = out if out is not None else gm
        try:
            gm.graph.lint()
            gm.recompile()
        except Exception as e:
            raise PassError(f"pass {p.name!r} left an invalid graph: {e}") from e
        return gm

    def _dump(self, gm, name):
        if self.dump_dir is not None:
            self.dump_dir.mkdir(parents=True, exist_ok=True)
            (self.dump_dir / name).write_text(gm.code)
