"""Save and load just the adapters, with the modules they own (their own head when the config
trains it, their own LayerNorms with train_norms) under those modules' usual keys ("head.weight",
"blocks.0.norm1.weight"): safetensors for tensors, JSON for the config, never pickle. Writes are
atomic: a temporary file, then a rename."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from .config import AdapterConfig
from .owned import owned_modules
from .timm_vit import _block_dim, _blocks, active_adapter, adapter_configs, head_parameters, inject, set_adapter

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
FORMAT_VERSION = 1

__all__ = ["save_adapters", "load_adapters", "CONFIG_FILE", "WEIGHTS_FILE"]


def _adapter_state(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    state = {}
    for index, block in enumerate(_blocks(model)):
        for key, tensor in block.adapters[name].state_dict().items():
            state[f"blocks.{index}.{key}"] = tensor
    for path, module in owned_modules(model, name).items():
        for key, tensor in module.state_dict().items():
            if f"{path}.{key}" in state:
                raise RuntimeError(f"adapter {name!r}: its own module {path} and its adapters both have {key}")
            state[f"{path}.{key}"] = tensor
    return state


def _model_info(model: nn.Module) -> dict:
    blocks = _blocks(model)
    head_params = list(head_parameters(model).values())
    return {
        "depth": len(blocks),
        "dim": _block_dim(blocks[0]),
        "num_classes": int(getattr(model, "num_classes", 0) or 0),
        "head_shapes": [list(p.shape) for p in head_params],
    }


def _atomic_write(path: Path, write) -> None:
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(temporary)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp makes 0600; give the file a normal mode
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def save_adapters(model: nn.Module, path: Union[str, os.PathLike], name: Optional[str] = None) -> Path:
    """Write the adapters named `name` (default: the active ones) to the folder `path`:
    adapter_config.json and adapter_model.safetensors (with that adapter's own head when its
    config trains it, and its own LayerNorms with train_norms)."""
    from safetensors.torch import save_file

    configs = adapter_configs(model)
    name = name or active_adapter(model)
    if name not in configs:
        raise ValueError(f"no adapters named {name!r} to save; injected: {sorted(configs)}")
    config = configs[name]
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in _adapter_state(model, name).items()}
    meta = {"format_version": FORMAT_VERSION, "name": name, "config": config.to_dict(), "model": _model_info(model)}
    text = json.dumps(meta, indent=2, sort_keys=True, allow_nan=False)  # fails before anything is written
    _atomic_write(folder / WEIGHTS_FILE, lambda tmp: save_file(state, tmp, metadata={"name": name}))
    _atomic_write(folder / CONFIG_FILE, lambda tmp: Path(tmp).write_text(text))
    return folder


def load_adapters(model: nn.Module, path: Union[str, os.PathLike], name: Optional[str] = None,
                  verbose: bool = False) -> nn.Module:
    """Inject adapters per the saved config (if the model has none of that name) and load their
    weights (and their own head's and LayerNorms', if saved) into that adapter only; they become
    the active adapters. Returns the model.

    Raises ValueError, naming what differs, for a model of another width or depth, a head of
    another shape, or a file with missing or unexpected tensors.
    """
    from safetensors.torch import load_file

    folder = Path(path)
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    for file in (config_path, weights_path):
        if not file.is_file():
            raise FileNotFoundError(f"{file} not found: load_adapters expects a folder written by save_adapters")
    meta = json.loads(config_path.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{config_path}: format_version {meta.get('format_version')!r}, expected {FORMAT_VERSION}")
    config = AdapterConfig.from_dict(meta["config"])
    name = name or meta["name"]
    saved, current = meta["model"], _model_info(model)
    for key in ("depth", "dim"):
        if saved[key] != current[key]:
            raise ValueError(f"adapters in {folder} were saved for a model of {key} {saved[key]}; "
                             f"this model has {key} {current[key]}")
    if config.train_head and saved["head_shapes"] != current["head_shapes"]:
        raise ValueError(f"the saved head has shapes {saved['head_shapes']}; this model's head has "
                         f"{current['head_shapes']} (create the model with num_classes={saved['num_classes']})")
    existing = adapter_configs(model).get(name)
    if existing is None:
        inject(model, config, name=name, verbose=verbose)
    elif existing != config:
        raise ValueError(f"the model's adapters {name!r} were built from {existing}, but {folder} holds "
                         f"{config}; load into a model without them, or under another name")
    state = load_file(str(weights_path))
    expected = _adapter_state(model, name)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{weights_path}: missing tensors {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                         f"unexpected tensors {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}")
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise ValueError(f"{weights_path}: {key} has shape {tuple(tensor.shape)}, the model expects "
                             f"{tuple(expected[key].shape)}")
    with torch.no_grad():
        for key, tensor in state.items():
            expected[key].copy_(tensor)
    set_adapter(model, name)
    return model
