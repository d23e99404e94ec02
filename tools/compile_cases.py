"""The compile check's cases: for each kernel, the launches the package would make, built by the
ops' own plans (kernels/<op>/plan.py) from representative inputs with every optional input
present, at every tile of the kernel's table. tools/compile_check.py compiles them.

Two shape scenarios:
  aligned    ViT-like: D, rank, rows and strides multiples of 16, aligned pointers.
  unaligned  odd D, rank and rows, misaligned x (sparse and fusion: an odd rank with E*r or N*r
             in the same padded block; grouped: an odd rank in the same padded block).
"""

from __future__ import annotations

import torch

ARCHS = (80, 90)
# "tf32" is float32 with torch.backends.cuda.matmul.allow_tf32 on: the same configs, MMA dots.
# "autocast_bf16" / "autocast_fp16": fp32 x, residual, parameters and output (a model trained
# under torch.autocast), dots in bf16 / fp16: the loads convert in registers.
DTYPES = ("bfloat16", "float16", "float32", "tf32", "autocast_bf16", "autocast_fp16")


def _dtypes(name: str) -> tuple[torch.dtype, torch.dtype]:
    """(storage dtype of x, residual, parameters and y; compute dtype of the dots)."""
    if name == "tf32":
        return torch.float32, torch.float32
    if name.startswith("autocast_"):
        return torch.float32, {"bf16": torch.bfloat16, "fp16": torch.float16}[name.split("_")[1]]
    return getattr(torch, name), getattr(torch, name)


SCENARIOS = ("aligned", "unaligned")
BOTTLENECK_KERNELS = ("forward", "backward_hidden", "backward_weights")
# The bottleneck kernels where a width-changing bottleneck (D_out != D: LoRA on qkv, fc1, fc2)
# compiles another specialization (SAME_WIDTH off): compiled with D_out = 3 D, the qkv shape;
# the weights launch has its own table. (The backward-hidden kernel only walks D_out.)
WIDE_KERNELS = ("forward_wide", "backward_weights_wide")
# The bottleneck kernels with x, the residual, y, dy and dx column-major ([M, D] with row stride
# 1): a bottleneck over the token axis of a token-major tensor (LoSA's token mixers), where the
# kernels' rows are contiguous in memory instead of their columns.
LAYOUT_KERNELS = ("forward_column_major", "backward_hidden_column_major", "backward_weights_column_major")
SPARSE_KERNELS = ("sparse_forward", "sparse_backward_input", "sparse_backward_weights")
# The sparse dense-design kernels where a width-changing mixture (w_up [E, D_out, r], D_out != D:
# per-task LoRA on qkv, fc1, fc2) compiles another specialization (SAME_WIDTH off): compiled with
# D_out = SPARSE_WIDE_FACTOR x D, the qkv shape, x no residual term (the op adds x only where
# D_out = D); the backward kernels from their wide tables. The unaligned scenario adds the narrow
# form ("+narrow", fc2's shape): D_out = D // 4, a multiple of 16 while D is odd, another
# specialization (aligned, both widths are multiples of 16 and it compiles as the wide one).
SPARSE_WIDE_KERNELS = ("sparse_forward_wide", "sparse_backward_input_wide", "sparse_backward_weights_wide")
SPARSE_WIDE_FACTOR = 3
GROUPED_KERNELS = ("grouped_gate", "grouped_forward", "grouped_combine", "grouped_backward_input",
                   "grouped_backward_combine", "grouped_backward_weights")
