"""Backbone modules a named adapter owns its own copy of: the classifier head (config.train_head)
and the backbone's LayerNorms (config.train_norms), as PEFT's `modules_to_save` does.

The model keeps every module at its usual path (`model.head`, `model.blocks[3].norm1`, ...), so
timm's forward, `get_classifier()` and the state-dict keys of the active modules do not change.
What sits there is the active adapter's own copy, or the original when the active adapter owns
none (or inside `disable_adapters`). The copies live in `model.adapter_modules[name]`, the
originals of every path some adapter owns in `model.base_modules`; both move with the model
(`.to()`, `state_dict()`), so the active module is also listed under one of them.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

OWNED = "adapter_modules"  # ModuleDict: adapter name -> ModuleDict(key -> its copy)
BASE = "base_modules"  # ModuleDict: key -> the original module of that path


def key_of(path: str) -> str:
    """ModuleDict key for a module path (ModuleDict keys cannot hold dots)."""
    return path.replace(".", "__")


def head_paths(model: nn.Module) -> list[str]:
    """Paths of the classifier modules that have parameters (distilled ViTs have two heads; a
    model made with num_classes=0 has none to own)."""
    heads = model.get_classifier() if hasattr(model, "get_classifier") else getattr(model, "head", None)
    heads = heads if isinstance(heads, (tuple, list)) else (heads,)
    ids = {id(head) for head in heads if isinstance(head, nn.Module) and any(True for _ in head.parameters())}
    return [path for path, module in _backbone_modules(model) if id(module) in ids]


def norm_paths(model: nn.Module) -> list[str]:
    """Paths of the backbone's LayerNorms (those of the blocks, the final norm and any pre/fc
    norm), not the adapters' own."""
    return [path for path, module in _backbone_modules(model)
            if isinstance(module, nn.LayerNorm) and any(True for _ in module.parameters())]


def _backbone_modules(model: nn.Module):
    for path, module in model.named_modules():
        parts = path.split(".")
        if parts[0] in (OWNED, BASE) or "adapters" in parts:
            continue
        yield path, module


def add_owner(model: nn.Module, name: str, paths: list[str]) -> None:
    """Give adapter `name` its own copies of the modules at `paths`, copied from the originals."""
    if not paths:
        return
    if not hasattr(model, OWNED):
        model.add_module(OWNED, nn.ModuleDict())
        model.add_module(BASE, nn.ModuleDict())
        model._fused_owned_paths = {}
    owned, base = getattr(model, OWNED), getattr(model, BASE)
    copies = nn.ModuleDict()
    for path in paths:
        key = key_of(path)
        if key not in base:
            # Nobody owned this path yet, so what sits there is the original.
            base[key] = model.get_submodule(path)
            model._fused_owned_paths[key] = path
        copies[key] = copy.deepcopy(base[key])
    owned[name] = copies


def remove_owner(model: nn.Module, name: str) -> None:
    """Drop adapter `name`'s copies. A path no adapter owns any more gets its original back and
    leaves base_modules; with none left, the model loses adapter_modules and base_modules."""
    owned = getattr(model, OWNED, None)
    if owned is None or name not in owned:
        return
    del owned[name]
    base = getattr(model, BASE)
    for key in list(base.keys()):
        if not any(key in copies for copies in owned.values()):
            set_module(model, model._fused_owned_paths.pop(key), base[key])
            del base[key]
    if not len(base):
        delattr(model, OWNED)
        delattr(model, BASE)
        del model._fused_owned_paths


def owned_modules(model: nn.Module, name: str) -> dict[str, nn.Module]:
    """Adapter `name`'s own copies by their module path in the model (empty when it owns none)."""
    owned = getattr(model, OWNED, None)
    if owned is None or name not in owned:
        return {}
    return {model._fused_owned_paths[key]: module for key, module in owned[name].items()}


def owned_paths(model: nn.Module) -> dict[str, str]:
    """key -> path of every module some adapter owns."""
    return dict(getattr(model, "_fused_owned_paths", {}))


def install(model: nn.Module, name: Optional[str]) -> dict[str, nn.Module]:
    """Put adapter `name`'s copies (the originals where it owns none; all originals for None) at
    their paths. Returns what sat at every owned path before, for `restore`."""
    previous = {}
    for key, path in owned_paths(model).items():
        previous[path] = model.get_submodule(path)
        copies = getattr(model, OWNED)
        module = copies[name][key] if name is not None and name in copies and key in copies[name] else getattr(
            model, BASE)[key]
        set_module(model, path, module)
    return previous


def restore(model: nn.Module, previous: dict[str, nn.Module]) -> None:
    for path, module in previous.items():
        set_module(model, path, module)


def set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


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
