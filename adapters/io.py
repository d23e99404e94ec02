"""Save and load just the adapters, with the modules they own (their own head when the config
trains it, their own LayerNorms with train_norms) under those modules' usual keys ("head.weight",
"blocks.0.norm1.weight"): safetensors for tensors, JSON for the config, never pickle. Writes are
atomic: a temporary file, then a rename.

The JSON holds format_version, name, kind ("adapter" for an AdapterConfig, "lora" for a
LoraConfig, "losa" for a LosaConfig), config, and what the delta needs of the backbone
("model": depth, dim, head shapes, for LoRA the [out, in] shape of every target linear, for
LoSA the tokens per image). Version 1 files (before "kind") hold bottleneck adapters and load as
such. LoRA tensors are saved as "blocks.{i}.attn.qkv.lora_A" / "...lora_B", LoSA's as
"losa.channel.{j}.w_down" ..., whatever the adapter's name."""

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
from .lora import TARGET_PATHS, LoraConfig, target_linears
from .losa import LosaConfig, token_count
from .owned import owned_modules
from .timm_vit import (
    _activate,
    _block_dim,
    _blocks,
    active_adapter,
    adapter_configs,
    delete_adapter,
    head_parameters,
    inject,
    merge_adapters,
    merged_adapter,
    set_adapter,
    unmerge_adapters,
)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
FORMAT_VERSION = 2  # 2 added "kind" and LoRA; 1 files are bottleneck adapters
READ_VERSIONS = (1, 2)
KINDS = {"adapter": AdapterConfig, "lora": LoraConfig, "losa": LosaConfig}

__all__ = ["save_adapters", "load_adapters", "CONFIG_FILE", "WEIGHTS_FILE"]


def _kind(config) -> str:
    return next(kind for kind, cls in KINDS.items() if isinstance(config, cls))


