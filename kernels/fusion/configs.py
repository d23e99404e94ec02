"""AdapterFusion's tile tables: the scores kernels, keyed by (padded N*r, dtype group of the
compute dtype). plan.py chooses among them."""

import torch

from ..launch import BlockConfig, dtype_group, padded_rank
from ..sparse.configs import MAX_DENSE_COLUMNS

MAX_ADAPTERS = 16
# The mixing runs the sparse mixture's dense design, which holds the N r stacked columns in
# registers: the kernels take N r up to its limit.
MAX_COLUMNS = MAX_DENSE_COLUMNS
# The forward sweeps x once per CHUNK_COLUMNS stacked columns (jit.py: two [rows, N r] fp32
# accumulators spilled at N r = 256 at every tile tried).
CHUNK_COLUMNS = 64
# With dropout, half of it: the Philox mask of a 64-column chunk, drawn after the sweep while
# both accumulators are live, spilled 8-24 bytes at c128_half under fp16 autocast on sm_90.
DROPOUT_CHUNK_COLUMNS = 32


def block_columns(adapters: int, rank: int) -> int:
    """The stacked-column tile: N r padded to a power of two, at least tl.dot's 16."""
    return padded_rank(adapters * rank)


def block_adapters(adapters: int) -> int:
    """The adapter tile: N padded the same way."""
    return padded_rank(adapters)


# The scores kernels' tiles, keyed by (padded N*r, dtype group of the compute dtype): the largest
# tiles the compile check found with 0 spill bytes on sm_80 and sm_90, aligned and unaligned, for
# the configuration and every smaller block-rows variant (python -m fused_adapters.tools.compile_check
# --kernel fusion_scores fusion_scores_backward; bench/results/2026-12-07-compile-check-fusion-sm80-sm90-no-gpu.txt).
# The forward holds at most CHUNK_COLUMNS stacked columns at a time, so its wider keys take the
# 64-column tiles; at 32 rows the 16-row variant (4 warps at a 32-column D tile) spilled under
# autocast, hence the 16-column D tile there.
SCORES_CONFIGS = {
    (16, "half"): BlockConfig("fusion_scores_c16_half", 64, 32, 4, 2),
    (32, "half"): BlockConfig("fusion_scores_c32_half", 32, 32, 4, 2),
    (64, "half"): BlockConfig("fusion_scores_c64_half", 32, 16, 4, 2),
    (128, "half"): BlockConfig("fusion_scores_c128_half", 32, 32, 4, 1),
    (256, "half"): BlockConfig("fusion_scores_c256_half", 32, 16, 4, 1),
    (16, "fp32"): BlockConfig("fusion_scores_c16_fp32", 32, 32, 4, 1),
    (32, "fp32"): BlockConfig("fusion_scores_c32_fp32", 32, 32, 8, 1),
    (64, "fp32"): BlockConfig("fusion_scores_c64_fp32", 16, 32, 8, 1),
    (128, "fp32"): BlockConfig("fusion_scores_c128_fp32", 16, 16, 4, 1),
    (256, "fp32"): BlockConfig("fusion_scores_c256_fp32", 16, 32, 8, 1),
}
# The backward's own tiles, chosen the same way: its adapter spread is a K = 16 dot, so it fits
# where the forward does not, but at 32 rows the 16-row variant spilled at c128_half (sm_90, autocast).
SCORES_BACKWARD_CONFIGS = {
    (16, "half"): BlockConfig("fusion_scores_bwd_c16_half", 64, 32, 4, 2),
    (32, "half"): BlockConfig("fusion_scores_bwd_c32_half", 32, 32, 4, 2),
    (64, "half"): BlockConfig("fusion_scores_bwd_c64_half", 32, 32, 4, 2),
    (128, "half"): BlockConfig("fusion_scores_bwd_c128_half", 16, 32, 8, 1),
    (256, "half"): BlockConfig("fusion_scores_bwd_c256_half", 16, 16, 8, 1),
    (16, "fp32"): BlockConfig("fusion_scores_bwd_c16_fp32", 32, 32, 4, 1),
    (32, "fp32"): BlockConfig("fusion_scores_bwd_c32_fp32", 32, 32, 8, 1),
    (64, "fp32"): BlockConfig("fusion_scores_bwd_c64_fp32", 16, 32, 8, 1),
    (128, "fp32"): BlockConfig("fusion_scores_bwd_c128_fp32", 16, 32, 8, 1),
    (256, "fp32"): BlockConfig("fusion_scores_bwd_c256_fp32", 16, 16, 8, 1),
}


def block_config(table: dict, adapters: int, rank: int, dtype: torch.dtype) -> BlockConfig:
    return table[(block_columns(adapters, rank), dtype_group(dtype))]
