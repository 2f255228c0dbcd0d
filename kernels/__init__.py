"""Kernels: Triton implementations, torch references, and the registry that picks one per device."""
from hsd.kernels import ops, registry

__all__ = ["ops", "registry"]
