"""AdapterFusion's tile tables: the scores kernels, keyed by (padded N*r, dtype group of the
compute dtype). plan.py chooses among them."""

import torch

from ..launch import BlockConfig, dtype_group, next_power_of_2

MAX_ADAPTERS = 16
# The scores kernels hold two [rows, N*r] fp32 accumulators and a [D tile, N*r] weight tile of
# each stacked matrix in registers, as the sparse mixture's dense design holds one.
MAX_COLUMNS = 256
MIN_BLOCK = 16


def block_columns(adapters: int, rank: int) -> int:
    return max(MIN_BLOCK, next_power_of_2(adapters * rank))


def block_adapters(adapters: int) -> int:
    return max(MIN_BLOCK, next_power_of_2(adapters))


# Two accumulators of the stacked width where the mixture's forward holds one: the mixture's
# rows halved (its tables are the compile check's largest spill-free tiles).
SCORES_CONFIGS = {
    (16, "half"): BlockConfig("fusion_scores_c16_half", 64, 32, 4, 2),
    (32, "half"): BlockConfig("fusion_scores_c32_half", 32, 32, 4, 2),
    (64, "half"): BlockConfig("fusion_scores_c64_half", 32, 32, 4, 2),
    (128, "half"): BlockConfig("fusion_scores_c128_half", 32, 32, 8, 1),
    (256, "half"): BlockConfig("fusion_scores_c256_half", 16, 32, 8, 1),
    (16, "fp32"): BlockConfig("fusion_scores_c16_fp32", 32, 32, 4, 1),
    (32, "fp32"): BlockConfig("fusion_scores_c32_fp32", 32, 32, 8, 1),
    (64, "fp32"): BlockConfig("fusion_scores_c64_fp32", 16, 32, 8, 1),
    (128, "fp32"): BlockConfig("fusion_scores_c128_fp32", 16, 16, 4, 1),
    (256, "fp32"): BlockConfig("fusion_scores_c256_fp32", 16, 16, 8, 1),
}
SCORES_BACKWARD_CONFIGS = {
    key: BlockConfig(config.name.replace("fusion_scores", "fusion_scores_bwd"), config.block_rows,
                     config.block_dim, config.num_warps, config.num_stages)
    for key, config in SCORES_CONFIGS.items()
}


def block_config(table: dict, adapters: int, rank: int, dtype: torch.dtype) -> BlockConfig:
    return table[(block_columns(adapters, rank), dtype_group(dtype))]
