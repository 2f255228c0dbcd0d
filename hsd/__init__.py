"""hsd: compile quantized Hugging Face LMs into fast (speculative) decoders on torch.compile."""
from hsd import kernels  # noqa: F401  (registers the hsd ops before any graph uses them)
from hsd.api import compile
from hsd.capture import SUPPORTED_ARCHITECTURES, UnsupportedModelError
from hsd.engine import Engine
from hsd.passes import Pass, PassError

__all__ = ["compile", "Engine", "Pass", "PassError", "UnsupportedModelError", "SUPPORTED_ARCHITECTURES"]
