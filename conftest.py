"""Repo-wide pytest setup.

- Machines without CUDA run the real Triton kernels in Triton's interpreter: TRITON_INTERPRET=1
  must be set before triton is imported, and this file is imported before any test module.
  (torch itself does not import triton, so asking torch about CUDA first is safe.)
- torch.compile's on-disk graph caches are off (see below).
- `pytest` runs tests/; `pytest --benchmark` runs the benchmark suite in bench/ instead.
"""

import os
import pathlib

import pytest
import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

# torch.compile's on-disk caches key a graph by its forward: a changed backward formula of a
# custom op is not part of the key, so a cached entry from an earlier version of this code
# would run the old backward. Tests always compile what the code says now.
os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "0")
os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "0")


def pytest_addoption(parser):
    group = parser.getgroup("fused-adapters benchmarks")
    group.addoption(
        "--benchmark", action="store_true", default=False,
        help="run the benchmark suite in bench/ (and only it): time, memory, launches and bytes against "
             "eager PyTorch and torch.compile",
    )
    group.addoption(
        "--benchmark-quick", action="store_true", default=False,
        help="with --benchmark (implied): the CI-sized run, smallest shapes and few rounds",
    )
    group.addoption(
        "--benchmark-count-rows", type=int, default=6304, metavar="M",
        help="count bytes moved (interpreter, device-free) for shapes of at most M rows; 0: none (default 6304)",
    )


def benchmark_mode(config) -> bool:
    """`--benchmark` (or --benchmark-quick, or pytest-benchmark's --benchmark-only) runs bench/;
    otherwise the tests run."""
    return bool(config.getoption("--benchmark") or config.getoption("--benchmark-quick")
                or config.getoption("benchmark_only", False))


ROOT = pathlib.Path(__file__).resolve().parent


def pytest_configure(config):
    # pyproject's testpaths name tests/ only. With --benchmark and no paths given, run bench/
    # (pytest falls back to the invocation folder instead of testpaths when an option's value,
    # such as --benchmark-json's path, points outside the repository).
    if benchmark_mode(config) and config.args_source != pytest.Config.ArgsSource.ARGS:
        config.args[:] = [str(ROOT / "bench")]


def pytest_ignore_collect(collection_path, config):
    # Folders reached by recursion (not named on the command line): the other suite stays out.
    if collection_path.parent != ROOT:
        return None
    if collection_path.name == "bench" and not benchmark_mode(config):
        return True
    if collection_path.name == "tests" and benchmark_mode(config):
        return True
    return None
