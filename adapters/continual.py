"""Continual learning with one named adapter per task: I2I initialization of a new task's
adapter from the old tasks' adapters, and per-task evaluation.

I2I (Srinivasan et al., "I2I: Initializing Adapters with Improvised Knowledge", CoLLAs 2023)
starts a new task's adapter from what the old tasks' adapters know, instead of from a random
init: first an AdapterFusion over the old adapters learns the new task, then the fusion is
distilled into a fresh bottleneck adapter, which then trains on the new task as usual. The old
adapters are never changed, so the old tasks keep their outputs exactly.

The paper distills the fusion into the new adapter, but the exact distillation loss could not
be confirmed from its text; this package's choice (distill="outputs", the default) matches the
fusion's branch output at every block (sum_i p_i v_i, the fusion's output minus its residual)
with the new adapter's branch output there, MSE summed over blocks; distill="logits" matches
the logits instead (KL divergence), "both" adds the two.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import numbers
from typing import Callable, Iterable, Iterator, Mapping, Optional, Sequence, Union

import torch
from torch import nn
from torch.nn import functional as F

from ..kernels.reference import residual_terms
from . import owned
from .config import AdapterConfig
from .fusion import FusionConfig, FusionKind, fusion_regularization
from .kinds import kind_of
from .record import record_of, refuse_inside_frames
from .timm_vit import _switch, adapter_configs, delete_adapter, inject, merge_adapters, param_groups, set_adapter

__all__ = ["I2IResult", "i2i_initialize", "evaluate_tasks", "DISTILL_MODES"]

logger = logging.getLogger("fused_adapters")
DISTILL_MODES = ("outputs", "logits", "both")


@dataclasses.dataclass
class I2IResult:
    """What i2i_initialize did: the new adapter's name, the temporary fusion's name (deleted by
    now), and the loss of every optimizer step of both phases (fusion: the task loss plus the
    fusion regularization; distill: the distillation loss)."""

    name: str
    fusion_name: str
    fusion_losses: list
    distill_losses: list


def i2i_initialize(
    model: nn.Module,
    new_name: str,
    from_adapters: Sequence[str],
    data: Iterable,
    *,
    fusion_steps: int,
    distill_steps: int,
    config: Optional[AdapterConfig] = None,
    distill: str = "outputs",
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    optimizer: Callable[..., torch.optim.Optimizer] = torch.optim.AdamW,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    temperature: Union[float, str] = 1.0,
    autocast: Optional[torch.dtype] = None,
) -> I2IResult:
    """Add a bottleneck adapter `new_name` for a new task, initialized by I2I from the adapters
    `from_adapters` (bottleneck adapters of the old tasks, see FusionConfig for which fuse), and
    make it the active, trainable adapter; returns an I2IResult with both phases' losses.

    1. A temporary AdapterFusion over from_adapters (and its own copy of the classifier head)
       trains on `data` for fusion_steps optimizer steps, model in training mode, on
       loss_fn(logits, labels) plus fusion_regularization.
    2. `new_name` is injected (`config`, by default the first old adapter's config; it must sit
       at the fused adapters' position), its head starts as a copy of the fusion's, and it is
       distilled from the fusion for distill_steps steps, model in eval mode (so teacher and
       student run deterministically): per batch the fusion runs without autograd, then the
       new adapter, and the loss `distill` asks for is minimized (module docstring). With
       "outputs" the head gets no gradient and stays the fusion's.
    3. The fusion is deleted and `new_name` made active; the model's train/eval mode is restored.

    data: any iterable of (images, labels) pairs, iterated again as often as needed (a list or
    a DataLoader; not a one-shot iterator). Batches move to the model's device (floating
    images to its dtype). optimizer: called with param_groups(model, lr, weight_decay) (AdamW
    groups, no decay on 1-D parameters), once per phase. temperature: the fusion's
    (FusionConfig.temperature: a float or "anneal"). autocast: a dtype to run the forwards
    under torch.autocast (fp16 on CUDA uses a GradScaler). Logs one line per phase (logger
    "fused_adapters", INFO) with its first and last loss.

    The old adapters' parameters are frozen throughout and come back bit for bit unchanged. If
    anything raises, the fusion and the new adapter are removed and the previously active
    adapter is active again, so the model is as it was.
    """
    record = record_of(model)
    refuse_inside_frames(record, "i2i_initialize")
    fusion_name = f"{new_name}_i2i_fusion" if isinstance(new_name, str) else ""
    new_config = _check_i2i_arguments(model, new_name, fusion_name, from_adapters, fusion_steps, distill_steps,
                                      config, distill, lr, temperature)
    parameter = next(model.parameters())
    device, dtype = parameter.device, parameter.dtype
    batches = _cycle(data, device, dtype)
    run = functools.partial(_run_phase, model, batches, optimizer, lr, weight_decay, autocast, device)
    previous, merged, was_training = record.active, record.merged, model.training
    result = I2IResult(new_name, fusion_name, [], [])
    done = False
    try:
        inject(model, FusionConfig(adapters=tuple(from_adapters), temperature=temperature), name=fusion_name,
               verbose=False)
        model.train()

        def fusion_loss(images, labels):
            return loss_fn(model(images), labels) + fusion_regularization(model, fusion_name)

        result.fusion_losses = run(fusion_loss, fusion_steps)
        _log_phase(f"fusion over {list(from_adapters)}", new_name, result.fusion_losses)

        inject(model, new_config, name=new_name, verbose=False)
        _copy_heads(model, fusion_name, new_name)
        model.eval()
        with _BranchRecorder(model, fusion_name, detach=True) as teacher, \
                _BranchRecorder(model, new_name, detach=False) as student:

            def distill_loss(images, labels):
                set_adapter(model, fusion_name)
                with torch.no_grad():
                    target = model(images)
                set_adapter(model, new_name)
                logits = model(images)
                return _distillation(distill, teacher.outputs, student.outputs, target, logits)

            result.distill_losses = run(distill_loss, distill_steps)
        _log_phase(f"distill ({distill})", new_name, result.distill_losses)
        done = True
    finally:
        if fusion_name in adapter_configs(model):
            delete_adapter(model, fusion_name)
        if done:
            set_adapter(model, new_name)
        else:
            if new_name in adapter_configs(model):
                delete_adapter(model, new_name)
            _restore(model, previous, merged)
        model.train(was_training)
    return result


def _check_i2i_arguments(model, new_name, fusion_name, from_adapters, fusion_steps, distill_steps, config, distill,
                         lr, temperature) -> AdapterConfig:
    """Every check i2i_initialize can make before it changes the model; returns the new
    adapter's config."""
    configs = adapter_configs(model)
    if not isinstance(new_name, str) or not new_name.isidentifier():
        raise ValueError(f"new_name must be an identifier-like string, got {new_name!r}")
    for taken in (new_name, fusion_name):
        if taken in configs:
            raise ValueError(f"the model already has adapters named {taken!r} (i2i_initialize adds {new_name!r} and, "
                             f"while it runs, {fusion_name!r}); pick another new_name")
    if isinstance(from_adapters, str):
        raise ValueError(f"from_adapters must be a list of adapter names, got the string {from_adapters!r}")
    fusion_config = FusionConfig(adapters=tuple(from_adapters), temperature=temperature)
    fused = FusionKind().fused_configs(record_of(model), fusion_name, fusion_config)
    for name, value in (("fusion_steps", fusion_steps), ("distill_steps", distill_steps)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
            raise ValueError(f"{name} must be an int >= 0 (optimizer steps), got {value!r}")
    if distill not in DISTILL_MODES:
        raise ValueError(f"distill must be one of {DISTILL_MODES}, got {distill!r}")
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive finite float, got {lr!r}")
    first = fused[fusion_config.adapters[0]]
    new_config = config if config is not None else first
    if not isinstance(new_config, AdapterConfig):
        raise ValueError(f"config must be an AdapterConfig for the new bottleneck adapter, got "
                         f"{type(new_config).__name__}")
    if new_config.position != first.position:
        raise ValueError(f"config.position must be the fused adapters' position {first.position!r} (the new adapter "
                         f"learns the fusion's output at that site), got {new_config.position!r}")
    return new_config


def _cycle(data: Iterable, device: torch.device, dtype: torch.dtype) -> Iterator[tuple]:
    """data's (images, labels) pairs on the model's device, pass after pass; ValueError when a
    pass yields nothing (an empty or exhausted iterable)."""
    while True:
        empty = True
        for batch in data:
            empty = False
            yield _prepare(batch, device, dtype)
        if empty:
            raise ValueError("data yielded no batches: pass an iterable of (images, labels) pairs that can be iterated "
                             "again (a list or a DataLoader), not an exhausted iterator")


def _prepare(batch, device: torch.device, dtype: torch.dtype) -> tuple:
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise ValueError(f"data must yield (images, labels) pairs, got {type(batch).__name__}"
                         f"{f' of length {len(batch)}' if isinstance(batch, (tuple, list)) else ''}")
    images, labels = batch
    images = images.to(device=device, dtype=dtype if images.is_floating_point() else None, non_blocking=True)
    return images, labels.to(device, non_blocking=True)


def _run_phase(model, batches, optimizer, lr, weight_decay, autocast, device, loss_of, steps: int) -> list:
    """`steps` optimizer steps on loss_of(images, labels) over the active adapter's trainable
    parameters (the optimizer is built from them now); returns each step's loss."""
    opt = optimizer(param_groups(model, lr=lr, weight_decay=weight_decay))
    scaler = torch.amp.GradScaler(device.type, enabled=autocast == torch.float16 and device.type == "cuda")
    losses = []
    for _ in range(steps):
        images, labels = next(batches)
        with torch.autocast(device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext():
            loss = loss_of(images, labels)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        losses.append(float(loss.detach()))
    return losses


def _distillation(mode: str, teacher: dict, student: dict, target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """The distillation loss: "outputs" sums over blocks the MSE between the fusion's branch
    output and the new adapter's; "logits" is KL(softmax(target) || softmax(logits)) per image;
    "both" their sum."""
    loss = logits.new_zeros((), dtype=torch.float32)
    if mode in ("outputs", "both"):
        if set(teacher) != set(student):
            raise RuntimeError(f"the fusion ran in blocks {sorted(teacher)}, the new adapter in {sorted(student)}")
        for index in sorted(student):
            loss = loss + F.mse_loss(student[index].float(), teacher[index].float())
    if mode in ("logits", "both"):
        loss = loss + F.kl_div(F.log_softmax(logits.float(), dim=-1), F.log_softmax(target.float(), dim=-1),
                               log_target=True, reduction="batchmean")
    return loss


class _BranchRecorder:
    """Forward hooks on every block slot of adapter `name`: after each of its forwards,
    `outputs[block index]` is its branch output, the slot's output minus the residual it was
    given (detached for the teacher)."""

    def __init__(self, model: nn.Module, name: str, detach: bool):
        slots = kind_of(adapter_configs(model)[name]).modules(model, name)
        self.modules = {int(prefix.rsplit(".", 1)[1]): slot["block"] for prefix, slot in slots.items()}
        self.detach, self.outputs, self.handles = detach, {}, []

    def __enter__(self) -> "_BranchRecorder":
        for index, module in self.modules.items():
            self.handles.append(module.register_forward_hook(functools.partial(self._record, index),
                                                             with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.outputs.clear()  # the last forward's graph goes with them

    def _record(self, index, module, args, kwargs, output) -> None:
        out = output[0] if isinstance(output, tuple) else output
        residual = kwargs.get("residual", args[1] if len(args) > 1 else None)
        for term in residual_terms(residual):
            out = out - term
        self.outputs[index] = out.detach() if self.detach else out


def _copy_heads(model: nn.Module, source: str, target: str) -> None:
    """Copy adapter source's own head (and any other module both own) into target's copies."""
    theirs = owned.owned_modules(model, source)
    with torch.no_grad():
        for path, module in owned.owned_modules(model, target).items():
            if path in theirs:
                module.load_state_dict(theirs[path].state_dict())


def _log_phase(what: str, name: str, losses: list) -> None:
    if losses:
        logger.info("i2i %r: %s, %d steps, loss %.4g -> %.4g", name, what, len(losses), losses[0], losses[-1])
    else:
        logger.info("i2i %r: %s, 0 steps", name, what)


def _restore(model: nn.Module, active: Optional[str], merged: Optional[str]) -> None:
    """Make `active` the active adapter again (None: none) and re-merge `merged` if it was."""
    if active is not None:
        set_adapter(model, active)
    elif record_of(model) is not None:
        _switch(model, record_of(model), None)
    if merged is not None:
        merge_adapters(model, merged)


def evaluate_tasks(model: nn.Module, tasks: Mapping[str, Iterable],
                   metric: Optional[Callable[[torch.Tensor, torch.Tensor], float]] = None) -> dict:
    """Evaluate each task with its own adapter and head: tasks maps an adapter name to an
    iterable of (images, labels). Each runs with set_adapter(name), in eval mode, without
    autograd. Returns {name: top-1 accuracy}, or {name: metric(logits, labels)} over the task's
    concatenated logits and labels. The previously active adapter (merged again if it was) and
    the model's train/eval mode are restored afterwards, also on an error; requires_grad
    flags are those set_adapter gives the restored adapter."""
    configs = adapter_configs(model)
    missing = [name for name in tasks if name not in configs]
    if missing:
        raise ValueError(f"tasks names adapters {missing} the model does not have; injected: {sorted(configs)}")
    if not tasks:
        return {}
    record = record_of(model)
    refuse_inside_frames(record, "evaluate_tasks")
    parameter = next(model.parameters())
    previous, merged, was_training = record.active, record.merged, model.training
    results = {}
    try:
        model.eval()
        with torch.no_grad():
            for name, data in tasks.items():
                set_adapter(model, name)
                results[name] = _evaluate(model, name, data, metric, parameter.device, parameter.dtype)
    finally:
        _restore(model, previous, merged)
        model.train(was_training)
    return results


def _evaluate(model, name, data, metric, device, dtype) -> float:
    correct, total, all_logits, all_labels = 0, 0, [], []
    for batch in data:
        images, labels = _prepare(batch, device, dtype)
        logits = model(images)
        if metric is None:
            correct += int((logits.argmax(dim=-1) == labels).sum())
        else:
            all_logits.append(logits)
            all_labels.append(labels)
        total += labels.shape[0]
    if total == 0:
        raise ValueError(f"tasks[{name!r}] yielded no batches")
    if metric is None:
        return correct / total
    return float(metric(torch.cat(all_logits), torch.cat(all_labels)))
