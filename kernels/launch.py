"""What every fused op shares about launching kernels: the Launch record and the Plan of a pass,
the one tile configuration type and its smaller block-rows variants, launch plans for an SM
count (settable with launch_plan), output buffers, and the layout of packed gradients. Which
path (Triton, interpreter, reference) a call takes is kernels/paths.py's."""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
import triton.language as tl

from .paths import KERNEL_DTYPES

__all__ = [
    "BlockConfig", "Launch", "Plan", "PackedLayout", "launch_plan", "sm_count", "new_output", "device_context",
    "padded_rank", "dtype_group", "row_variants", "plan_block_rows", "plan_chunks", "variant_config", "scale_mode",
    "packed_grad_dtype", "input_precision", "int32_columns", "reduce_partials", "fold_rows", "param_grad", "scale_grad",
    "cdiv", "next_power_of_2", "TRITON_DTYPES",
]

# tl.dot needs every dimension >= 16, and tl.arange a power of two.
MIN_BLOCK_RANK = 16
MIN_BLOCK_ROWS = 16
TRITON_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for the host-side plans. (triton.cdiv is a Triton function: called from Python it
    goes through the JIT's argument handling, about 8 us a call on 2 CPU cores.)"""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (n >= 1), without triton's per-call overhead."""
    return 1 << (n - 1).bit_length()


@dataclass(frozen=True)
class BlockConfig:
    """One tile configuration, for every kernel of every op: a named, compile-checked entry of a
    tile table (the op's configs.py)."""

    name: str
    block_rows: int
    # The column tile: D (or D_out) columns per step of a row-tile kernel's loops; a GEMM's
    # output columns per program.
    block_dim: int
    num_warps: int
    num_stages: int
    # Backward weights kernels only: ranks per program. Below the padded rank, the rank axis is
    # split over a third grid axis (the two [D, r] accumulators of rank 128+ do not fit in
    # registers). 0 means all of them.
    rank_tile: int = 0
    # Row-tile kernels: the widest column tile the smaller block-rows variants may grow to, so a
    # thread keeps about the same elements (and 128-bit loads) when the rows halve. 0: keep block_dim.
    wide_dim: int = 0
    # GEMM kernels only: the reduction tile, and how many row tiles share a sweep over the
    # column tiles (program order that keeps their operands in L2).
    block_k: int = 0
    group_rows: int = 0


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


@dataclass
class Plan:
    """One pass of an op as a GPU runs it, made by the op's plan.py: its launches in order (by
    role, e.g. "forward", "backward_hidden"), and the buffers the plan allocated for them
    (outputs, what is saved for backward, scratch, gradient partials) by name."""

    launches: dict = field(default_factory=dict)
    buffers: dict = field(default_factory=dict)

    def __call__(self) -> None:
        for launch in self.launches.values():
            launch()


class PackedLayout:
    """An op's parameter gradients packed into one flat vector (a custom op returns one tensor
    for all of them; the weight-gradient kernels write each chunk's partials in this layout):
    the fields in order, each with its element count."""

    def __init__(self, *fields: tuple[str, int]):
        self.fields = fields
        self.size = sum(size for _, size in fields)

    def offset(self, name: str) -> int:
        start = 0
        for field_name, size in self.fields:
            if field_name == name:
                return start
            start += size
        raise KeyError(name)

    def split(self, packed: torch.Tensor) -> dict:
        """Views of each field of a packed vector."""
        return dict(zip((name for name, _ in self.fields), packed.split([size for _, size in self.fields])))


def reduce_partials(partials: torch.Tensor, grad_dtype: torch.dtype) -> torch.Tensor:
    """The per-chunk partial sums [chunks, size] of a weight-gradient launch, summed over chunks
    in order (deterministic); with one chunk they are the gradients already, in grad_dtype."""
    if partials.shape[0] == 1:
        return partials[0]
    total = partials.sum(dim=0)
    return total if total.dtype == grad_dtype else total.to(grad_dtype)


def param_grad(grad: torch.Tensor, param: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A field of the packed gradients as `param`'s gradient: its shape and dtype (no op where they
    match already: a no-op .to or .view still costs a dispatch), None for an absent parameter."""
    if param is None:
        return None
    if grad.shape != param.shape:
        grad = grad.view(param.shape)
    return grad if grad.dtype == param.dtype else grad.to(param.dtype)


def scale_grad(per_channel: torch.Tensor, scale: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """dscale from the packed per-channel sums: summed over channels for a layer-wise (one-element)
    scale."""
    if scale is not None and scale.numel() == 1:
        return per_channel.float().sum().reshape(scale.shape).to(scale.dtype)
    return param_grad(per_channel, scale)


def fold_rows(packed: torch.Tensor, start: int, rows: int, width: int) -> None:
    """Where a split axis left one row of a gradient per block ([rows, width] from `start`), sum
    them into the first, in place (fp32 accumulation)."""
    if rows > 1:
        block = packed[start:start + rows * width].view(rows, width)
        block[0] = block.float().sum(0).to(packed.dtype)


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


_SAME_DEVICE = contextlib.nullcontext()


def device_context(x: torch.Tensor):
    """Launches go to x's GPU: a device switch where another is current (a switch costs a few
    microseconds a call; most calls need none)."""
    if x.device.type == "cuda" and x.device.index != torch.cuda.current_device():
        return torch.cuda.device(x.device)
    return _SAME_DEVICE


def optional(tensor: Optional[torch.Tensor], fallback: torch.Tensor) -> torch.Tensor:
    """A small (parameter-sized) tensor made contiguous, or a stand-in pointer for an absent one
    that the kernel's constexpr flag keeps unread. M x D tensors never go through here: the
    kernels take their strides."""
    return fallback if tensor is None else tensor.contiguous()


def padded_rank(rank: int) -> int:
    """The rank tile: the next power of two, at least tl.dot's minimum of 16."""
    return max(MIN_BLOCK_RANK, next_power_of_2(rank))


def dtype_group(dtype: torch.dtype) -> str:
    # fp32 dots without tf32 lower to FMAs, which need far more registers per tile than MMA.
    return "fp32" if dtype == torch.float32 else "half"


# Programs per SM every launch aims for at ViT sizes: with one, a single slow program leaves
# its SM idle at the tail; two keep every SM busy while a wave drains.
PROGRAMS_PER_SM = 2


@functools.lru_cache(maxsize=4096)
def row_variants(config: BlockConfig) -> tuple[BlockConfig, ...]:
    """The config and every smaller block-rows variant plan_block_rows may use (halving to 16),
    with the column tile widened up to config.wide_dim as the rows halve, and fewer warps where
    a thread would otherwise hold fewer than 4 elements of a tile (no 64-bit loads)."""
    variants = [config]
    block_rows, block_dim = config.block_rows, config.block_dim
    while block_rows > MIN_BLOCK_ROWS:
        block_rows //= 2
        if block_dim * 2 <= config.wide_dim:
            block_dim *= 2
        warps = max(1, min(config.num_warps, block_rows * block_dim // (32 * 4)))
        variants.append(BlockConfig(f"{config.name}_rows{block_rows}", block_rows, block_dim, warps,
                                    config.num_stages, config.rank_tile, config.wide_dim))
    return tuple(variants)  # cached: immutable


@functools.lru_cache(maxsize=4096)
def plan_block_rows(config: BlockConfig, rows: int, sms: int) -> BlockConfig:
    """The largest block rows (the config's, halved down to 16) whose row-tile grid gives every
    SM PROGRAMS_PER_SM programs; the smallest when M is too small for that. ViT-B/16 batch 32
    (M = 6304) on 132 SMs: 64 rows would give 99 programs, 16 rows give 394."""
    for variant in row_variants(config):
        if cdiv(rows, variant.block_rows) >= PROGRAMS_PER_SM * sms:
            return variant
    return row_variants(config)[-1]


# Below GPU-filling sizes, the fp32 partials of the weight gradients, written once and read
# once by the reduction, may cost at most this fraction of one M x D pass over x (see plan_chunks).
PARTIALS_BUDGET = 0.05


def plan_chunks(rows: int, dim: int, row_tiles: int, programs_per_chunk: int, sms: int, itemsize: int,
                chunk_elements: int) -> int:
    """How many row chunks a weight-gradient kernel splits M into; each writes one set of fp32
    partials (chunk_elements of them), which the reduction reads back.

    Where M is large enough for the row-tile launches to give every SM PROGRAMS_PER_SM programs
    of MIN_BLOCK_ROWS rows, this one fills the GPU too: enough chunks for PROGRAMS_PER_SM
    programs per SM. Below that, the chunks are capped so that the partials, written and read,
    cost at most PARTIALS_BUDGET of one pass over x: for the bottleneck op at rank 8 and
    M = 1024 a single extra chunk would already cost 6% of it."""
    fill = cdiv(PROGRAMS_PER_SM * sms, programs_per_chunk)
    if rows >= PROGRAMS_PER_SM * sms * MIN_BLOCK_ROWS:
        return max(1, min(row_tiles, fill))
    chunk_bytes = 2 * chunk_elements * 4
    budget = int(PARTIALS_BUDGET * rows * dim * itemsize // chunk_bytes)
    return max(1, min(row_tiles, fill, budget))


@functools.lru_cache(maxsize=4096)
def variant_config(config: BlockConfig, rows: int, sms: int, block_rows: int) -> BlockConfig:
    """A row-tile kernel's configuration: planned from M and the SM count (block_rows 0), or the
    block-rows variant of a kernel variant's block_rows (the config's own rows where fewer)."""
    if not block_rows:
        return plan_block_rows(config, rows, sms)
    return next(v for v in row_variants(config) if v.block_rows <= max(block_rows, MIN_BLOCK_ROWS))


def scale_mode(scale: Optional[torch.Tensor]) -> str:
    """The epilogue's SCALE_MODE: a Python number ("value"), a one-element tensor ("tensor"), or
    a [D] tensor ("channel")."""
    if scale is None:
        return "value"
    return "tensor" if scale.numel() == 1 else "channel"


def packed_grad_dtype(x: torch.Tensor, *params) -> torch.dtype:
    """Packed parameter gradients' dtype: the parameters' own when they share one (so no cast
    pass follows the kernels), else fp32; float64 input (reference path) keeps float64."""
    if x.dtype == torch.float64:
        return torch.float64
    dtypes = {p.dtype for p in params if p is not None}
    return dtypes.pop() if len(dtypes) == 1 and dtypes <= set(KERNEL_DTYPES) else torch.float32


def input_precision(dtype: torch.dtype) -> str:
    # fp32 dots follow torch's switch: tf32 tensor cores only when the user allowed them.
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def int32_columns(tensor: torch.Tensor) -> torch.Tensor:
    """The kernels widen row offsets to int64 but keep column offsets in int32 (registers: every
    element of a tile carries one). A layout whose column offsets pass 2^31 (column-major with
    M * D >= 2^31) is copied to row-major instead of overflowing."""
    if tensor.shape[1] > 0 and abs(tensor.stride(1)) * (tensor.shape[1] - 1) >= 2**31:
        return tensor.contiguous()
    return tensor