# The grouped kernels with both widths, specialized for a width-changing mixture as the dense ones
# are (SPARSE_WIDE_KERNELS: D_out = SPARSE_WIDE_FACTOR x D, x no residual term), from their wide
# tables where they have one. The gate reads x only and the combines walk one width: no such form.
GROUPED_WIDE_KERNELS = ("grouped_forward_wide", "grouped_backward_input_wide", "grouped_backward_weights_wide")
# The LoRA linear's single-launch form (kernels/lora/): one GEMM kernel with a rank-r side
# product, as the forward (D_in -> D_out) and as the backward's input launch (D_out -> D_in),
# both at every tile of its tables (the aligned tiles in the aligned scenario, the unaligned ones
# in the other), at padded ranks up to 64 and with tensor-core dots (no "float32": without tf32
# the form is not used); and its weights launch, the bottleneck weights kernel without dx
# (identity activation, no biases, a float scale) from both its tables: the wide one at the qkv
# shape (D_out = 3 D) and the same-width one (D_out = D, LoRA on proj). The aligned scenario
# compiles each at the padded rank and, as the "+half_rank" configs, at half of it (rank 8 pads
# to 16 but is no multiple of 16, so B's strides specialize differently).
LORA_KERNELS = ("lora_forward", "lora_backward_input", "lora_backward_weights")
# AdapterFusion's scores kernels (kernels/fusion/): row-tile kernels keyed, as the sparse dense
# kernels are, by the padded N*r (one (adapters, rank) per key: SPARSE_SHAPES, an odd rank with N*r
# in the same padded block in the unaligned scenario) and compiled at every block-rows variant.
FUSION_KERNELS = ("fusion_scores", "fusion_scores_backward")
# The grouped design's kernels without a rank axis: their tables are keyed by the dtype group alone
# (config_tables lists them under padded rank 0), and their dots, where they have any, are the
# fp32 gate's ieee dots (no MMA expected).
GROUPED_RANKLESS_KERNELS = ("grouped_gate", "grouped_combine", "grouped_backward_combine")
# The kernels with dropout inside (kernels/dropout.py), compiled as "<kernel>_dropout": the same
# launch with dropout on as the package uses it, at the same configurations: the adapter's
# hidden dropout in the same-width kernels, the LoRA branch's input dropout in the _wide ones and
# the LoRA linear's single launch, each expert's hidden dropout in the mixture's same-width
# kernels and the multi-LoRA batch's input dropout in their _wide ones (the grouped design's too,
# but for the gate and the combines, which read no hidden and no x for a projection), each fused
# adapter's hidden dropout in the fusion's kernels.
DROPOUT_SUFFIX = "_dropout"
DROPOUT_KERNELS = tuple(kernel + DROPOUT_SUFFIX for kernel in BOTTLENECK_KERNELS + WIDE_KERNELS + LORA_KERNELS +
                        SPARSE_KERNELS + SPARSE_WIDE_KERNELS + GROUPED_KERNELS + GROUPED_WIDE_KERNELS +
                        FUSION_KERNELS if kernel not in GROUPED_RANKLESS_KERNELS)
KERNELS = BOTTLENECK_KERNELS + WIDE_KERNELS + LAYOUT_KERNELS + SPARSE_KERNELS + SPARSE_WIDE_KERNELS + \
    GROUPED_KERNELS + GROUPED_WIDE_KERNELS + LORA_KERNELS + FUSION_KERNELS + DROPOUT_KERNELS
# The sparse kernels' configurations are keyed by the padded E*r: one (experts, rank) per key.
# The unaligned scenario keeps the experts and takes an odd rank whose E*r pads to the same block.
SPARSE_SHAPES = {16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}
SPARSE_TOP_K = 2
# The grouped kernels whose k = 1 form is a different kernel (the "+k1" configs).
GROUPED_K1_KERNELS = ("grouped_forward", "grouped_backward_input")
GROUPED_EXPERTS = 8
# The gate's block rows are planned from M as for an H100's SM count.
GROUPED_PLAN_SMS = 132


