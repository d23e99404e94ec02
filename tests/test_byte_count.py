"""The byte counter itself, on toy kernels whose traffic is known exactly."""

import pytest
import torch
import triton
import triton.language as tl

from fused_adapters.kernels import launch, paths
from fused_adapters.tools.byte_count import AtenBytes, LaunchBytes, count_bytes, tensor_bytes

pytestmark = pytest.mark.skipif(not paths.is_interpreted(), reason="counts bytes in Triton's interpreter")


@triton.jit
def _copy_kernel(src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    tl.store(dst_ptr + offsets, tl.load(src_ptr + offsets, mask=mask), mask=mask)


@triton.jit
def _load_twice_kernel(src_ptr, dst_ptr, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    first = tl.load(src_ptr + offsets)
    second = tl.load(src_ptr + offsets)
    tl.store(dst_ptr + offsets, first + second)


@triton.jit
def _scalar_kernel(scale_ptr, dst_ptr, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    tl.store(dst_ptr + offsets, tl.full((BLOCK,), 1.0, tl.float32) * tl.load(scale_ptr))


def copy(src: torch.Tensor, block: int = 64) -> torch.Tensor:
    dst = torch.empty_like(src)
    _copy_kernel[(triton.cdiv(src.numel(), block),)](src, dst, src.numel(), BLOCK=block)
    return dst


# A custom op of the package's namespace, defined here only: the counter must open up any of them.
@torch.library.custom_op("fused_adapters::byte_count_test_scaled_copy", mutates_args=())
def scaled_copy(x: torch.Tensor) -> torch.Tensor:
    raise AssertionError("the CPU kernel registered below runs instead")


@scaled_copy.register_kernel("cpu")
def _scaled_copy_cpu(x: torch.Tensor) -> torch.Tensor:
    return copy(x * 2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_masked_copy_counts_only_unmasked_lanes(dtype):
    n = 1000  # not a multiple of the block: the last program masks 24 lanes off
    src = torch.randn(n).to(dtype)
    with count_bytes() as report:
        dst = copy(src)
    assert torch.equal(dst, src)
    (only,) = report.launches
    nbytes = n * src.element_size()
    assert only == LaunchBytes("_copy_kernel", (16,), 16, nbytes, nbytes, nbytes, nbytes)
    assert report.aten == []  # empty_like is an allocation, not traffic
    assert report.total(distinct=True) == report.total(distinct=False) == 2 * nbytes


@pytest.mark.parametrize("programs", [1, 3])
def test_reloaded_tile_counts_each_time_over_all_accesses_once_distinct(programs):
    # One program loading a tile twice, or several programs each loading the same tile twice.
    src = torch.randn(32)
    dst = torch.empty(32)
    with count_bytes() as report:
        _load_twice_kernel[(programs,)](src, dst, BLOCK=32)
    (only,) = report.launches
    assert (only.programs, only.loaded, only.loaded_distinct) == (programs, 2 * programs * 128, 128)
    assert (only.stored, only.stored_distinct) == (programs * 128, 128)
    assert report.total(distinct=False) - report.total(distinct=True) == (3 * programs - 2) * 128


def test_scalar_load():
    scale = torch.tensor([2.5])
    dst = torch.empty(16)
    with count_bytes() as report:
        _scalar_kernel[(1,)](scale, dst, BLOCK=16)
    assert torch.all(dst == 2.5)
    (only,) = report.launches
    assert (only.loaded, only.loaded_distinct, only.stored) == (4, 4, 64)


def test_aten_ops_between_launches():
    a, b = torch.randn(1000), torch.randn(1000)
    with count_bytes() as report:
        c = a + b
        c.view(10, 100).t().unsqueeze(0).expand(3, 100, 10)  # views: no traffic
        c.reshape(100, 10)[2:, 1]
        torch.promote_types(torch.float16, torch.float32)  # metadata: no tensor at all
        c.mul_(2.0)  # in place: reads and writes c
        d = torch.empty(1000)
        d.copy_(c)  # reads the source, writes the destination
        e = copy(d)
        f = e.sum()
    assert torch.allclose(f, 2 * (a + b).sum())
    assert report.aten == [
        AtenBytes("add", 8000, 4000),
        AtenBytes("mul_", 4000, 4000),
        AtenBytes("copy_", 4000, 4000),
        AtenBytes("sum", 4000, 4),
    ]
    assert [type(e).__name__ for e in report.events] == ["AtenBytes"] * 3 + ["LaunchBytes", "AtenBytes"]
    assert report.total() == 12000 + 8000 + 8000 + 8000 + 4004


def test_out_and_expanded_arguments():
    a = torch.randn(1000)
    row = torch.randn(1, 1000).expand(8, 1000)  # 1000 distinct elements
    out = torch.empty(8, 1000)
    with count_bytes() as report:
        torch.add(row, a, out=out)
        noise = torch.randn_like(out)  # reads only the shape of its argument
    assert report.aten == [AtenBytes("add", 8000, 32000), AtenBytes("randn_like", 0, 32000)]
    assert noise.shape == out.shape
    assert tensor_bytes(torch.zeros(()).expand(5, 7)) == 4


def test_custom_ops_of_the_package_are_opened_up():
    x = torch.randn(100)
    with count_bytes() as report:
        y = scaled_copy(x)
    assert torch.equal(y, x * 2)
    assert [e.op if isinstance(e, AtenBytes) else e.kernel for e in report.events] == ["mul", "_copy_kernel"]
    assert report.total() == 800 + 800


def test_works_alongside_the_launch_counter(monkeypatch):
    from helpers import LaunchCounter

    counter = LaunchCounter()
    with counter.patch(monkeypatch), count_bytes() as report:
        copy(torch.randn(100))
    assert counter.names == ["_copy_kernel"]
    assert [e.kernel for e in report.launches] == ["_copy_kernel"]


def test_needs_the_interpreter(monkeypatch):
    from fused_adapters.tools import byte_count

    monkeypatch.setattr(byte_count, "is_interpreted", lambda: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        with count_bytes():
            pass


def test_launches_in_order_with_grid_and_programs():
    x = torch.randn(300)
    with count_bytes() as report:
        copy(x, block=128)
        _copy_kernel[lambda meta: (triton.cdiv(300, meta["BLOCK"]),)](x, torch.empty(300), 300, BLOCK=32)
    assert [(e.kernel, e.grid, e.programs) for e in report.launches] == [
        ("_copy_kernel", (3,), 3), ("_copy_kernel", (10,), 10),
    ]
    assert report.triton_launches == 2
    assert "_copy_kernel" in report.summary()


def test_sm_count_plans_launches_inside_the_block_only():
    cpu = torch.device("cpu")
    before = launch.sm_count(cpu)
    with count_bytes(sm_count=132):
        assert launch.sm_count(cpu) == 132
    assert launch.sm_count(cpu) == before
    with count_bytes():
        assert launch.sm_count(cpu) == before


def test_patches_are_restored_even_on_exceptions():
    from triton.runtime import interpreter

    builder_cls = type(interpreter.interpreter_builder)
    originals = (builder_cls.create_masked_load, builder_cls.create_masked_store, interpreter.GridExecutor.__call__)
    with pytest.raises(ValueError, match="boom"):
        with count_bytes():
            copy(torch.randn(10))
            raise ValueError("boom")
    assert (builder_cls.create_masked_load, builder_cls.create_masked_store,
            interpreter.GridExecutor.__call__) == originals
    with count_bytes() as report:
        pass
    assert report.events == []


def test_bottleneck_adapter_smoke():
    try:
        from fused_adapters.kernels import bottleneck_adapter
    except Exception as error:  # the op may be mid-rewrite
        pytest.skip(f"bottleneck_adapter does not import: {error!r}")
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 48, generator=generator)
    w_down = torch.randn(8, 48, generator=generator) * 48 ** -0.5
    w_up = torch.randn(48, 8, generator=generator) * 8 ** -0.5
    b_down, b_up = torch.randn(8, generator=generator), torch.randn(48, generator=generator)
    with count_bytes(sm_count=132) as report:
        y = bottleneck_adapter(x, w_down, b_down, w_up, b_up, residual=None)
    assert report.triton_launches >= 1
    assert sum(e.loaded_distinct for e in report.launches) >= tensor_bytes(x)
    assert sum(e.stored_distinct for e in report.launches) >= tensor_bytes(y)


def test_zero_dim_pointers_and_masks():
    import numpy as np
    from triton.runtime.interpreter import TensorHandle

    from fused_adapters.tools.byte_count import _unmasked_addresses

    pointer = TensorHandle(np.array(4096, dtype=np.uint64), tl.pointer_type(tl.float32))
    assert _unmasked_addresses(pointer, TensorHandle(np.array(True), tl.int1)).tolist() == [4096]
    assert _unmasked_addresses(pointer, TensorHandle(np.array(False), tl.int1)).tolist() == []
    assert _unmasked_addresses(pointer, None).tolist() == [4096]
