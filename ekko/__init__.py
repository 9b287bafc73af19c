"""ekko: compile sparse updates and serving lookups of recommendation models.

This module is the public Python API: re-exports only, no logic. Names load
on first use, so `import ekko.compiler` stays light and a tool that only
compiles never loads the runtime.
"""

from importlib import import_module as _import

__version__ = "0.1.0"

_EXPORTS = {
    "Model": "ekko.compiler.frontend",
    "ModelError": "ekko.compiler.frontend",
    "import_module": "ekko.compiler.frontend",
    "load_model": "ekko.compiler.frontend",
    "parse_model": "ekko.compiler.frontend",
    "UpdateRequest": "ekko.compiler.pipeline",
    "UpdateRule": "ekko.compiler.frontend",
    "run_pipeline": "ekko.compiler.pipeline",
    "update_spec": "ekko.compiler.pipeline",
    "EkkoError": "ekko.kernels.errors",
    "UpdateError": "ekko.kernels.errors",
    "NonFiniteOutputError": "ekko.kernels.errors",
    "OptimizerError": "ekko.kernels.errors",
    "BagKernel": "ekko.kernels.lookup",
    "LookupError": "ekko.kernels.errors",
    "bag_kernel": "ekko.kernels.build",
    "tune_prefetch": "ekko.kernels.tune",
    "CompiledModel": "ekko.kernels.model",
    "compile_model": "ekko.kernels.model",
    "dequantize_rows": "ekko.kernels.quant",
    "quantize_rows": "ekko.kernels.quant",
    "Engine": "ekko.engine",
    "Gathered": "ekko.engine",
    "HealthConfig": "ekko.engine",
    "Packet": "ekko.engine",
    "SchedulerConfig": "ekko.engine",
    "optimizer": "ekko.kernels.build",
    "optimizers": "ekko.kernels.build",
    "rowmath": "ekko.dialects.catalog",
    "UpdateKernel": "ekko.kernels.update",
    "update_kernel": "ekko.kernels.build",
}

# submodules that load on first use: `ekko.torch.EmbeddingBags` after a plain `import ekko`
_SUBMODULES = {"torch": "ekko.torch"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(_import(_EXPORTS[name]), name)
    if name in _SUBMODULES:
        return _import(_SUBMODULES[name])
    raise AttributeError(f"module 'ekko' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The public API too, so completion and help(ekko) find the lazily loaded names."""
    return sorted({*globals(), *_EXPORTS, *_SUBMODULES})
