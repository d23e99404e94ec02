"""Kernel variants: the named launch plans and algorithm choices of each fused op, a way to run
an op with a chosen one, and an opt-in autotune mode.

    from fused_adapters.kernels import list_variants, use_variant, tuned_variants

    list_variants("bottleneck_adapter")        # {"default": "...", "rows16": "...", ...}
    with use_variant("bottleneck_adapter", "rows16"):
        y = bottleneck_adapter(x, ...)         # forward and backward run with that plan
    with use_variant("bottleneck_adapter", "autotune"):
        train(model)                           # each new shape times every variant once (CUDA)
    tuned_variants()                           # what autotune picked, per op, pass and shape

A variant applies to the passes that run while it is in force (a backward run after the block
has exited uses the default), except for the lora_linear op, whose variants are two forms of the
op: its backward follows the form its forward took. The setting is process-wide, like launch_plan, not per thread:
autograd runs CUDA backward passes on its own threads, which must see it too.

Every variant only picks among block configurations and kernel flags that the compile check
covers, so none of them can spill or fail to compile where the default does not.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

__all__ = ["Variant", "AUTOTUNE", "list_variants", "use_variant", "current_variant", "tuned_variants",
           "register_variants", "autotune"]

AUTOTUNE = "autotune"


@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    # Row-tile kernels: block rows per program. 0: planned from M and the SM count (the default);
    # N: the block-rows variant of N rows (the configuration's own rows where those are fewer).
    block_rows: int = 0
    # Backward at ranks up to 32: the first launch also writes act(h) [M, r] for the second to
    # read, instead of the second recomputing it from h (what ranks above 32 always do).
    store_act: bool = False
    # Sparse mixture only: the grouped design (assignments sorted by expert) instead of the
    # dense-masked one.
    grouped: bool = False
    # LoRA linear only: the base GEMM and the low-rank branch in one launch.
    single_launch: bool = False


_REGISTRY: dict[str, dict[str, Variant]] = {}
_ACTIVE: dict[str, list[str]] = {}
# (op, pass, key) -> variant name, filled by autotune.
_TUNED: dict[tuple, str] = {}


def register_variants(op: str, variants: Sequence[Variant]) -> None:
    """Called once by each op's module; the first variant must be the default."""
    if not variants or variants[0].name != "default":
        raise ValueError(f"{op}: the first variant must be named 'default'")
    _REGISTRY[op] = {variant.name: variant for variant in variants}


def _variants(op: str) -> dict[str, Variant]:
    if op not in _REGISTRY:
        raise ValueError(f"op must be one of {sorted(_REGISTRY)}, got {op!r}")
    return _REGISTRY[op]


def list_variants(op: str | None = None) -> dict:
    """{variant name: description} for `op`, or {op: {name: description}} for every op."""
    if op is None:
        return {name: list_variants(name) for name in sorted(_REGISTRY)}
    return {variant.name: variant.description for variant in _variants(op).values()}


@contextlib.contextmanager
def use_variant(op: str, name: str) -> Iterator[None]:
    """Run `op` with variant `name` (one of list_variants(op), or "autotune") inside the block."""
    if name != AUTOTUNE and name not in _variants(op):
        raise ValueError(f"variant of {op} must be one of {sorted(_variants(op)) + [AUTOTUNE]}, got {name!r}")
    _ACTIVE.setdefault(op, []).append(name)
    try:
        yield
    finally:
        _ACTIVE[op].pop()


def autotune(op: str = "bottleneck_adapter"):
    """Shorthand for use_variant(op, "autotune")."""
    return use_variant(op, AUTOTUNE)


def current_variant(op: str) -> str:
    """The variant name in force for `op`: "default", another listed name, or "autotune"."""
    stack = _ACTIVE.get(op)
    return stack[-1] if stack else "default"


def tuned_variants() -> dict:
    """What autotune chose so far: {(op, pass, shape key): variant name}."""
    return dict(_TUNED)


def pick(op: str, pass_name: str, key: Callable[[], tuple], device: torch.device,
         time_variant: Callable[[Variant], float], among: Callable[[Variant], bool] = lambda variant: True) -> Variant:
    """The variant to run for this call. Under autotune, the first call with a new key (built
    by `key()` only then: no per-call host cost otherwise) times every variant that `among`
    accepts with `time_variant` (seconds per run, CUDA only) and keeps the fastest; the
    interpreter and the CPU have nothing to tune and run the default."""
    name = current_variant(op)
    variants = _variants(op)
    if name != AUTOTUNE:
        return variants[name]
    if device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return variants["default"]
    tuned_key = (op, pass_name, key())
    if tuned_key not in _TUNED:
        timings = {variant.name: time_variant(variant) for variant in variants.values() if among(variant)}
        _TUNED[tuned_key] = min(timings, key=timings.get)
    return variants[_TUNED[tuned_key]]


def time_cuda(run: Callable[[], None], repeats: int = 10) -> float:
    """Median seconds of `run` on the current CUDA stream, after one warm-up call (which also
    compiles the kernels)."""
    run()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return sorted(times)[len(times) // 2]
