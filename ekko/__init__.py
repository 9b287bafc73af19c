"""ekko: compile sparse updates and serving lookups of recommendation models.

This module is the public Python API: re-exports only, no logic.
"""

from .compiler.frontend import Model, ModelError, import_module, load_model, parse_model
from .compiler.pipeline import UpdateRequest, run_pipeline, update_spec
from .kernels.errors import EkkoError, UpdateError
from .kernels.lookup import BagKernel, LookupError, bag_kernel
from .kernels.model import CompiledModel, compile_model
from .kernels.quant import dequantize_rows, quantize_rows
from .kernels.update import UpdateKernel, update_kernel

__version__ = "0.1.0"

__all__ = [
    "BagKernel",
    "CompiledModel",
    "EkkoError",
    "LookupError",
    "Model",
    "ModelError",
    "UpdateError",
    "UpdateKernel",
    "UpdateRequest",
    "bag_kernel",
    "compile_model",
    "dequantize_rows",
    "import_module",
    "load_model",
    "parse_model",
    "quantize_rows",
    "run_pipeline",
    "update_kernel",
    "update_spec",
]
