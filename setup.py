"""fused-adapters: fused Triton kernels for bottleneck adapters on Vision Transformers.

The installed package is fused_adapters, built from three folders:
    package/   -> fused_adapters            (its __init__: __version__, no torch or triton import)
    kernels/   -> fused_adapters.kernels
    adapters/  -> fused_adapters.adapters
The bare names `kernels` and `adapters` are taken on PyPI, so they are never importable alone,
and no folder at the repository root is named fused_adapters: it would shadow the installed
mapping whenever the root is on sys.path (under pytest, with the root conftest.py).
"""

import ast
import pathlib

from setuptools import setup

ROOT = pathlib.Path(__file__).resolve().parent


def read_version() -> str:
    """`__version__` from package/__init__.py, the one place the version is written (read, not
    imported: the build must not need the package's dependencies)."""
    tree = ast.parse((ROOT / "package" / "__init__.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__version__" for t in node.targets):
            return ast.literal_eval(node.value)
    raise RuntimeError("package/__init__.py does not assign __version__")


setup(
    name="fused-adapters",
    version=read_version(),
    description=(
        "Fused Triton kernels for bottleneck adapters and sparse top-k mixtures of adapters, dropped "
        "into timm Vision Transformers with Adapter+ as the default recipe; benchmarked against eager "
        "PyTorch and torch.compile"
    ),
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    author="The fused-adapters authors",
    url="https://github.com/fused-adapters/fused-adapters",
    # PEP 639: an SPDX expression (core metadata License-Expression) and the license file
    # (shipped in the wheel's .dist-info/licenses/); needs setuptools >= 77 (pyproject.toml).
    # No "License ::" classifier: setuptools refuses one next to an expression.
    license_expression="Apache-2.0",
    license_files=["LICENSE"],
    classifiers=[
        "Development Status :: 3 - Alpha",
        "Environment :: GPU :: NVIDIA CUDA",
        "Intended Audience :: Developers",
        "Intended Audience :: Science/Research",
        "Operating System :: POSIX :: Linux",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3 :: Only",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
        "Topic :: Scientific/Engineering :: Image Recognition",
        "Topic :: Software Development :: Libraries :: Python Modules",
        "Typing :: Typed",
    ],
    keywords=[
        "adapters", "parameter-efficient fine-tuning", "peft", "adapter+", "mixture of adapters",
        "mixture of experts", "vision transformer", "vit", "timm", "triton", "pytorch", "kernel fusion",
    ],
    python_requires=">=3.10",
    packages=["fused_adapters", "fused_adapters.kernels", "fused_adapters.kernels.bottleneck",
              "fused_adapters.kernels.lora", "fused_adapters.kernels.sparse", "fused_adapters.adapters",
              "fused_adapters.tools"],
    package_dir={
        "fused_adapters": "package",
        "fused_adapters.kernels": "kernels",
        "fused_adapters.adapters": "adapters",
        "fused_adapters.tools": "tools",
    },
    # PEP 561 markers: type checkers read the packages' inline annotations.
    package_data={
        "fused_adapters": ["py.typed"],
        "fused_adapters.kernels": ["py.typed"],
        "fused_adapters.adapters": ["py.typed"],
        "fused_adapters.tools": ["py.typed"],
    },
    install_requires=["torch>=2.4", "triton>=3.0", "timm>=1.0"],
    extras_require={
        # peft: the PEFT interoperability tests only (adapters/ reads and writes its files without it)
        "dev": ["pytest", "pytest-benchmark", "pytest-xdist", "hypothesis", "safetensors", "matplotlib", "peft"],
    },
)
