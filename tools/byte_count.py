"""Bytes moved by a block of code, per Triton launch and per host-side aten op, measured in
Triton's interpreter.

    from fused_adapters.tools.byte_count import count_bytes

    with count_bytes(sm_count=132) as report:   # launches planned as for a 132-SM GPU
        y = bottleneck_adapter(x, w_down, b_down, w_up, b_up)
    print(report.summary())

What is counted:

- Triton launches. Every load and store the interpreter executes is seen: for each one, the
  lanes whose mask is true, times the element size of the pointer's element type (masked-off
  lanes move no memory). Two totals are kept per launch, separately for loads and for stores:
    * all accesses: the sum over every load (store) of its unmasked bytes. A tile that a
      program loads twice, or that every program loads, counts each time. This is the traffic
      seen by the caches closest to the cores.
    * distinct addresses: the number of different addresses the launch loads (stores), times
      the element size. This models an L2 cache that holds one launch's working set, so that
      HBM sees each byte once per launch. It is the number to compare against the bytes a
      launch must move at the least (its inputs once, its outputs once).
  Atomics are not counted.
- Host-side aten ops that run between launches (allocation of outputs aside): the ops the
  dispatcher runs outside any launch, e.g. a `.contiguous()` copy before a launch or the sum
  of partial results after it. These are separate kernels on a GPU and move their operands
  through HBM. An out-of-place op reads each of its tensor arguments and writes its outputs;
  an in-place or out= op writes the tensor it mutates (and an in-place op reads it too,
  except ops that only overwrite it: `copy_(dst, src)` reads src and writes dst). A tensor
  counts numel x element size, except that an expanded (stride-0) tensor counts only the
  elements it spans. Python scalars cost nothing, and so does the tensor a factory such as
  `randn_like` or `new_zeros` takes for its shape only.

What is not counted:

- Views and metadata ops (view, reshape, transpose, expand, slice, detach, ..., and ops that
  take and return no tensor, such as promote_types) and pure allocations (empty, empty_like,
  new_empty, ...): they move no data.
- The interpreter's own host copies of a launch's arguments, made inside the launch: a GPU
  launch reads its operands in place.

Custom ops of the `fused_adapters` namespace are one node to the dispatcher; their Python
implementation is run with the recording still active, so the launches and aten ops inside
them are counted instead of the node.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Callable, Iterator, Optional, Union

import numpy as np
import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from ..kernels.launch import launch_plan
from ..kernels.paths import is_interpreted

__all__ = ["AtenBytes", "ByteReport", "LaunchBytes", "count_bytes", "tensor_bytes"]

CUSTOM_OP_NAMESPACE = "fused_adapters"

# Ops that move no data. Other view ops are recognised by their schema (outputs that alias an
# input without writing it); these names are listed too for clarity and for set_/resize_.
VIEW_OPS = frozenset({
    "view", "_unsafe_view", "reshape", "_reshape_alias", "as_strided", "alias", "detach", "expand", "slice",
    "select", "transpose", "t", "permute", "squeeze", "unsqueeze", "split", "split_with_sizes", "unbind",
    "lift_fresh", "set_", "resize_",
})
ALLOCATION_OPS = frozenset({"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "empty_permuted"})
# Factories that take a tensor argument for its shape, dtype and device only.
SHAPE_ONLY_OPS = frozenset({"new_zeros", "new_ones", "new_full"})
# In-place ops that overwrite the mutated tensor without reading it.
OVERWRITE_OPS = frozenset({
    "copy_", "fill_", "zero_", "normal_", "uniform_", "bernoulli_", "random_", "exponential_", "geometric_",
    "cauchy_", "log_normal_",
})


@dataclasses.dataclass(frozen=True)
class LaunchBytes:
    """One Triton launch: bytes loaded and stored, over all accesses and over distinct addresses."""

    kernel: str
    grid: tuple
    programs: int
    loaded: int
    stored: int
    loaded_distinct: int
    stored_distinct: int


@dataclasses.dataclass(frozen=True)
class AtenBytes:
    """One host-side aten op run outside the launches."""

    op: str
    read: int
    written: int


Event = Union[LaunchBytes, AtenBytes]


@dataclasses.dataclass
class ByteReport:
    """What ran inside a `count_bytes` block, in order."""

    events: list[Event] = dataclasses.field(default_factory=list)

    @property
    def launches(self) -> list[LaunchBytes]:
        return [e for e in self.events if isinstance(e, LaunchBytes)]

    @property
    def aten(self) -> list[AtenBytes]:
        return [e for e in self.events if isinstance(e, AtenBytes)]

    @property
    def triton_launches(self) -> int:
        return len(self.launches)

    def total(self, distinct: bool = True) -> int:
        """Launch bytes (distinct addresses, or all accesses) plus aten bytes."""
        launch_bytes = sum(
            (e.loaded_distinct + e.stored_distinct) if distinct else (e.loaded + e.stored) for e in self.launches
        )
        return launch_bytes + sum(e.read + e.written for e in self.aten)

    def summary(self) -> str:
        header = ("#", "launch / aten op", "grid", "loaded", "stored", "loaded distinct", "stored distinct")
        rows = []
        for index, e in enumerate(self.events):
            if isinstance(e, LaunchBytes):
                rows.append((str(index), e.kernel, "x".join(map(str, e.grid)), f"{e.loaded:,}", f"{e.stored:,}",
                             f"{e.loaded_distinct:,}", f"{e.stored_distinct:,}"))
            else:
                rows.append((str(index), f"aten.{e.op}", "", f"{e.read:,}", f"{e.written:,}",
                             f"{e.read:,}", f"{e.written:,}"))
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

        def line(row) -> str:
            cells = [row[0].rjust(widths[0]), row[1].ljust(widths[1]), row[2].ljust(widths[2])]
            cells += [cell.rjust(width) for cell, width in zip(row[3:], widths[3:])]
            return "  ".join(cells).rstrip()

        lines = [line(header), *map(line, rows)]
        lines.append(f"{self.triton_launches} Triton launches, {len(self.aten)} aten ops; "
                     f"total {self.total(distinct=True):,} bytes (distinct), "
                     f"{self.total(distinct=False):,} bytes (all accesses)")
        return "\n".join(lines)


@contextlib.contextmanager
def count_bytes(sm_count: Optional[int] = None) -> Iterator[ByteReport]:
    """Record the bytes each Triton launch and each host-side aten op moves inside the block.
    sm_count: plan launches as for a GPU with that many SMs (None leaves the plan alone)."""
    if not is_interpreted():
        raise RuntimeError(
            "count_bytes needs Triton's interpreter: set TRITON_INTERPRET=1 before triton is imported"
        )
    from triton.runtime import interpreter

    report = ByteReport()
    recorder = _Recorder(report)
    with contextlib.ExitStack() as stack:
        if sm_count is not None:
            stack.enter_context(launch_plan(sm_count))
        builder_cls = type(interpreter.interpreter_builder)
        stack.enter_context(_patched(builder_cls, "create_masked_load", recorder.wrap_access(
            builder_cls.create_masked_load, stores=False)))
        stack.enter_context(_patched(builder_cls, "create_masked_store", recorder.wrap_access(
            builder_cls.create_masked_store, stores=True)))
        stack.enter_context(_patched(interpreter.GridExecutor, "__call__", recorder.wrap_launch(
            interpreter.GridExecutor.__call__)))
        stack.enter_context(_AtenMode(recorder))
        yield report


# --------------------------------------------------------------------------------------------
# Launches
# --------------------------------------------------------------------------------------------


class _AddressSet:
    """Addresses one launch touches (loads or stores), grouped by element size. Batches are
    merged into a sorted unique array once they outgrow it, so memory stays near the distinct
    count and the total sorting work near n log n, even when tiles are reloaded many times."""

    MIN_PENDING = 1 << 22

    def __init__(self) -> None:
        self.accessed_bytes = 0
        self._unique: dict[int, np.ndarray] = {}
        self._pending: dict[int, list[np.ndarray]] = {}
        self._pending_count: dict[int, int] = {}

    def add(self, addresses: np.ndarray, itemsize: int) -> None:
        self.accessed_bytes += addresses.size * itemsize
        if addresses.size == 0:
            return
        self._pending.setdefault(itemsize, []).append(addresses)
        self._pending_count[itemsize] = self._pending_count.get(itemsize, 0) + addresses.size
        unique_count = self._unique[itemsize].size if itemsize in self._unique else 0
        if self._pending_count[itemsize] > max(self.MIN_PENDING, unique_count):
            self._merge(itemsize)

    def _merge(self, itemsize: int) -> None:
        parts = self._pending.pop(itemsize, [])
        self._pending_count.pop(itemsize, None)
        if itemsize in self._unique:
            parts.append(self._unique[itemsize])
        self._unique[itemsize] = _sorted_unique(np.concatenate(parts))

    def distinct_bytes(self) -> int:
        for itemsize in list(self._pending):
            self._merge(itemsize)
        return sum(addresses.size * itemsize for itemsize, addresses in self._unique.items())


def _sorted_unique(addresses: np.ndarray) -> np.ndarray:
    """np.unique by sorting (numpy 2's np.unique hashes, and is many times slower on 10^7 items)."""
    addresses = np.sort(addresses)
    if addresses.size < 2:
        return addresses
    keep = np.empty(addresses.size, dtype=bool)
    keep[0] = True
    np.not_equal(addresses[1:], addresses[:-1], out=keep[1:])
    return addresses[keep]


@dataclasses.dataclass
class _OpenLaunch:
    kernel: str
    grid: tuple = ()
    loads: _AddressSet = dataclasses.field(default_factory=_AddressSet)
    stores: _AddressSet = dataclasses.field(default_factory=_AddressSet)

    def close(self) -> LaunchBytes:
        return LaunchBytes(
            kernel=self.kernel, grid=self.grid, programs=math.prod(self.grid),
            loaded=self.loads.accessed_bytes, stored=self.stores.accessed_bytes,
            loaded_distinct=self.loads.distinct_bytes(), stored_distinct=self.stores.distinct_bytes(),
        )


def _unmasked_addresses(ptrs, mask) -> np.ndarray:
    """The addresses of the lanes a load or store really touches, as a flat uint64 array."""
    addresses = np.asarray(ptrs.data)
    if mask is None:
        return addresses.astype(np.uint64).reshape(-1)
    lanes = np.broadcast_to(np.asarray(mask.data, dtype=bool), addresses.shape)
    return addresses[lanes].astype(np.uint64).reshape(-1)


def _element_size(ptrs) -> int:
    return max(1, (ptrs.get_element_ty().primitive_bitwidth + 7) // 8)  # int1 is stored as a byte


class _Recorder:
    """Receives the hooks: launch boundaries, loads, stores and aten ops."""

    def __init__(self, report: ByteReport) -> None:
        self.report = report
        self.launch: Optional[_OpenLaunch] = None

    def wrap_access(self, original: Callable, stores: bool) -> Callable:
        """create_masked_load(ptrs, mask, other, ...) or create_masked_store(ptrs, value, mask, ...),
        recording the unmasked lanes once the access has run."""
        mask_position = 1 if stores else 0
        recorder = self

        def access(builder, ptrs, *args, **kwargs):
            result = original(builder, ptrs, *args, **kwargs)
            launch = recorder.launch
            if launch is not None:
                mask = args[mask_position] if len(args) > mask_position else kwargs.get("mask")
                addresses = launch.stores if stores else launch.loads
                addresses.add(_unmasked_addresses(ptrs, mask), _element_size(ptrs))
            return result

        return access

    def wrap_launch(self, original: Callable) -> Callable:
        recorder = self

        def call(executor, *args, **kwargs):
            if recorder.launch is not None:  # a launch inside a launch: count it as part of the outer one
                return original(executor, *args, **kwargs)
            launch = _OpenLaunch(kernel=executor.fn.__name__)
            grid = executor.grid

            def resolved(meta):
                launch.grid = tuple(int(size) for size in grid(meta))
                return launch.grid

            if callable(grid):
                executor.grid = resolved
            else:
                launch.grid = tuple(int(size) for size in grid)
            recorder.launch = launch
            try:
                result = original(executor, *args, **kwargs)
            finally:
                executor.grid = grid
                recorder.launch = None
            recorder.report.events.append(launch.close())
            return result

        return call

    def on_aten(self, op: AtenBytes) -> None:
        self.report.events.append(op)


@contextlib.contextmanager
def _patched(owner: type, name: str, value: Any) -> Iterator[None]:
    """Set owner.name for the block; put back exactly what was there (or nothing) after."""
    missing = object()
    previous = owner.__dict__.get(name, missing)
    setattr(owner, name, value)
    try:
        yield
    finally:
        if previous is missing:
            delattr(owner, name)
        else:
            setattr(owner, name, previous)


# --------------------------------------------------------------------------------------------
# Host-side aten ops
# --------------------------------------------------------------------------------------------


def tensor_bytes(tensor: torch.Tensor) -> int:
    """numel x element size; an expanded (stride-0) tensor counts only the elements it spans."""
    itemsize = tensor.element_size()
    if tensor.numel() == 0:
        return 0
    if tensor.layout != torch.strided:
        return tensor.numel() * itemsize
    spanned = math.prod(size for size, stride in zip(tensor.shape, tensor.stride()) if stride != 0)
    try:
        spanned = min(spanned, tensor.untyped_storage().nbytes() // itemsize)
    except (RuntimeError, NotImplementedError):  # tensors without a storage
        pass
    return spanned * itemsize


def _nested_bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return tensor_bytes(value)
    if isinstance(value, (list, tuple)):
        return sum(_nested_bytes(item) for item in value)
    return 0


def _has_tensor(tree: Any) -> bool:
    return any(isinstance(leaf, torch.Tensor) for leaf in pytree.tree_leaves(tree))


def _bind(func: torch._ops.OpOverload, args: tuple, kwargs: dict) -> list[tuple[Any, Any]]:
    """(schema argument, value) for every argument the call passes."""
    bound = []
    for index, argument in enumerate(func._schema.arguments):
        if not argument.kwarg_only and index < len(args):
            bound.append((argument, args[index]))
        elif argument.name in kwargs:
            bound.append((argument, kwargs[argument.name]))
    return bound


def _moves_no_data(func: torch._ops.OpOverload) -> bool:
    name = func.overloadpacket.__name__
    if name in VIEW_OPS or name in ALLOCATION_OPS:
        return True
    returns = func._schema.returns
    # Every output an alias that is not written: a view op, whatever its name.
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


def _run_counted(func: torch._ops.OpOverload, args: tuple, kwargs: dict) -> tuple[Any, AtenBytes]:
    """Run the op and count what it reads and writes."""
    name = func.overloadpacket.__name__
    reads_data = not (name in SHAPE_ONLY_OPS or name.endswith("_like"))
    read = 0
    mutated = []
    for argument, value in _bind(func, args, kwargs):
        writes = argument.alias_info is not None and argument.alias_info.is_write
        if writes:
            mutated.append(value)
        # out= arguments and overwritten tensors are written, not read.
        if reads_data and (not writes or not (argument.kwarg_only or name in OVERWRITE_OPS)):
            read += _nested_bytes(value)
    out = func(*args, **kwargs)
    returns = func._schema.returns
    outs = out if len(returns) > 1 else (out,)
    written = sum(_nested_bytes(value) for value in mutated)
    written += sum(_nested_bytes(value) for ret, value in zip(returns, outs) if ret.alias_info is None)
    return out, AtenBytes(op=name, read=read, written=written)


def _custom_op_impl(func: torch._ops.OpOverload, args: tuple, kwargs: dict) -> Optional[Callable]:
    """The Python implementation a torch.library.custom_op runs for these arguments' device."""
    from torch._library.custom_ops import OPDEFS

    opdef = OPDEFS.get(func._schema.name)
    if opdef is None:
        return None
    device_type = next(
        (value.device.type for _, value in _bind(func, args, kwargs) if isinstance(value, torch.Tensor)), None
    )
    backends = opdef._backend_fns
    return backends.get(device_type) or backends.get(None) or opdef._init_fn


class _AtenMode(TorchDispatchMode):
    """Records aten ops run outside Triton launches; opens up this package's custom ops."""

    def __init__(self, recorder: _Recorder) -> None:
        super().__init__()
        self.recorder = recorder

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == CUSTOM_OP_NAMESPACE:
            impl = _custom_op_impl(func, args, kwargs)
            if impl is not None:
                with self:  # the implementation's own ops and launches are what a GPU runs
                    return impl(*args, **kwargs)
            return func(*args, **kwargs)  # not a custom_op: its launches are still counted
        if self.recorder.launch is not None or _moves_no_data(func):
            return func(*args, **kwargs)
        out, op = _run_counted(func, args, kwargs)
        if _has_tensor((args, kwargs, out)):  # not a metadata query such as promote_types
            self.recorder.on_aten(op)
        return out
