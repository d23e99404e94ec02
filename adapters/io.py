"""Save and load just the adapters, with the modules they own (their own head when the config
trains it, their own LayerNorms with train_norms) under those modules' usual keys ("head.weight",
"blocks.0.norm1.weight"): safetensors for tensors, JSON for the config, never pickle. Writes are
atomic: a temporary file, then a rename.

The JSON holds format_version, name, kind ("adapter" for an AdapterConfig, "lora" for a
LoraConfig, "losa" for a LosaConfig), config, and what the delta needs of the backbone
("model": depth, dim, head shapes, for LoRA the [out, in] shape of every target linear, for
LoSA the tokens per image). Version 1 files (before "kind") hold bottleneck adapters and load as
such. LoRA tensors are saved as "blocks.{i}.attn.qkv.lora_A" / "...lora_B", LoSA's as
"losa.channel.{j}.w_down" ..., whatever the adapter's name.

format="peft" writes, and load_adapters also reads, the folders of PEFT's LoRA for a timm ViT
(PeftModel.save_pretrained / PeftModel.from_pretrained): adapters/peft_format.py, which says what
maps to a LoraConfig and what is refused."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from . import peft_format
from .kinds import file_kinds, kind_named, kind_of
from .record import record_of, refuse_inside_frames
from .surgery import block_dim, vit_blocks
from .timm_vit import (
    Injection,
    active_adapter,
    adapter_configs,
    adapter_state,
    adapter_summary,
    head_parameters,
    logger,
    merged_adapter,
    set_adapter,
    unmerge_adapters,
)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
FORMAT_VERSION = 2  # 2 added "kind" and LoRA; 1 files are bottleneck adapters
READ_VERSIONS = (1, 2)
FORMATS = ("fused-adapters", "peft")  # save_adapters' format: this package's own (the default), PEFT's LoRA

__all__ = ["save_adapters", "load_adapters", "CONFIG_FILE", "WEIGHTS_FILE"]


def _model_info(model: nn.Module, config) -> dict:
    blocks = vit_blocks(model)
    head_params = list(head_parameters(model).values())
    info = {
        "depth": len(blocks),
        "dim": block_dim(blocks[0]),
        "num_classes": int(getattr(model, "num_classes", 0) or 0),
        "head_shapes": [list(p.shape) for p in head_params],
    }
    info.update(kind_of(config).model_info(model, config))
    return info


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


def save_adapters(model: nn.Module, path: Union[str, os.PathLike], name: Optional[str] = None,
                  format: str = "fused-adapters") -> Path:
    """Write the adapters named `name` (default: the active ones) to the folder `path`:
    adapter_config.json and adapter_model.safetensors (with that adapter's own head when its
    config trains it, and its own LayerNorms with train_norms). A merged LoRA adapter saves
    the same delta as unmerged (merging leaves A and B as they are).

    format: "fused-adapters" (the default) writes this package's own files, for every kind;
    "peft" writes a LoRA adapter as PEFT's LoRA folder, which PeftModel.from_pretrained(timm_model,
    path) loads to the same outputs (target_modules a regex matching exactly the adapted block
    linears, modules_to_save ["head"] with train_head; adapters/peft_format.py). Raises ValueError
    for another format, an adapter other than LoRA with format="peft", or no adapter `name`."""
    from safetensors.torch import save_file

    if not isinstance(format, str) or format not in FORMATS:
        raise ValueError(f"save_adapters' format must be one of {FORMATS}, got {format!r}")
    configs = adapter_configs(model)
    name = name or active_adapter(model)
    if name not in configs:
        raise ValueError(f"no adapters named {name!r} to save; injected: {sorted(configs)}")
    config = configs[name]
    folder = Path(path)
    state = {k: v.detach().contiguous().cpu() for k, v in adapter_state(model, name).items()}
    if format == "peft":
        peft_format.write(model, name, config, state, folder / CONFIG_FILE, folder / WEIGHTS_FILE, _atomic_write)
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"format_version": FORMAT_VERSION, "name": name, "kind": kind_of(config).file_kind,
            "config": config.to_dict(), "model": _model_info(model, config)}
    text = json.dumps(meta, indent=2, sort_keys=True, allow_nan=False)  # fails before anything is written
    _atomic_write(folder / WEIGHTS_FILE, lambda tmp: save_file(state, tmp, metadata={"name": name}))
    _atomic_write(folder / CONFIG_FILE, lambda tmp: Path(tmp).write_text(text))
    return folder


def _read_json(config_path: Path):
    try:
        return json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{config_path}: not valid JSON ({error}); load_adapters expects the file save_adapters "
                         f"wrote") from None


def _read_meta(config_path: Path, meta) -> dict:
    """adapter_config.json (this package's), checked: a ValueError naming the file and what is wrong otherwise."""
    if not isinstance(meta, dict):
        raise ValueError(f"{config_path}: a JSON object with format_version, name, kind, config and model was "
                         f"expected, got a JSON {type(meta).__name__}")
    version = meta.get("format_version")
    if version not in READ_VERSIONS or isinstance(version, bool):
        raise ValueError(f"{config_path}: format_version {version!r}, expected one of {READ_VERSIONS}")
    expected = {"name": str, "config": dict, "model": dict}
    for key, kind in expected.items():
        if key not in meta:
            raise ValueError(f"{config_path}: no {key!r} entry; save_adapters writes {sorted(expected)}")
        if not isinstance(meta[key], kind):
            raise ValueError(f"{config_path}: {key!r} must be a JSON {'object' if kind is dict else 'string'}, got "
                             f"{meta[key]!r}")
    info = meta["model"]
    for key, kind in (("depth", int), ("dim", int), ("head_shapes", list)):
        if not isinstance(info.get(key), kind):
            raise ValueError(f"{config_path}: model.{key} must be a JSON {'list' if kind is list else 'integer'}, got "
                             f"{info.get(key)!r}")
    return meta


def load_adapters(model: nn.Module, path: Union[str, os.PathLike], name: Optional[str] = None,
                  verbose: bool = False) -> nn.Module:
    """Inject adapters per the saved config (if the model has none of that name) and load their
    weights (and their own head's and LayerNorms', if saved) into that adapter only; they become
    the active adapters, and the model's other adapters stay as they are (stack tasks, then
    switch with set_adapter). A merged LoRA adapter is unmerged first. Returns the model.

    `path` may also be a PEFT LoRA folder (PeftModel.save_pretrained of a timm ViT; its
    adapter_config.json has "peft_type"): it loads as the equal LoraConfig, under `name` or else
    PEFT's "default" (PEFT folders do not store the name), with the head from modules_to_save as
    the adapter's own head; what a LoraConfig cannot express is refused with a ValueError naming
    the PEFT field (adapters/peft_format.py).

    Raises ValueError, naming the file and what is wrong or differs, for a malformed file, a
    model of another width or depth, a head of another shape, LoRA target linears of other
    shapes, another token count (LoSA), or a file with missing or unexpected tensors; the
    model is then left as it was (its adapters, tensors and requires_grad flags).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(path)
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    for file in (config_path, weights_path):
        if not file.is_file():
            raise FileNotFoundError(f"{file} not found: load_adapters expects a folder written by save_adapters "
                                    f"(or by PEFT's save_pretrained)")
    data = _read_json(config_path)
    peft = peft_format.is_peft_config(data)
    if peft:  # checked against this model's modules; the tensors' shapes are checked below
        config = peft_format.read_config(model, data, config_path)
        name = name or peft_format.ADAPTER_NAME
        refuse_inside_frames(record_of(model), "load_adapters")
    else:
        meta = _read_meta(config_path, data)
        config, name = _check_saved(model, meta, config_path, folder, name)
    existing = adapter_configs(model).get(name)
    if existing is not None and existing != config:
        raise ValueError(f"the model's adapters {name!r} were built from {existing}, but {folder} holds "
                         f"{config}; load into a model without them, or under another name")
    try:
        state = load_file(str(weights_path))
    except SafetensorError as error:
        raise ValueError(f"{weights_path}: not a safetensors file save_adapters wrote ({error})") from None
    if existing is None:  # inject's checks and build, nothing changed yet; attached once the tensors fit
        injection = Injection(model, config, name)
        expected = injection.state()
    else:
        expected = adapter_state(model, name)
    if peft:  # PEFT's keys -> this package's, checked (ValueError naming the PEFT key)
        state = peft_format.read_state(state, expected, weights_path)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{weights_path}: missing tensors {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                         f"unexpected tensors {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}")
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise ValueError(f"{weights_path}: {key} has shape {tuple(tensor.shape)}, the model expects "
                             f"{tuple(expected[key].shape)}")
    if existing is None:
        injection.attach()
        if verbose:
            logger.info(adapter_summary(model, name))
    elif merged_adapter(model) == name:
        unmerge_adapters(model)  # the merged weights would go stale
    with torch.no_grad():
        for key, tensor in adapter_state(model, name).items():
            tensor.copy_(state[key])
    set_adapter(model, name)
    return model


def _check_saved(model: nn.Module, meta: dict, config_path: Path, folder: Path, name: Optional[str]):
    """(config, name) of this package's adapter_config.json, checked against the model."""
    file_kind = meta.get("kind") if meta["format_version"] >= 2 else "adapter"
    kind = kind_named(file_kind) if isinstance(file_kind, str) else None
    if kind is None:
        raise ValueError(f"{config_path}: kind {file_kind!r}, expected one of {file_kinds()}")
    try:
        config = kind.config_class.from_dict(meta["config"])
    except (TypeError, ValueError) as error:
        raise ValueError(f"{config_path}: its config is not a valid {kind.config_class.__name__}: {error}") from None
    name = name or meta["name"]
    refuse_inside_frames(record_of(model), "load_adapters")
    saved, current = meta["model"], _model_info(model, config)
    for key in ("depth", "dim"):
        if saved[key] != current[key]:
            raise ValueError(f"adapters in {folder} were saved for a model of {key} {saved[key]}; "
                             f"this model has {key} {current[key]}")
    if config.train_head and saved["head_shapes"] != current["head_shapes"]:
        raise ValueError(f"the saved head has shapes {saved['head_shapes']}; this model's head has "
                         f"{current['head_shapes']} (create the model with num_classes={saved.get('num_classes')})")
    kind.check_model_info(saved, current, folder)
    return config, name
