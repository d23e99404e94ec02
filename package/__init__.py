"""fused-adapters: fused Triton kernels for bottleneck adapters and sparse mixtures of adapters on
timm Vision Transformers.

    fused_adapters.kernels    the fused ops (bottleneck_adapter, sparse_adapter, routed_adapter),
                              their plain-PyTorch references, launch variants and autotune
    fused_adapters.adapters   the ops as adapters in any timm ViT (inject, save_adapters, ...)

Importing this package imports neither torch nor triton: `fused_adapters.__version__` is free,
and TRITON_INTERPRET can still be set before the first `import fused_adapters.kernels`. The two
subpackages are also reachable as attributes (`fused_adapters.kernels`), imported on first use.

This file is the package's fused_adapters/__init__.py (setup.py maps the folder `package/` to
it: a folder named fused_adapters/ at the repository root would shadow the installed package
whenever the root is on sys.path). `__version__` below is the one place the version is written;
setup.py reads it from here.
"""

__version__ = "0.1.0"

_SUBPACKAGES = ("adapters", "kernels")

__all__ = ["__version__"]


def __getattr__(name):
    if name in _SUBPACKAGES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_SUBPACKAGES))
