"""What every fused op shares about launching kernels: the Launch record, block configurations,
the SM count a launch plan is made for, output buffers, and which path a tensor takes."""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import triton

__all__ = ["BlockConfig", "Launch", "launch_plan", "sm_count", "is_interpreted", "new_output", "device_context"]


@dataclass(frozen=True)
class BlockConfig:
    name: str
    block_rows: int
    block_dim: int
    num_warps: int
    num_stages: int
    # Backward weights kernel only: ranks per program. Below the padded rank, the rank axis is
    # split over a third grid axis (the two [D, r] accumulators of rank 128+ do not fit in
    # registers). 0 means all of them.
    rank_tile: int = 0
    # Row-tile kernels: the widest column tile the smaller block-rows variants may grow to, so a
    # thread keeps about the same elements (and 128-bit loads) when the rows halve. 0: keep block_dim.
    wide_dim: int = 0


@dataclass
class Launch:
    """One kernel launch, fully described: the runtime calls it, the compile check compiles it."""

    kernel: object
    grid: tuple
    args: dict  # runtime arguments by name: tensors, ints, floats
    constexprs: dict
    config: BlockConfig

    @property
    def programs(self) -> int:
        count = 1
        for size in self.grid:
            count *= size
        return count

    def __call__(self) -> None:
        self.kernel[self.grid](
            **self.args, **self.constexprs, num_warps=self.config.num_warps, num_stages=self.config.num_stages
        )


@triton.jit
def _probe():
    pass


def is_interpreted() -> bool:
    """Whether Triton runs kernels in its interpreter (TRITON_INTERPRET=1 was set before import)."""
    return not isinstance(_probe, triton.runtime.JITFunction)


_sm_count_override: list[int] = []

# Programs run one by one in the interpreter; a small SM count keeps its grids (and the tests)
# small while still exercising multi-program reductions.
INTERPRETER_SM_COUNT = 2


@contextlib.contextmanager
def launch_plan(sm_count: int) -> Iterator[None]:
    """Plan launches (grids, block rows, reduction chunks) as for a GPU with `sm_count` SMs,
    whatever the device: `with launch_plan(132): ...` shows, in the interpreter, the grids an
    H100 gets."""
    if isinstance(sm_count, bool) or not isinstance(sm_count, int) or sm_count < 1:
        raise ValueError(f"sm_count must be a positive int, got {sm_count!r}")
    _sm_count_override.append(sm_count)
    try:
        yield
    finally:
        _sm_count_override.pop()


@functools.lru_cache(maxsize=None)
def _device_sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def sm_count(device: torch.device) -> int:
    """The SM count launches on `device` are planned for."""
    if _sm_count_override:
        return _sm_count_override[-1]
    if device.type == "cuda":
        return _device_sm_count(device)
    return INTERPRETER_SM_COUNT


def new_output(shape, dtype, device) -> torch.Tensor:
    """Every buffer a kernel writes is allocated here: tests swap in NaN-filled buffers to prove
    that each element is written."""
    return torch.empty(shape, dtype=dtype, device=device)


class _NullContext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def device_context(x: torch.Tensor):
    return torch.cuda.device(x.device) if x.device.type == "cuda" else _NullContext()


def optional(tensor: Optional[torch.Tensor], fallback: torch.Tensor) -> torch.Tensor:
    """A small (parameter-sized) tensor made contiguous, or a stand-in pointer for an absent one
    that the kernel's constexpr flag keeps unread. M x D tensors never go through here: the
    kernels take their strides."""
    return fallback if tensor is None else tensor.contiguous()
