"""Repo-wide pytest setup.

- Machines without CUDA run the real Triton kernels in Triton's interpreter: TRITON_INTERPRET=1
  must be set before triton is imported, and this file is imported before any test module.
  (torch itself does not import triton, so asking torch about CUDA first is safe.)
- torch.compile's on-disk graph caches are off (see below).
- `--benchmark` adds the benchmark suite under bench/ to the run; without it bench/ is skipped.
"""

import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

# torch.compile's on-disk caches key a graph by its forward: a changed backward formula of a
# custom op is not part of the key, so a cached entry from an earlier version of this code
# would run the old backward. Tests always compile what the code says now.
os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "0")
os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "0")


def pytest_addoption(parser):
    parser.addoption(
        "--benchmark", action="store_true", default=False,
        help="also run the benchmark suite in bench/ (memory, throughput, launch counts)",
    )


def pytest_ignore_collect(collection_path, config):
    if collection_path.name == "bench" and not config.getoption("--benchmark"):
        return True
    return None
