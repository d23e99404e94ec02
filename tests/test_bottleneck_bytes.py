"""Bytes moved, as structural facts: every load and store of the Triton launches, counted in the
interpreter (distinct addresses within a launch: an L2 that holds one launch's working set;
masked lanes excluded), plus the host-side aten ops around them (autograd's included), with the
launches planned for a 132-SM GPU. Against the floor: forward reads x (once, when x is also the
residual) and any other residual term, and writes y; backward reads dy and x and writes dx (the
residual's gradient included). These hold on any machine; timings live in the benchmarks."""

import pytest
import torch

from bench.bytes import measure  # the counting bench/bytes.py prints: fp16, row_scale and channel scale on
from fused_adapters.kernels import bottleneck_adapter, reference
from fused_adapters.kernels.bottleneck import plan
from fused_adapters.kernels.launch import launch_plan

SMS = 132  # H100 SXM
FORWARD_LIMIT = 1.12
# Backward goals: 1.40x the floor up to rank 16, 1.70x at rank 64 (M >= 768, D = 768).
BACKWARD_LIMIT = {8: 1.40, 16: 1.40, 64: 1.70}


@pytest.mark.parametrize("rows, dim, rank", [(768, 768, 16), (768, 1024, 16), (768, 768, 64)])
@pytest.mark.slow
def test_fused_bytes_are_near_the_floor(rows, dim, rank):
    forward_ratio, backward_ratio, forward, backward = measure(bottleneck_adapter, rows, dim, rank, "x", SMS)
    assert forward.triton_launches == 1 and backward.triton_launches == 2
    # At rank 64 and M = 768 the two weight matrices alone are 8% of the forward floor and the
    # saved pre-activation 4% (counted: 1.128x; 1.106x at M = 1024).
    forward_limit = 1.13 if (rows, rank) == (768, 64) else FORWARD_LIMIT
    assert forward_ratio <= forward_limit, forward.summary()
    assert backward_ratio <= BACKWARD_LIMIT[rank], backward.summary()


@pytest.mark.parametrize("residual", ["x", "skip+x"])
@pytest.mark.slow
def test_fused_moves_fewer_bytes_than_eager(residual):
    # Rank 8 (Adapter+), x as the residual (post, pre) or the skip sum (intermediate, houlsby),
    # against eager PyTorch (the reference) at the same shape, its aten ops counted the same way.
    rows, dim, rank = 768, 768, 8
    fused_forward, fused_backward, forward, backward = measure(bottleneck_adapter, rows, dim, rank, residual, SMS)
    assert forward.triton_launches == 1 and backward.triton_launches == 2
    eager_forward, eager_backward, _, _ = measure(reference.bottleneck_adapter, rows, dim, rank, residual, SMS)
    assert fused_forward <= FORWARD_LIMIT
    assert fused_backward <= BACKWARD_LIMIT[rank]
    # Eager (same inputs, same floor): measured 2026-11-30 at 4.5x forward, 5.4x backward.
    assert eager_forward >= 3 * fused_forward
    assert eager_backward >= 2.5 * fused_backward


@pytest.mark.parametrize("rank", [8, 16, 64])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_grids_fill_the_gpu_at_vit_sizes(rank, dtype):
    # ViT-B/16 at batch 32 (M = 6304, D = 768) on 132 SMs: every launch has at least two
    # programs per SM, the weights kernel's chunks included. Plans only: nothing is launched.
    rows, dim = 6304, 768
    x = torch.empty(rows, dim, dtype=dtype)
    w_down, w_up = torch.empty(rank, dim, dtype=dtype), torch.empty(dim, rank, dtype=dtype)
    with launch_plan(SMS):
        forward = plan.forward(x, w_down, None, w_up, None, None, 1.0, None, True, None, "gelu", dtype, dtype,
                               True).launches["forward"]
        backward = plan.backward(x, x, torch.empty(rows, rank, dtype=dtype), w_down, w_up, None, None, 1.0, None,
                                 "gelu", dtype, True, True, torch.float32)
    for launch in (forward, *backward.launches.values()):
        assert launch.programs >= 2 * SMS, (launch.kernel, launch.grid)
    # Block rows come from M: 64-row tiles would give 99 programs here.
    assert forward.constexprs["BLOCK_ROWS"] * 2 * SMS <= rows + forward.constexprs["BLOCK_ROWS"] * 2 * SMS // 2


def test_partials_are_sized_by_rows_below_gpu_filling_sizes():
    # At M = 1024 the weights kernel writes the gradients once (one chunk, no reduction pass);
    # at M = 6304 it takes the chunks that fill the GPU.
    dim, rank = 768, 8

    def chunks(rows):
        x = torch.empty(rows, dim, dtype=torch.float16)
        with launch_plan(SMS):
            partials = plan.backward(
                x, x, torch.empty(rows, rank, dtype=torch.float16), torch.empty(rank, dim), torch.empty(dim, rank),
                None, None, 1.0, None, "gelu", torch.float16, True, True, torch.float32).buffers["partials"]
        return partials.shape[0]

    assert chunks(1024) == 1
    assert chunks(6304) > 1
    assert chunks(6304) * 8 * dim * rank < 0.1 * 6304 * dim * 2  # partials: under 10% of one pass of x
