"""Task routing: one batch in which each image runs its own task's adapters, all in one launch per
adapter slot (task_routing), and what it is made of: the per-image adapter slots the adapted
blocks run (PerImageSlots, through mixed_task_forward: one routed_adapter launch over the whole
batch), the per-image LoRA branches of an adapted linear (mixed_lora_forward: the base GEMM once,
every task's low-rank branch in one routed_adapter launch), and the per-image stand-ins for owned
modules (PerImage: each image its own task's head and LayerNorms)."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Iterator

import torch
from torch import nn

from ..kernels import new_seed, reference
from ..kernels.sparse import routed_adapter_unchecked
from . import owned
from .kinds import kind_of
from .record import Frame, Routing, record_of
from .surgery import vit_blocks

if TYPE_CHECKING:
    from .modules import BottleneckAdapter

__all__ = ["task_routing", "mixed_task_forward", "mixed_lora_forward", "PerImageSlots", "PerImage"]


@contextlib.contextmanager
def task_routing(model: nn.Module, names_per_image) -> Iterator[nn.Module]:
    """Run a batch in which each image uses its own named adapters, all in one launch per adapter
    slot: `with task_routing(model, ["cars", "birds", "cars", ...]): logits = model(images)`.

    names_per_image: one adapter name per image of the batch, or a 1-D integer tensor of indices
    into sorted(adapter_configs(model)) (the model's adapter names, sorted). The named adapters
    are all of one kind:
    - bottleneck adapters (experts = 1) of one position, rank, activation, dropout, norm and
      bias: each adapted block runs all of them in one launch per slot;
    - or LoRA adapters of one rank and targets: each target linear runs its base GEMM once for
      the batch and every task's low-rank branch in one launch (a merged adapter's linears use
      the original weights kept at merge, so merging needs no undoing).
    Their scales (and LoRA's alpha, rsLoRA and dropout) may differ. Each image is classified by
    its own task's head where that task owns one (train_head; the heads must give outputs of one
    shape), by the original head otherwise, and likewise for the LayerNorms of tasks with
    train_norms. Inside the block every named adapter's parameters and own modules train
    (gradients reach each image's own ones); on exit the model is as it was, requires_grad flags
    included. Calls that change the model's adapters (inject, set_adapter, ...) raise inside the
    block. LoSA side networks and AdapterFusion are refused (set_adapter runs them, one per batch).
    """
    record = record_of(model)
    configs = record.configs if record is not None else {}
    per_image = _names(names_per_image, sorted(configs))
    names = sorted(set(per_image))
    unknown = [name for name in names if name not in configs]
    if unknown:
        raise ValueError(f"no adapters named {unknown}; injected: {sorted(configs)}")
    for name in names:
        refusal = kind_of(configs[name]).routing_refusal(name, configs[name])
        if refusal is not None:
            raise ValueError(refusal)
    first = configs[names[0]]
    kind = kind_of(first)
    for name in names:
        if kind_of(configs[name]) is not kind:
            raise ValueError(f"task_routing mixes adapters of one kind: {names[0]!r} is {kind.noun}, {name!r} is "
                             f"{kind_of(configs[name]).noun}")
        for field in kind.routing_fields(first):
            if getattr(configs[name], field) != getattr(first, field):
                raise ValueError(f"task_routing needs adapters of one {field}: {names[0]!r} has "
                                 f"{getattr(first, field)!r}, {name!r} has {getattr(configs[name], field)!r}")
    vit_blocks(model)
    index = {name: i for i, name in enumerate(names)}
    task_of_sample = torch.tensor([index[name] for name in per_image], dtype=torch.long)
    copies = [owned.owned_modules(model, name) for name in names]
    modules = {}
    for key, path in owned.owned_paths(model).items():
        if any(path in own for own in copies):
            per_task = [own.get(path, getattr(model, owned.BASE)[key]) for own in copies]
            modules[path] = PerImage(per_task, task_of_sample, path)
    parameters = list(model.parameters())
    flags = [p.requires_grad for p in parameters]
    with owned.framed(model, record, Frame("task_routing", Routing(tuple(names), task_of_sample), modules)):
        for name in names:
            for module in (*kind.modules(model, name).values(), *copies[index[name]].values()):
                module.requires_grad_(True)
        try:
            yield model
        finally:
            for parameter, flag in zip(parameters, flags):
                parameter.requires_grad_(flag)


def _names(names_per_image, sorted_names: list) -> list:
    """names_per_image as a list of names (a tensor's indices looked up in sorted_names)."""
    if isinstance(names_per_image, torch.Tensor):
        tensor = names_per_image
        if tensor.dim() != 1 or tensor.numel() == 0 or tensor.dtype.is_floating_point or tensor.is_complex() \
                or tensor.dtype == torch.bool:
            raise ValueError(f"names_per_image: a tensor must be a non-empty 1-D integer tensor of indices into the "
                             f"sorted adapter names {sorted_names}, got shape {tuple(tensor.shape)} {tensor.dtype}")
        indices = tensor.tolist()
        bad = sorted({i for i in indices if not 0 <= i < len(sorted_names)})
        if bad:
            raise ValueError(f"names_per_image: indices {bad} are outside the {len(sorted_names)} sorted adapter "
                             f"names {sorted_names}")
        return [sorted_names[i] for i in indices]
    if isinstance(names_per_image, str) or not hasattr(names_per_image, "__len__") or len(names_per_image) == 0:
        raise ValueError("names_per_image must be a non-empty sequence of adapter names, one per image (or a "
                         "tensor of indices into the sorted adapter names)")
    per_image = list(names_per_image)
    strange = [name for name in per_image if not isinstance(name, str)]
    if strange:
        raise ValueError(f"names_per_image must hold adapter names (str), got {strange[0]!r} "
                         f"({type(strange[0]).__name__}); pass indices as a 1-D integer tensor")
    return per_image


class PerImageSlots:
    """Stands in for a block's adapter slots under task_routing: slot -> a callable that runs each
    image through its own task's adapter of that slot (mixed_task_forward)."""

    def __init__(self, adapters: nn.ModuleDict, routing: Routing):
        self.adapters, self.routing = adapters, routing

    def __getitem__(self, slot: str):
        adapters = [self.adapters[name][slot] for name in self.routing.names]
        task_of_sample = self.routing.task_of_sample

        def run(x, residual=None):
            if x.shape[0] != task_of_sample.shape[0]:
                raise ValueError(f"task_routing was given {task_of_sample.shape[0]} task names but the batch "
                                 f"has {x.shape[0]} images")
            return mixed_task_forward(adapters, task_of_sample, x, residual=residual)

        return run


class PerImage(nn.Module):
    """Stands in for an owned module under task_routing: image b of the batch goes through
    modules[task_of_sample[b]]. LayerNorms normalize once and apply each image's own affine;
    other modules (the heads) run on the whole batch per task and each image keeps its own
    task's output, which costs a tiny matmul per task and keeps the shapes static."""

    def __init__(self, modules: list[nn.Module], task_of_sample: torch.Tensor, path: str):
        super().__init__()
        self.tasks = nn.ModuleList(modules)
        self.task_of_sample = task_of_sample
        self.path = path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != self.task_of_sample.shape[0]:
            raise ValueError(f"task_routing was given {self.task_of_sample.shape[0]} task names but {self.path} "
                             f"got a batch of {x.shape[0]}")
        task = self.task_of_sample.to(x.device)
        first = self.tasks[0]
        if all(isinstance(m, nn.LayerNorm) for m in self.tasks) and first.elementwise_affine:
            y = nn.functional.layer_norm(x, first.normalized_shape, None, None, first.eps)
            view = (x.shape[0],) + (1,) * (x.dim() - 1 - len(first.normalized_shape)) + tuple(first.normalized_shape)
            weight = torch.stack([m.weight for m in self.tasks])[task].reshape(view)
            if first.bias is None:
                return y * weight.to(y.dtype)
            bias = torch.stack([m.bias for m in self.tasks])[task].reshape(view)
            return torch.addcmul(bias.to(y.dtype), y, weight.to(y.dtype))
        out = None
        for index, module in enumerate(self.tasks):
            y = module(x)
            if out is None:
                out = y
                continue
            if y.shape != out.shape:
                raise ValueError(f"task_routing runs each image through its own task's {self.path}, but those "
                                 f"give outputs of shapes {tuple(out.shape)} and {tuple(y.shape)}")
            mask = (task == index).reshape((-1,) + (1,) * (y.dim() - 1))
            out = torch.where(mask, y, out)
        return out


def _folded_weights(adapter: "BottleneckAdapter"):
    """(w_down, b_down, w_up, b_up) of one adapter with its LayerNorm affine and scale folded in."""
    down_w, down_b = adapter.down.weight, adapter.down.bias
    if adapter.norm is not None:
        gamma, beta = adapter.norm.weight, adapter.norm.bias
        shift = down_w @ beta if beta is not None else None
        down_w = down_w * gamma[None, :] if gamma is not None else down_w
        if shift is not None:
            down_b = shift if down_b is None else down_b + shift
    up_w, up_b = adapter.up.weight, adapter.up.bias
    if isinstance(adapter.scale, torch.Tensor):
        up_w = up_w * adapter.scale.reshape(-1, 1)
        up_b = None if up_b is None else up_b * adapter.scale.reshape(-1)
    elif adapter.scale is not None:
        up_w = up_w * adapter.scale
        up_b = None if up_b is None else up_b * adapter.scale
    return down_w, down_b, up_w, up_b


def mixed_task_forward(adapters: list, task_of_sample: torch.Tensor, x: torch.Tensor, residual=None) -> torch.Tensor:
    """Each image of x [batch, ..., D] through its own task's BottleneckAdapter: row m of image b
    uses adapters[task_of_sample[b]], in one routed_adapter launch over the whole batch.

    The adapters must agree on dim, rank, activation, norm and bias (inject's named adapters of
    one kind do). Their scales and LayerNorm affines are folded into the stacked weights
    (scale_t * W_up_t, W_down_t * gamma_t, W_down_t beta_t + b_down_t): the same function,
    differentiable into every adapter's own parameters, rounded at other points than one
    adapter alone (the scale multiplies before the dot's rounding instead of after)."""
    first = adapters[0]
    dim = first.dim
    tokens = x[0].numel() // dim if x.dim() > 1 else 1
    norm = first.norm
    if norm is not None:  # the normalization is shared; each task's affine goes into its weights
        inputs = nn.functional.layer_norm(x, (dim,), None, None, norm.eps)
    else:
        inputs = x
    with torch.autocast(x.device.type, enabled=False):  # folded weights in their own dtype
        folded = [_folded_weights(adapter) for adapter in adapters]
    w_down, b_down, w_up, b_up = (list(column) for column in zip(*folded))
    if any(b is None for b in b_down) and not all(b is None for b in b_down):
        b_down = [torch.zeros(first.rank, device=x.device, dtype=w_down[0].dtype) if b is None else b for b in b_down]
    stacked_b_down = None if b_down[0] is None else torch.stack(b_down)
    stacked_b_up = None if b_up[0] is None else torch.stack(b_up)
    expert_idx = task_of_sample.to(x.device).repeat_interleave(tokens).reshape(-1, 1)
    expert_weight = torch.ones(expert_idx.shape, device=x.device, dtype=torch.float32)
    row_scale = None
    rates = torch.tensor([adapter.drop_path for adapter in adapters], dtype=torch.float32)
    if first.training and bool((rates > 0).any()) and x.numel() > 0:
        # Each image's DropPath draw at its own task's rate.
        keep = (1.0 - rates)[task_of_sample.cpu()].to(x.device)
        row_scale = (torch.bernoulli(keep) / keep).repeat_interleave(tokens)
    dropout = first.dropout if first.training else 0.0  # the tasks share it (routing_fields)
    fn = routed_adapter_unchecked if first.fused else reference.routed_adapter
    return fn(inputs, expert_idx, expert_weight, torch.stack(w_down), stacked_b_down, torch.stack(w_up),
              stacked_b_up, None, activation=first.activation, residual=residual, row_scale=row_scale,
              dropout=dropout, seed=new_seed(x.device) if dropout > 0.0 else None)


def mixed_lora_forward(branches: list, task_of_sample: torch.Tensor, x: torch.Tensor,
                       base: torch.Tensor) -> torch.Tensor:
    """base + each image's own task's LoRA update: row m of image b adds
    s_t (x_m A_t^T) B_t^T with t = task_of_sample[b] and branches[t] = (A_t, B_t, s_t), in one
    routed_adapter launch over the whole batch (identity activation, one expert per row with
    weight 1, the tasks' A and B stacked as the experts' down- and up-projections, base as the
    residual added in the epilogue). The scales stay out of the weights: one scalar when the tasks
    share it, else a per-row factor (row_scale), applied after the dot as for an adapter alone.
    Dropout (in training, rate per task) is applied to the branch's input only, as a lone
    LoraBranch does; base was computed from the undropped x. Where the tasks share one rate it
    runs inside the routed launch (input_dropout); different rates mask x in PyTorch ops first."""
    first = branches[0]
    if x.dim() < 2 or x.shape[0] != task_of_sample.shape[0]:
        raise ValueError(f"task_routing was given {task_of_sample.shape[0]} task names but a LoRA linear got input "
                         f"of shape {tuple(x.shape)} (expected [batch = {task_of_sample.shape[0]}, ..., features])")
    dim = x.shape[-1]
    tokens = x[0].numel() // dim
    task = task_of_sample.to(x.device)
    expert_idx = task.repeat_interleave(tokens).reshape(-1, 1)
    expert_weight = torch.ones(expert_idx.shape, device=x.device, dtype=torch.float32)
    scales = [branch.scale for branch in branches]
    scale, row_scale = scales[0], None
    if any(s != scales[0] for s in scales):
        scale = None
        row_scale = torch.tensor(scales, dtype=torch.float32, device=x.device)[expert_idx[:, 0]]
    rates = [branch.active_dropout() for branch in branches]
    inputs, input_dropout = x, 0.0
    if all(rate == rates[0] for rate in rates):
        input_dropout = rates[0]
    elif x.numel() > 0:
        keep = (1.0 - torch.tensor(rates, dtype=torch.float32, device=x.device))[task]
        keep = keep.reshape((-1,) + (1,) * (x.dim() - 1))
        mask = torch.rand(x.shape, device=x.device) < keep
        inputs = x * (mask / keep).to(x.dtype)
    with torch.autocast(x.device.type, enabled=False):  # stacked in the parameters' own dtype
        w_down = torch.stack([branch.lora_A for branch in branches])
        w_up = torch.stack([branch.lora_B for branch in branches])
    fn = routed_adapter_unchecked if first.fused else reference.routed_adapter
    return fn(inputs, expert_idx, expert_weight, w_down, None, w_up, None, scale, activation="identity",
              residual=base, row_scale=row_scale, input_dropout=input_dropout,
              seed=new_seed(x.device) if input_dropout > 0.0 else None)
