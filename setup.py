"""fused-adapters: fused Triton kernels for bottleneck adapters on Vision Transformers.

kernels/ installs as fused_adapters.kernels and adapters/ as fused_adapters.adapters; the
bare names `kernels` and `adapters` are taken on PyPI, so they are never importable alone.
"""

from setuptools import setup

setup(
    name="fused-adapters",
    version="0.1.0",
    description="Fused Triton kernels for bottleneck adapters and sparse mixtures of adapters on ViTs",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # fused_adapters itself is an implicit namespace package: a fused_adapters/ folder at the
    # repo root would shadow the installed mapping whenever the root is on sys.path.
    packages=["fused_adapters.kernels", "fused_adapters.adapters"],
    package_dir={
        "fused_adapters.kernels": "kernels",
        "fused_adapters.adapters": "adapters",
    },
    install_requires=["torch>=2.4", "triton>=3.0", "timm>=1.0"],
    extras_require={
        "dev": ["pytest", "pytest-benchmark", "hypothesis", "safetensors", "matplotlib"],
    },
)
