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

import contextlib
import copy
from typing import Iterator, Optional

from torch import nn

from .surgery import classifier_heads

OWNED = "adapter_modules"  # ModuleDict: adapter name -> ModuleDict(key -> its copy)
BASE = "base_modules"  # ModuleDict: key -> the original module of that path


def key_of(path: str) -> str:
    """ModuleDict key for a module path (ModuleDict keys cannot hold dots)."""
    return path.replace(".", "__")


def head_paths(model: nn.Module) -> list[str]:
    """Paths of the classifier modules that have parameters (distilled ViTs have two heads; a
    model made with num_classes=0 has none to own)."""
    ids = {id(head) for head in classifier_heads(model)}
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


def install(model: nn.Module, name: Optional[str]) -> None:
    """Put adapter `name`'s copies (the originals where it owns none; all originals for None) at
    their paths."""
    for key, path in owned_paths(model).items():
        copies = getattr(model, OWNED)
        module = copies[name][key] if name is not None and name in copies and key in copies[name] else getattr(
            model, BASE)[key]
        set_module(model, path, module)


def expected_state(model: nn.Module, paths: list) -> dict:
    """The state (path.key -> tensor) copies of the modules at `paths` would have: the originals'."""
    base = getattr(model, BASE, {})
    state = {}
    for path in paths:
        key = key_of(path)
        module = base[key] if key in base else model.get_submodule(path)
        state.update({f"{path}.{k}": v for k, v in module.state_dict().items()})
    return state


def set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def sync(model: nn.Module, record) -> None:
    """Put at every owned path what the record runs: inside a context manager's block, its
    frame's modules (the originals elsewhere); otherwise the active adapter's copies."""
    if record.frames:
        install(model, None)
        for path, module in record.frames[-1].modules.items():
            set_module(model, path, module)
    else:
        install(model, record.active)


@contextlib.contextmanager
def framed(model: nn.Module, record, frame) -> Iterator[None]:
    """Run the block inside `frame` (a context manager's view of the model): push it, put its
    owned modules in place and clear the auxiliary losses; on exit pop it and do the same."""
    record.frames.append(frame)
    record.aux.clear()
    sync(model, record)
    try:
        yield
    finally:
        record.frames.remove(frame)
        record.aux.clear()
        sync(model, record)