def _scenario_shapes(block_rank: int, scenario: str):
    """(rows, dim, rank, misaligned_x) for a scenario, with the rank landing in block_rank."""
    if scenario == "aligned":
        return 3152, 768, block_rank, False  # 16 x 197 tokens, ViT-B width
    return 3151, 771, max(1, block_rank // 2 + 1), True


def _sparse_shape(block_columns: int, scenario: str) -> tuple[int, int]:
    """(experts, rank) of the sparse case whose E*r pads to block_columns in this scenario."""
    experts, rank = SPARSE_SHAPES[block_columns]
    return (experts, rank) if scenario == "aligned" else (experts, rank - 1)


class _Inputs:
    """Representative tensors (never read: no data is allocated beyond torch.empty's) of one
    storage dtype, row-major or column-major, with x misaligned by one element where asked."""

    def __init__(self, dtype, column_major=False):
        self.dtype, self.column_major = dtype, column_major

    def tensor(self, *shape, dt=None):
        return torch.empty(*shape, dtype=dt or self.dtype)

    def matrix(self, rows, cols, offset=False, dt=None):
        """[rows, cols], row-major or (column_major) column-major, one element off alignment."""
        dt = dt or self.dtype
        if self.column_major:
            flat = torch.empty(rows * cols + 1, dtype=dt)[1:] if offset else torch.empty(rows * cols, dtype=dt)
            return flat.view(cols, rows).t()
        return torch.empty(rows * cols + 1, dtype=dt)[1:].view(rows, cols) if offset else torch.empty(rows, cols,
                                                                                                      dtype=dt)


def build_launches(kernel: str, block_rank: int, dtype_name: str, scenario: str, variant=None,
                   store_act: bool = False, routed: bool = False, single: bool = False):
    """The Launch the package makes for this case, from the op's plan, with every optional input
    present (the heaviest variant of each kernel: all biases, channel scale, x and another tensor
    as residual terms, row_scale, gelu), at the tile `variant` (default: the plan's), and for the
    backward with act(h) stored at every rank when store_act (the store_act op variant).

    For the sparse kernels block_rank is the padded E*r (their tables' key) and the heaviest
    variant is the gated form with b_gate, the logits returned and, in the backward, their own
    gradient; routed: the sparse forward's routed form instead (expert_idx and expert_weight).
    The `_wide` sparse kernels are the same launches at D_out = SPARSE_WIDE_FACTOR x D, with
    another tensor as the whole residual (x is none: it needs D_out = D); single: the narrow form
    instead, D_out = D // 4.

    For the grouped kernels block_rank is the padded rank (0 for the gate and the combines, whose
    tables have no rank axis); the heaviest variant is the gated form with top-2, b_gate and the
    logits stored (and their own gradient in the backward); single: the k = 1 form instead (the
    routed form with top-1: grouped_forward writes y, grouped_backward_input writes dx). The
    `_wide` grouped kernels are the same launches at D_out = SPARSE_WIDE_FACTOR x D.

    For the LoRA kernels single is the half-rank form (rank block_rank / 2).

    For the fusion kernels block_rank is the padded N*r and the heaviest variant has b_down
    (and gelu); they have no other form.

    A `_dropout` kernel is its base kernel's launch with dropout on (DROPOUT_KERNELS)."""
    dropout = kernel.endswith(DROPOUT_SUFFIX)
    kernel = kernel.removesuffix(DROPOUT_SUFFIX)
    if dropout and kernel + DROPOUT_SUFFIX not in DROPOUT_KERNELS:
        raise ValueError(f"{kernel}: no dropout case is compiled for it")
    rates = dict(dropout=0.1, seed=torch.empty((), dtype=torch.int64)) if dropout else {}
    if kernel in GROUPED_KERNELS + GROUPED_WIDE_KERNELS:
        if routed or store_act:
            raise ValueError(f"{kernel}: the grouped kernels have no routed or store_act case (see single)")
        return _grouped_launch(kernel, block_rank, dtype_name, scenario, single, variant,
                               **_mixture_rates(rates, kernel in GROUPED_WIDE_KERNELS))
    if kernel in LORA_KERNELS:
        if store_act or routed:
            raise ValueError(f"{kernel}: the LoRA linear's kernels have no store_act or routed case")
        return _lora_launch(kernel, block_rank, dtype_name, scenario, variant, half_rank=single, **rates)
    if kernel in FUSION_KERNELS:
        if store_act or routed or single:
            raise ValueError(f"{kernel}: the fusion kernels have no store_act, routed or k = 1 case")
        return _fusion_launch(kernel, block_rank, dtype_name, scenario, variant, **rates)
    if kernel in SPARSE_WIDE_KERNELS:
        return _sparse_launch(kernel, block_rank, dtype_name, scenario, store_act, routed, variant, narrow=single,
                              **_mixture_rates(rates, True))
    if single:
        raise ValueError(f"{kernel}: the k = 1 form is compiled for the grouped kernels only (and, as half_rank, "
                         f"for the LoRA kernels; as narrow, for the sparse _wide kernels)")
    if kernel in SPARSE_KERNELS:
        return _sparse_launch(kernel, block_rank, dtype_name, scenario, store_act, routed, variant,
                              **_mixture_rates(rates, False))
    if routed:
        raise ValueError(f"{kernel}: only sparse_forward has a routed form")
    from ..kernels.bottleneck import configs, plan

    rows, dim, rank, misaligned = _scenario_shapes(block_rank, scenario)
    dtype, compute = _dtypes(dtype_name)
    wide = kernel in WIDE_KERNELS
    role = kernel.removesuffix("_wide").removesuffix("_column_major")
    dim_out = 3 * dim if wide else dim
    inputs = _Inputs(dtype, column_major=kernel in LAYOUT_KERNELS)
    x = inputs.matrix(rows, dim, offset=misaligned)
    w_down, w_up = inputs.tensor(rank, dim), inputs.tensor(dim_out, rank)
    b_down, b_up, scale = inputs.tensor(rank), inputs.tensor(dim_out), inputs.tensor(dim_out)
    residual, row_scale = inputs.matrix(rows, dim_out), inputs.tensor(rows, dt=torch.float32)
    hidden = inputs.tensor(rows, rank, dt=compute)
    op_variant = next(v for v in configs.VARIANTS if v.store_act) if store_act else configs.DEFAULT_VARIANT
    rates = dict(dropout=0.0 if wide else 0.1, input_dropout=0.1 if wide else 0.0,
                 seed=torch.empty((), dtype=torch.int64)) if dropout else {}
    if role == "forward":  # x is a residual term only where D_out = D
        return plan.forward(x, w_down, b_down, w_up, b_up, scale, 1.0, residual, not wide, row_scale, "gelu",
                            compute, dtype, True, op_variant, tile=variant, **rates).launches["forward"]
    # The gradients stored in the parameters' dtype (fp32 for autocast_*) where there is one chunk.
    launches = plan.backward(inputs.matrix(rows, dim_out), x, hidden, w_down, w_up, b_up, scale, 1.0, row_scale,
                             "gelu", compute, not wide, True, dtype, op_variant, tiles={role: variant},
                             **rates).launches
    return launches[role]


def _lora_launch(kernel: str, block_rank: int, dtype_name: str, scenario: str, variant, half_rank: bool = False,
                 **rates):
    """The single-launch LoRA linear's launches at the qkv shape (D -> 3 D), with a bias; variant:
    one of its GEMM tiles, or for the weights launch one of the bottleneck weights tiles, the
    same-width table's compiled at D_out = D. half_rank: rank block_rank / 2."""
    from ..kernels.bottleneck import configs as bottleneck_configs
    from ..kernels.lora import plan

    rows, dim, rank, misaligned = _scenario_shapes(block_rank, scenario)
    if half_rank:
        rank = block_rank // 2
    dtype, compute = _dtypes(dtype_name)
    same_width = kernel == "lora_backward_weights" and variant is not None and \
        variant in bottleneck_configs.BACKWARD_WEIGHTS_CONFIGS.values()
    dim_out = dim if same_width else 3 * dim
    inputs = _Inputs(dtype)
    x = inputs.matrix(rows, dim, offset=misaligned)
    weight, bias = inputs.tensor(dim_out, dim), inputs.tensor(dim_out)
    lora_a, lora_b = inputs.tensor(rank, dim), inputs.tensor(dim_out, rank)
    if kernel == "lora_forward":
        return plan.forward(x, weight, bias, lora_a, lora_b, 0.5, compute, True, tile=variant,
                            **rates).launches["forward"]
    grad_y = inputs.matrix(rows, dim_out, offset=misaligned, dt=compute)
    role = kernel.removeprefix("lora_")
    return plan.backward(grad_y, x, inputs.tensor(rows, rank, dt=compute), weight, lora_a, lora_b, 0.5, compute,
                         True, dtype, tiles={role: variant}, **rates).launches[role]


def _mixture_rates(rates: dict, wide: bool) -> dict:
    """A mixture case's dropout: the experts' hidden dropout at the same width, the input dropout
    of a multi-LoRA batch where the width changes."""
    if not rates:
        return {}
    return dict(dropout=0.0 if wide else rates["dropout"], input_dropout=rates["dropout"] if wide else 0.0,
                seed=rates["seed"])


def _sparse_launch(kernel: str, block_columns: int, dtype_name: str, scenario: str, store_act: bool,
                   routed: bool, variant=None, narrow: bool = False, **rates):
    from ..kernels.sparse import configs, plan

    wide = kernel in SPARSE_WIDE_KERNELS
    role = kernel.removesuffix("_wide")
    if routed and role != "sparse_forward":
        raise ValueError(f"{kernel}: the routed form is compiled for the sparse forward only")
    rows, dim, _, misaligned = _scenario_shapes(16, scenario)
    dim_out = (dim // 4 if narrow else SPARSE_WIDE_FACTOR * dim) if wide else dim
    experts, rank = _sparse_shape(block_columns, scenario)
    if configs.block_columns(experts, rank) != block_columns:
        raise ValueError(f"E = {experts}, r = {rank} does not pad to {block_columns} columns")
    dtype, compute = _dtypes(dtype_name)
    inputs = _Inputs(dtype)
    x = inputs.matrix(rows, dim, offset=misaligned)
    # The gate is fp32 whatever the experts' dtype (its logits are fp32 ieee dots).
    w_gate, b_gate = inputs.tensor(experts, dim, dt=torch.float32), inputs.tensor(experts, dt=torch.float32)
    w_down, w_up = inputs.tensor(experts, rank, dim), inputs.tensor(experts, dim_out, rank)
    b_down, b_up, scale = inputs.tensor(experts, rank), inputs.tensor(experts, dim_out), inputs.tensor(dim_out)
    residual, row_scale = inputs.tensor(rows, dim_out), inputs.tensor(rows, dt=torch.float32)
    if role == "sparse_forward":  # x is a residual term only where D_out = D
        expert_idx = inputs.tensor(rows, SPARSE_TOP_K, dt=torch.int64) if routed else None
        expert_weight = inputs.tensor(rows, SPARSE_TOP_K) if routed else None
        return plan.forward(
            x, None if routed else w_gate, None if routed else b_gate, expert_idx, expert_weight, w_down, b_down,
            w_up, b_up, scale, 1.0, residual, not wide, row_scale, SPARSE_TOP_K, "gelu", compute, dtype, True,
            not routed, tile=variant, **rates).launches[role]
    op_variant = next(v for v in configs.VARIANTS if v.store_act) if store_act else configs.DEFAULT_VARIANT
    # The gradients stored in the parameters' dtype (fp32 for autocast_*) where there is one chunk.
    return plan.backward(
        inputs.tensor(rows, dim_out), inputs.tensor(rows, experts, dt=torch.float32), x,
        inputs.tensor(rows, experts * rank, dt=compute), inputs.tensor(rows, experts, dt=torch.float32), w_gate,
        w_down, w_up, b_up, scale, 1.0, row_scale, "gelu", compute, not wide, True, dtype, op_variant,
        tiles={role: variant}, **rates).launches[role]


def _fusion_launch(kernel: str, block_columns: int, dtype_name: str, scenario: str, variant=None, **rates):
    """AdapterFusion's scores launches, as adapter_fusion makes them: the adapters' w_down and
    b_down, and the folded query weights and biases (fold_weights folds in the weights' dtype), in
    x's storage dtype; p and dp fp32; the backward's rank-space gradient in x's storage dtype (the
    GEMMs' dtype)."""
    from ..kernels.fusion import configs, plan

    rows, dim, _, misaligned = _scenario_shapes(16, scenario)
    adapters, rank = _sparse_shape(block_columns, scenario)
    if configs.block_columns(adapters, rank) != block_columns:
        raise ValueError(f"N = {adapters}, r = {rank} does not pad to {block_columns} columns")
    dtype, compute = _dtypes(dtype_name)
    inputs = _Inputs(dtype)
    fp32 = torch.float32
    x = inputs.matrix(rows, dim, offset=misaligned)
    w_down, b_down = inputs.tensor(adapters, rank, dim), inputs.tensor(adapters, rank)
    w_query_hidden, b_query_hidden = inputs.tensor(adapters, rank, dim), inputs.tensor(adapters * rank)
    w_query_bias, b_query_bias = inputs.tensor(adapters, dim), inputs.tensor(adapters)
    if kernel == "fusion_scores":
        return plan.scores(x, w_down, b_down, w_query_hidden, b_query_hidden, w_query_bias, b_query_bias, "gelu",
                           compute, 1.0, tile=variant, **rates).launches[kernel]
    probs, grad_probs = inputs.tensor(rows, adapters, dt=fp32), inputs.tensor(rows, adapters, dt=fp32)
    return plan.scores_backward(x, probs, grad_probs, w_down, b_down, w_query_hidden, b_query_hidden, "gelu", compute,
                                1.0, dtype, tile=variant, **rates).launches[kernel]


def _grouped_launch(kernel: str, block_rank: int, dtype_name: str, scenario: str, single: bool, variant=None,
                    **rates):
    from ..kernels.launch import padded_rank
    from ..kernels.sparse import plan

    wide = kernel in GROUPED_WIDE_KERNELS
    kernel = kernel.removesuffix("_wide")
    rows, dim, rank, misaligned = _scenario_shapes(block_rank or 16, scenario)
    dim_out = SPARSE_WIDE_FACTOR * dim if wide else dim
    if block_rank and padded_rank(rank) != block_rank:
        raise ValueError(f"r = {rank} does not pad to {block_rank}")
    dtype, compute = _dtypes(dtype_name)
    experts, top_k = GROUPED_EXPERTS, 1 if single else SPARSE_TOP_K
    gated = not single
    assignments = rows * top_k
    inputs = _Inputs(dtype)
    x = inputs.matrix(rows, dim, offset=misaligned)
    idx, weights = inputs.tensor(rows, top_k, dt=torch.int32), inputs.tensor(rows, top_k, dt=torch.float32)
    order, counts = inputs.tensor(assignments, dt=torch.int64), inputs.tensor(experts, dt=torch.int64)
    w_gate, b_gate = inputs.tensor(experts, dim, dt=torch.float32), inputs.tensor(experts, dt=torch.float32)
    w_down, w_up = inputs.tensor(experts, rank, dim), inputs.tensor(experts, dim_out, rank)
    b_down, b_up, scale = inputs.tensor(experts, rank), inputs.tensor(experts, dim_out), inputs.tensor(dim_out)
    residual, row_scale = inputs.tensor(rows, dim_out), inputs.tensor(rows, dt=torch.float32)
    hidden = inputs.tensor(assignments, rank, dt=compute)
    if kernel == "grouped_gate":
        return plan.gate(x, w_gate, b_gate, top_k, True, GROUPED_PLAN_SMS, tile=variant).launches[kernel]
    if kernel in ("grouped_forward", "grouped_combine"):  # x is a residual term only where D_out = D
        launches = plan.grouped_forward(x, idx, weights, order, counts, w_down, b_down, w_up, b_up, scale, 1.0,
                                        residual, not wide, row_scale, "gelu", compute, dtype, True,
                                        tiles={kernel: variant}, **rates).launches
    else:
        # The packed gradients in the parameters' dtype (fp32 for autocast_*).
        launches = plan.grouped_backward(
            inputs.tensor(rows, dim_out), inputs.tensor(rows, experts, dt=torch.float32) if gated else None, x,
            hidden, idx, weights, order, counts, w_gate if gated else None, w_down, w_up, b_up, scale, 1.0,
            row_scale, "gelu", compute, not wide, True, dtype, tiles={kernel: variant}, **rates).launches
    if kernel not in launches:
        raise ValueError(f"{kernel}: no such launch with k = {top_k}")
    return launches[kernel]


def config_tables() -> dict:
    """Each kernel's table of block configurations, {(padded rank, E*r or N*r, dtype group): config};
    the grouped gate's and combines' (keyed by the dtype group alone) under padded rank 0."""
    from ..kernels.bottleneck import configs as bn
    from ..kernels.fusion import configs as fu
    from ..kernels.lora import configs as ll
    from ..kernels.sparse import configs as sp

    def rankless(table):
        return {(0, group): config for group, config in table.items()}

    # The LoRA GEMM's aligned and unaligned tile lists together; _cases compiles each list in its
    # own scenario.
    lora_gemm = {key: configs + ll.LORA_LINEAR_UNALIGNED_CONFIGS[key] for key, configs in ll.LORA_LINEAR_CONFIGS.items()}

    return {"forward": bn.FORWARD_CONFIGS, "backward_hidden": bn.BACKWARD_HIDDEN_CONFIGS,
            "backward_weights": bn.BACKWARD_WEIGHTS_CONFIGS, "forward_wide": bn.FORWARD_CONFIGS,
            "backward_weights_wide": bn.BACKWARD_WEIGHTS_WIDE_CONFIGS, "forward_column_major": bn.FORWARD_CONFIGS,
            "backward_hidden_column_major": bn.BACKWARD_HIDDEN_COLUMN_MAJOR_CONFIGS,
            "backward_weights_column_major": bn.BACKWARD_WEIGHTS_COLUMN_MAJOR_CONFIGS,
            "sparse_forward": sp.FORWARD_CONFIGS,
            "sparse_backward_input": sp.BACKWARD_INPUT_CONFIGS,
            "sparse_backward_weights": sp.BACKWARD_WEIGHTS_CONFIGS,
            "sparse_forward_wide": sp.FORWARD_CONFIGS,
            "sparse_backward_input_wide": sp.BACKWARD_INPUT_WIDE_CONFIGS,
            "sparse_backward_weights_wide": sp.BACKWARD_WEIGHTS_WIDE_CONFIGS,
            "grouped_gate": rankless(sp.GATE_CONFIGS), "grouped_forward": sp.GROUPED_FORWARD_CONFIGS,
            "grouped_combine": rankless(sp.COMBINE_CONFIGS),
            "grouped_backward_input": sp.GROUPED_BACKWARD_INPUT_CONFIGS,
            "grouped_backward_combine": rankless(sp.BACKWARD_COMBINE_CONFIGS),
            "grouped_backward_weights": sp.GROUPED_BACKWARD_WEIGHTS_CONFIGS,
            "grouped_forward_wide": sp.GROUPED_FORWARD_WIDE_CONFIGS,
            "grouped_backward_input_wide": sp.GROUPED_BACKWARD_INPUT_CONFIGS,
            "grouped_backward_weights_wide": sp.GROUPED_BACKWARD_WEIGHTS_WIDE_CONFIGS,
            "lora_forward": lora_gemm, "lora_backward_input": lora_gemm,
            "lora_backward_weights": {key: [bn.BACKWARD_WEIGHTS_CONFIGS[key], config]
                                      for key, config in bn.BACKWARD_WEIGHTS_WIDE_CONFIGS.items()
                                      if key[0] <= ll.MAX_SINGLE_LAUNCH_RANK},
            "fusion_scores": fu.SCORES_CONFIGS, "fusion_scores_backward": fu.SCORES_BACKWARD_CONFIGS}


def _cases(archs, dtypes, scenarios, kernels, configs=None):
    """Every case of these kernels; configs: only the block configurations (row variants
    included) whose name contains one of these strings ("c128_half" takes a configuration and
    its `_rowsN` variants, "c128_half_rows16" one variant). A `_dropout` kernel has its base
    kernel's cases."""
    from ..kernels.lora.plan import masks_output

    for kernel in kernels:
        base = kernel.removesuffix(DROPOUT_SUFFIX)
        for case in _kernel_cases(archs, dtypes, scenarios, base, configs):
            # With dropout the LoRA backward's input launch takes the smaller tiles only (plan.py).
            if kernel == "lora_backward_input" + DROPOUT_SUFFIX and not masks_output(case[5]):
                continue
            yield (kernel,) + case[1:]


def _kernel_cases(archs, dtypes, scenarios, kernel, configs):
    from ..kernels.launch import dtype_group, row_variants

    tables = config_tables()
    sparse = kernel in SPARSE_KERNELS + SPARSE_WIDE_KERNELS
    grouped = kernel in GROUPED_KERNELS + GROUPED_WIDE_KERNELS
    for (block_rank, group), config in tables[kernel].items():
        # The row-tile kernels pick their block rows from M: every variant is compiled. The
        # grouped kernels' block rows are fixed by the configuration, except the gate's. The
        # LoRA linear's GEMM tables list every tile its plan may pick.
        fixed_rows = kernel.endswith(("backward_weights", "backward_weights_wide",
                                      "backward_weights_column_major")) or (
            grouped and kernel != "grouped_gate")
        if kernel in LORA_KERNELS:
            variants = config
        else:
            variants = [config] if fixed_rows else row_variants(config)
        # The store_act op variant changes the bottleneck backward kernels' flags at ranks up
        # to 32 (above that they always store act), the sparse backward's at every E*r.
        backward = kernel not in ("forward", "forward_wide", "forward_column_major", "sparse_forward",
                                  "sparse_forward_wide") and \
            not grouped and \
            kernel not in LORA_KERNELS + FUSION_KERNELS
        store_acts = (False, True) if backward and (sparse or block_rank <= 32) else (False,)
        # The trailing arguments of each form: the sparse forward's two forms, gated and
        # routed, are different kernels; so are two grouped kernels' k = 1 forms.
        if kernel in SPARSE_WIDE_KERNELS:  # (routed, narrow)
            routed_forms = (False, True) if kernel == "sparse_forward_wide" else (False,)
            forms = [(routed, narrow) for narrow in (False, True) for routed in routed_forms]
        elif sparse:
            forms = [(False,), (True,)] if kernel == "sparse_forward" else [(False,)]
        elif kernel in LORA_KERNELS:
            forms = [(False, False), (False, True)]  # the padded rank, and half of it
        elif grouped:
            forms = [(False, False), (False, True)] if kernel.removesuffix("_wide") in GROUPED_K1_KERNELS else \
                [(False, False)]
        else:
            forms = [()]
        for variant in variants:
            if configs and not any(part in variant.name for part in configs):
                continue
            for store_act in store_acts:
                for form in forms:
                    for dtype_name in dtypes:
                        # The gate's table is keyed by x's dtype, the others' by the compute dtype.
                        if dtype_group(_dtypes(dtype_name)[0 if kernel == "grouped_gate" else 1]) != group:
                            continue
                        # The LoRA linear's single launch runs fp32 only with tf32 dots.
                        if kernel in LORA_KERNELS and dtype_name == "float32":
                            continue
                        for arch in archs:
                            for scenario in scenarios:
                                if kernel in LORA_KERNELS[:2] and \
                                        variant.name.endswith("_unaligned") != (scenario == "unaligned"):
                                    continue
                                if kernel in LORA_KERNELS and form[1] and scenario == "unaligned":
                                    continue  # the unaligned scenario's rank is odd already
                                if kernel in SPARSE_WIDE_KERNELS and form[1] and scenario == "aligned":
                                    continue  # aligned, the narrow form specializes as the wide one
                                yield (kernel, block_rank, dtype_name, arch, scenario, variant, store_act) + form


