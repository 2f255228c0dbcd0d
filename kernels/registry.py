"""One kernel registry: op name -> implementation per device type.

Each op (see ``hsd.kernels.ops``) asks the registry which function to run for the device of
its inputs. On CUDA that is a hand-written Triton kernel, elsewhere a torch reference. Tests
can point an op at another implementation, e.g. the Triton kernel under TRITON_INTERPRET=1
on CPU, with ``use``.
"""
import contextlib

_impls: dict[tuple[str, str], dict[str, object]] = {}
_defaults: dict[tuple[str, str], str] = {}
_overrides: dict[str, str] = {}


def register(op: str, device: str, name: str, default: bool = False):
    """Decorator: register ``fn`` as implementation ``name`` of ``op`` on ``device`` ("cpu", "cuda")."""
    def wrap(fn):
        _impls.setdefault((op, device), {})[name] = fn
        if default or (op, device) not in _defaults:
            _defaults[(op, device)] = name
        return fn
    return wrap


def lookup(op: str, device: str):
    impls = _impls.get((op, device))
    if not impls:
        impls = _impls.get((op, "cpu"))  # any device without its own kernel falls back to the reference
    if not impls:
        raise NotImplementedError(f"no implementation of hsd op {op!r} is registered for device {device!r}")
    name = _overrides.get(op) or _defaults.get((op, device)) or _defaults[(op, "cpu")]
    if name not in impls:
        raise NotImplementedError(f"hsd op {op!r} has no implementation {name!r} on {device!r}; known: {sorted(impls)}")
    return impls[name]


@contextlib.contextmanager
def use(op: str, name: str):
    """Run ``op`` with implementation ``name`` on every device inside the block."""
    old = _overrides.get(op)
    _overrides[op] = name
    try:
        yield
    finally:
        if old is None:
            _overrides.pop(op, None)
        else:
            _overrides[op] = old