def _adapter_state(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    config = adapter_configs(model)[name]
    state = {}
    if isinstance(config, LosaConfig):
        for key, tensor in model.losa[name].state_dict().items():
            state[f"losa.{key}"] = tensor
    for index, block in enumerate(_blocks(model)):
        if isinstance(config, LosaConfig):
            break
        if isinstance(config, LoraConfig):
            for target, linear in target_linears(block, config.targets).items():
                for key, tensor in linear.lora[name].state_dict().items():
                    state[f"blocks.{index}.{TARGET_PATHS[target]}.{key}"] = tensor
            continue
        for key, tensor in block.adapters[name].state_dict().items():
            state[f"blocks.{index}.{key}"] = tensor
    for path, module in owned_modules(model, name).items():
        for key, tensor in module.state_dict().items():
            if f"{path}.{key}" in state:
                raise RuntimeError(f"adapter {name!r}: its own module {path} and its adapters both have {key}")
            state[f"{path}.{key}"] = tensor
    return state


def _model_info(model: nn.Module, config) -> dict:
    blocks = _blocks(model)
    head_params = list(head_parameters(model).values())
    info = {
        "depth": len(blocks),
        "dim": _block_dim(blocks[0]),
        "num_classes": int(getattr(model, "num_classes", 0) or 0),
        "head_shapes": [list(p.shape) for p in head_params],
    }
    if isinstance(config, LoraConfig):
        info["linears"] = _linear_shapes(model, config.targets)
    if isinstance(config, LosaConfig):
        info["tokens"] = token_count(model)
    return info


def _linear_shapes(model: nn.Module, targets) -> dict[str, list]:
    """target -> [out, in] of that linear in every block ([out, in] of block 0 when all agree,
    else the list of every block's)."""
    shapes = {target: [] for target in targets}
    for block in _blocks(model):
        for target, module in target_linears(block, targets).items():
            weight = getattr(module, "weight", None)
            shapes[target].append(list(weight.shape) if isinstance(weight, torch.Tensor) else None)
    return {target: found[0] if all(s == found[0] for s in found) else found for target, found in shapes.items()}


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
    config trains it, and its own LayerNorms with train_norms). A merged LoRA adapter saves
    the same delta as unmerged (merging leaves A and B as they are)."""
    from safetensors.torch import save_file

    configs = adapter_configs(model)
    name = name or active_adapter(model)
    if name not in configs:
        raise ValueError(f"no adapters named {name!r} to save; injected: {sorted(configs)}")
    config = configs[name]
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in _adapter_state(model, name).items()}
    meta = {"format_version": FORMAT_VERSION, "name": name, "kind": _kind(config), "config": config.to_dict(),
            "model": _model_info(model, config)}
    text = json.dumps(meta, indent=2, sort_keys=True, allow_nan=False)  # fails before anything is written
    _atomic_write(folder / WEIGHTS_FILE, lambda tmp: save_file(state, tmp, metadata={"name": name}))
    _atomic_write(folder / CONFIG_FILE, lambda tmp: Path(tmp).write_text(text))
    return folder


def load_adapters(model: nn.Module, path: Union[str, os.PathLike], name: Optional[str] = None,
                  verbose: bool = False) -> nn.Module:
    """Inject adapters per the saved config (if the model has none of that name) and load their
    weights (and their own head's and LayerNorms', if saved) into that adapter only; they become
    the active adapters, and the model's other adapters stay as they are (stack tasks, then
    switch with set_adapter). A merged LoRA adapter is unmerged first. Returns the model.

    Raises ValueError, naming what differs, for a model of another width or depth, a head of
    another shape, LoRA target linears of other shapes, another token count (LoSA), or a file
    with missing or unexpected tensors; the model is then left as it was.
    """
    from safetensors.torch import load_file

    folder = Path(path)
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    for file in (config_path, weights_path):
        if not file.is_file():
            raise FileNotFoundError(f"{file} not found: load_adapters expects a folder written by save_adapters")
    meta = json.loads(config_path.read_text())
    version = meta.get("format_version")
    if version not in READ_VERSIONS:
        raise ValueError(f"{config_path}: format_version {version!r}, expected one of {READ_VERSIONS}")
    kind = meta.get("kind") if version >= 2 else "adapter"
    if kind not in KINDS:
        raise ValueError(f"{config_path}: kind {kind!r}, expected one of {sorted(KINDS)}")
    config = KINDS[kind].from_dict(meta["config"])
    name = name or meta["name"]
    saved, current = meta["model"], _model_info(model, config)
    for key in ("depth", "dim"):
        if saved[key] != current[key]:
            raise ValueError(f"adapters in {folder} were saved for a model of {key} {saved[key]}; "
                             f"this model has {key} {current[key]}")
    if config.train_head and saved["head_shapes"] != current["head_shapes"]:
        raise ValueError(f"the saved head has shapes {saved['head_shapes']}; this model's head has "
                         f"{current['head_shapes']} (create the model with num_classes={saved['num_classes']})")
    if "tokens" in saved and saved["tokens"] != current["tokens"]:
        raise ValueError(f"the LoSA adapter in {folder} was saved for {saved['tokens']} tokens per image; this model "
                         f"has {current['tokens']} (another image or patch size)")
    for target, shape in saved.get("linears", {}).items():
        if current["linears"][target] != shape:
            raise ValueError(f"LoRA adapters in {folder} were saved for a model whose {TARGET_PATHS[target]} "
                             f"weights are [out, in] = {shape}; this model's are {current['linears'][target]}")
    existing = adapter_configs(model).get(name)
    if existing is not None and existing != config:
        raise ValueError(f"the model's adapters {name!r} were built from {existing}, but {folder} holds "
                         f"{config}; load into a model without them, or under another name")
    state = load_file(str(weights_path))
    previous, was_merged = active_adapter(model), merged_adapter(model)
    if existing is None:
        inject(model, config, name=name, verbose=verbose)
    try:
        expected = _adapter_state(model, name)
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(f"{weights_path}: missing tensors {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                             f"unexpected tensors {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}")
        for key, tensor in state.items():
            if tensor.shape != expected[key].shape:
                raise ValueError(f"{weights_path}: {key} has shape {tuple(tensor.shape)}, the model expects "
                                 f"{tuple(expected[key].shape)}")
    except ValueError:
        if existing is None:  # take back what this call injected
            delete_adapter(model, name)
            _activate(model, previous)
            if was_merged is not None:
                merge_adapters(model, was_merged)
        raise
    if merged_adapter(model) == name:
        unmerge_adapters(model)  # the merged weights would go stale
    with torch.no_grad():
        for key, tensor in state.items():
            expected[key].copy_(tensor)
    set_adapter(model, name)
    return model
