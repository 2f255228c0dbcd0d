"""hsd: compile quantized Hugging Face LMs into fast (speculative) decoders on torch.compile."""
import pathlib as _pathlib
import sys as _sys

# In a source checkout hsd.passes / hsd.lowering / hsd.kernels live in the top-level folders
# passes/, lowering/, kernels/ (a wheel maps them under hsd/). Searching the checkout root too
# makes them importable whatever editable-install mode setuptools chose, or with PYTHONPATH alone.
_root = _pathlib.Path(__file__).resolve().parent.parent
if (_root / "pyproject.toml").is_file() and (_root / "kernels").is_dir():
    __path__.append(str(_root))
    # ... but the root itself must not be on sys.path, where `python -m` from the root puts it:
    # its kernels/ and passes/ would shadow the PyPI packages of those names, and transformers
    # (>= 5.25 depends on `kernels`) imports `kernels` when it is imported.
    _sys.path[:] = [p for p in _sys.path if _pathlib.Path(p or ".").resolve() != _root]
from hsd import kernels  # noqa: F401  (registers the hsd ops before any graph uses them)
from hsd.api import compile
from hsd.capture import SUPPORTED_ARCHITECTURES, UnsupportedModelError
from hsd.engine import Engine
from hsd.passes import Pass, PassError

__all__ = ["compile", "Engine", "Pass", "PassError", "UnsupportedModelError", "SUPPORTED_ARCHITECTURES"]
