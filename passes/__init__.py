"""Graph passes: the Pass interface, the pass manager, and the built-in passes."""
from hsd.passes.attention import STEP_INPUTS, RewriteAttention
from hsd.passes.base import FunctionPass, Pass, as_pass
from hsd.passes.linear import QUANT_SCHEMES, FuseSiblingLinears, QuantizeLinear
from hsd.passes import scaled as _scaled  # noqa: F401  (registers the w8a8 and fp8 schemes)
from hsd.passes.manager import PassError, PassManager, PassRecord, node_kinds
from hsd.passes.norm import FuseRMSNormQuant
from hsd.passes.rotate import RotateHadamard
from hsd.passes.smoothquant import SmoothQuant
from hsd.passes.weights import LoadWeights, check_materialised
from hsd.passes.w4a8 import LowBitActivations

__all__ = ["Pass", "FunctionPass", "as_pass", "PassManager", "PassError", "PassRecord", "node_kinds",
           "RewriteAttention", "FuseSiblingLinears", "QuantizeLinear", "QUANT_SCHEMES", "STEP_INPUTS",
           "LoadWeights", "check_materialised", "LowBitActivations", "FuseRMSNormQuant", "SmoothQuant",
           "RotateHadamard"]
