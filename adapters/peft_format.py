"""PEFT's LoRA folders (what `PeftModel.save_pretrained` writes for a timm ViT), read and written
with json and safetensors alone: this package never imports peft.

A PEFT LoRA layer computes, as LoraLinear does,

    y = W x + b + s * B (A dropout(x)),   s = lora_alpha / r   (lora_alpha / sqrt(r) with use_rslora)

with A = lora_A.weight [r, in] and B = lora_B.weight [out, r]. So a PEFT adapter whose targets are
some of the four linears of every block (attn.qkv, attn.proj, mlp.fc1, mlp.fc2) is exactly a
LoraConfig: r -> rank, lora_alpha -> alpha, lora_dropout -> dropout, use_rslora -> use_rslora, the
matched linears -> targets, modules_to_save ["head"] -> train_head, init_lora_weights
True / "gaussian" -> init "lora" / "gaussian" (False, PEFT's random B for debugging, reads as
"lora": an init only decides a fresh adapter's weights, and a loaded one has its own).

The folder. adapter_config.json is PEFT's LoraConfig as JSON, with "peft_type": "LORA" (this
package's own files have "format_version" and no "peft_type", which is how load_adapters tells
them apart). adapter_model.safetensors holds, for every adapted linear at module path P of the
timm model, "base_model.model.P.lora_A.weight" and "base_model.model.P.lora_B.weight", and for
every module M in modules_to_save its state as "base_model.model.M.weight", ... (PEFT's
get_peft_model_state_dict strips the adapter name from the keys: the model's
"...lora_A.default.weight" and "head.modules_to_save.default.weight" are saved as "...lora_A.weight"
and "head.weight"). PEFT does not store the adapter's name: save_pretrained writes the adapter
"default" into the folder itself and any other adapter into a subfolder named after it, and
from_pretrained loads a folder as "default" unless told otherwise; load_adapters does the same.
Keys that still hold one adapter name ("...lora_A.<name>.weight", as PEFT's own loader accepts
for the name it loads) are read too.

What reading resolves as PEFT does, against the module names of the plain timm model (the
modules this package adds are left out): target_modules as a string is a regex that must match
the whole name (re.fullmatch); as a list, an entry matches a name equal to it or ending in
"." + entry; "all-linear" (any case) means every nn.Linear (so the head too, unless modules_to_save
names it). exclude_modules takes names out the same way, and so does modules_to_save (PEFT never
puts LoRA on a module it saves whole). modules_to_save entries match a name equal to them or
ending in "." + entry.

What a LoraConfig cannot express is refused with a ValueError naming the PEFT field, before
anything in the model changes: another peft_type; DoRA and the other LoRA variants (use_dora,
velora_config, monteclora_config, use_bdlora, arrow_config, kasa_config, alora_invocation_tokens);
per-module ranks or alphas (rank_pattern, alpha_pattern); trained biases (bias other than "none",
lora_bias); some blocks only (layers_to_transform, layers_pattern); fan_in_fan_out (B A stored
transposed); inits that rewrite the base weights or stand for a data-driven procedure
(init_lora_weights other than true, false, "gaussian": "pissa", "olora", "loftq", "eva", ...);
use_qalora, target_parameters, layer_replication, megatron_config, trainable_token_indices;
target_modules that match anything but the four block linears (PEFT's "proj" also matches
patch_embed.proj, a Conv2d; "all-linear" without modules_to_save ["head"] matches the head), or a
linear in some blocks only; modules_to_save entries that match a module other than the classifier
head (the LayerNorms, say); and any field this reader does not know that is set (not null, false
or empty). The init sub-configs (loftq_config, eva_config, corda_config, astra_config,
lora_ga_config) are read only by the inits refused above, and the rest (task_type, inference_mode,
base_model_name_or_path, revision, auto_mapping, peft_version, megatron_core, qalora_group_size,
ensure_weight_tying: a timm ViT ties no weights) say nothing about the math; they are ignored.

Writing (save_adapters(..., format="peft")) is the converse, for LoRA adapters only: target_modules
is a regex that matches exactly the adapted block linears (never a bare "proj", which would take
patch_embed.proj too), modules_to_save is ["head"] (each classifier's path) with train_head, and a
merged adapter is written as its unmerged delta (merging leaves A and B as they are).
"""

from __future__ import annotations

import json
import math
import numbers
import re
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional

from torch import nn

from ..kernels.checks import MAX_RANK
from .config import TARGET_PATHS, TARGETS, LoraConfig
from .kinds import kind_of
from .lora import LoraLinear
from .owned import BASE, OWNED, head_paths
from .surgery import vit_blocks

__all__ = ["ADAPTER_NAME", "PEFT_PREFIX", "is_peft_config", "read_config", "read_state", "peft_config", "peft_key",
           "plain_module_names", "write"]

ADAPTER_NAME = "default"  # the name PEFT gives an adapter loaded from a folder (folders do not store it)
PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel (base_model) -> the timm model (model)
# The PEFT release whose folder layout and field meanings save_adapters writes; PEFT reads
# peft_version to decide which fixes for adapters of older releases to apply to the loaded weights.
PEFT_VERSION = "0.22.0"

# Fields that must keep PEFT's default (the "unset" value: null, false, {} or []) for the adapter to
# be a LoraConfig, with why not otherwise.
UNSUPPORTED = {
    "use_dora": "DoRA rescales every column of W + s B A by a learned magnitude; this package's LoRA has no magnitude",
    "velora_config": "VeLoRA replaces the backward of lora_A with a compressed one",
    "monteclora_config": "MonteCLoRA samples the LoRA factors in training",
    "use_bdlora": "BD-LoRA makes lora_A or lora_B block-diagonal",
    "arrow_config": "Arrow routes between several LoRA adapters per token",
    "kasa_config": "KaSA truncates the base weights' singular values and adds a learned diagonal (lora_diag)",
    "alora_invocation_tokens": "aLoRA applies the update only from its invocation tokens on",
    "rank_pattern": "it gives some modules another rank; a LoraConfig has one rank for every target",
    "alpha_pattern": "it gives some modules another alpha; a LoraConfig has one alpha for every target",
    "lora_bias": "it trains a bias on lora_B; this package's LoRA branches have none",
    "layers_to_transform": "it adapts some blocks only; a LoraConfig adapts its targets in every block",
    "layers_pattern": "it goes with layers_to_transform (some blocks only)",
    "fan_in_fan_out": "it stores the targets' weights transposed (Conv1D); a timm ViT's linears are nn.Linear",
    "use_qalora": "QA-LoRA pools the input in groups before lora_A",
    "target_parameters": "it puts LoRA on bare parameters; this package adapts the blocks' nn.Linear modules",
    "layer_replication": "it stacks copies of blocks, changing the model's depth",
    "megatron_config": "it builds Megatron's parallel linears",
    "trainable_token_indices": "it trains rows of an embedding matrix, which a ViT does not have",
}
# Read only together with an init_lora_weights value refused here, or without effect on the math.
IGNORED = ("loftq_config", "eva_config", "corda_config", "astra_config", "lora_ga_config", "task_type",
           "inference_mode", "base_model_name_or_path", "revision", "auto_mapping", "peft_version", "megatron_core",
           "qalora_group_size", "ensure_weight_tying", "runtime_config")
MAPPED = ("peft_type", "r", "lora_alpha", "lora_dropout", "use_rslora", "init_lora_weights", "bias", "target_modules",
          "exclude_modules", "modules_to_save")
INITS = {True: "lora", False: "lora", "gaussian": "gaussian"}  # PEFT init_lora_weights -> LoraConfig.init


def is_peft_config(data) -> bool:
    """Whether adapter_config.json's content is PEFT's (it has peft_type; this package's has format_version)."""
    return isinstance(data, dict) and "peft_type" in data


def _unset(value) -> bool:
    return value is None or value is False or (isinstance(value, (dict, list, str)) and len(value) == 0)


def plain_module_names(model: nn.Module) -> dict:
    """Module path -> module of the timm model as PEFT sees it: what this package added (the
    adapters' ModuleDicts in the blocks and the linears, LoSA's side networks, the owned head and
    LayerNorm copies) is left out; the modules at the usual paths stay."""
    pruned = {id(getattr(model, attribute)) for attribute in (OWNED, BASE) if hasattr(model, attribute)}
    if isinstance(getattr(model, "losa", None), nn.ModuleDict):
        pruned.add(id(model.losa))
    for block in vit_blocks(model):
        if isinstance(getattr(block, "adapters", None), nn.ModuleDict):
            pruned.add(id(block.adapters))
    for module in model.modules():
        if isinstance(module, LoraLinear):
            pruned.add(id(module.lora))
    names = {}

    def walk(module, path):
        names[path] = module
        for child_name, child in module.named_children():
            if id(child) not in pruned:
                walk(child, f"{path}.{child_name}" if path else child_name)

    walk(model, "")
    del names[""]
    return names


def _list_match(name: str, entries) -> bool:
    """PEFT's list matching (target_modules, exclude_modules, modules_to_save): equal, or ending in "." + entry."""
    return any(name == entry or name.endswith("." + entry) for entry in entries)


def _names_list(config_path, field: str, value) -> Optional[list]:
    """A PEFT field that is a regex string or a list of names: None for a string, the list checked otherwise."""
    if isinstance(value, str):
        return None
    if not isinstance(value, list) or not all(isinstance(entry, str) for entry in value):
        raise ValueError(f"{config_path}: PEFT field {field} must be a string (a regex) or a list of module names, "
                         f"got {value!r}")
    return value


def _matches(config_path, field: str, value, name: str) -> bool:
    entries = _names_list(config_path, field, value)
    if entries is None:
        try:
            return re.fullmatch(value, name) is not None
        except re.error as error:
            raise ValueError(f"{config_path}: PEFT field {field} {value!r} is not a valid regex ({error})") from None
    return _list_match(name, entries)


def _resolve_head(config_path, data: dict, names: dict, heads: list) -> bool:
    """train_head from modules_to_save: True when its entries match the classifier heads (every one
    with parameters); entries matching no module are no-ops in PEFT too (it wraps nothing)."""
    entries = data.get("modules_to_save")
    if entries is None:
        return False
    if not isinstance(entries, list) or not all(isinstance(entry, str) for entry in entries):
        raise ValueError(f"{config_path}: PEFT field modules_to_save must be null or a list of module names, got "
                         f"{entries!r}")
    matched = set()
    for entry in entries:
        found = [name for name in names if _list_match(name, [entry])]
        stateful = [name for name in found if any(True for _ in names[name].state_dict())]
        others = [name for name in stateful if name not in heads]
        if others:
            raise ValueError(f"{config_path}: PEFT field modules_to_save entry {entry!r} matches {others}; this "
                             f"package's LoRA adapters save and train only their own copy of the classifier head "
                             f"{heads} (LoraConfig.train_head)")
        matched.update(stateful)
    if matched and matched != set(heads):
        raise ValueError(f"{config_path}: PEFT field modules_to_save {entries!r} matches {sorted(matched)} of the "
                         f"classifier heads {heads}; an adapter's own head copy takes all of them")
    return bool(matched)


def _saved_whole(config_path, entry: str, name: str) -> bool:
    """PEFT's test that keeps LoRA off a module in modules_to_save (or inside one); the entry is used
    as a regex there."""
    try:
        return re.match(rf"(^|.*\.){entry}($|\..*)", name) is not None
    except re.error as error:
        raise ValueError(f"{config_path}: PEFT field modules_to_save entry {entry!r} is not a valid regex, as PEFT "
                         f"uses it to keep LoRA off the modules it saves ({error})") from None


def _resolve_targets(config_path, data: dict, names: dict, depth: int) -> tuple:
    """LoraConfig.targets from target_modules, exclude_modules and modules_to_save, resolved as PEFT does."""
    target_modules = data.get("target_modules")
    if target_modules is None:
        raise ValueError(f"{config_path}: PEFT field target_modules is null: PEFT then picks defaults by the "
                         f"transformers model type, which a timm ViT has none of")
    if isinstance(target_modules, str) and target_modules.lower() == "all-linear":
        linears = [name for name, module in names.items() if isinstance(module, nn.Linear)]
        match = lambda name: name in linears  # noqa: E731
    else:
        _names_list(config_path, "target_modules", target_modules)
        match = lambda name: _matches(config_path, "target_modules", target_modules, name)  # noqa: E731
    exclude = data.get("exclude_modules")
    saved = data.get("modules_to_save") or []
    matched = []
    for name in names:
        if exclude and _matches(config_path, "exclude_modules", exclude, name):
            continue
        if any(_saved_whole(config_path, entry, name) for entry in saved):
            continue
        if match(name):
            matched.append(name)
    paths = {f"blocks.{index}.{path}": (index, target) for target, path in TARGET_PATHS.items()
             for index in range(depth)}
    others = [name for name in matched if name not in paths]
    if others:
        kinds = ", ".join(f"{name} ({type(names[name]).__name__})" for name in others[:4])
        raise ValueError(f"{config_path}: PEFT field target_modules {target_modules!r} (with exclude_modules "
                         f"{exclude!r}, modules_to_save {data.get('modules_to_save')!r}) matches {kinds}"
                         f"{' ...' if len(others) > 4 else ''}, which is not one of the blocks' linears "
                         f"{', '.join(TARGET_PATHS.values())}; this package's LoRA adapts only those (a bare 'proj' "
                         f"also matches patch_embed.proj: name them in full, e.g. 'attn.proj')")
    targets = [target for target in TARGETS if any(paths[name][1] == target for name in matched)]
    if not targets:
        raise ValueError(f"{config_path}: PEFT field target_modules {target_modules!r} matches none of the blocks' "
                         f"linears {', '.join(TARGET_PATHS.values())}")
    for target in targets:
        missing = [f"blocks.{index}.{TARGET_PATHS[target]}" for index in range(depth)
                   if f"blocks.{index}.{TARGET_PATHS[target]}" not in matched]
        if missing:
            raise ValueError(f"{config_path}: PEFT field target_modules {target_modules!r} matches "
                             f"{TARGET_PATHS[target]} in some blocks but not {missing[:4]}"
                             f"{' ...' if len(missing) > 4 else ''}; a LoraConfig adapts its targets in every block")
    return tuple(targets)


def read_config(model: nn.Module, data: dict, config_path) -> LoraConfig:
    """The LoraConfig equal to the PEFT LoraConfig `data` (adapter_config.json) on this model;
    ValueError naming the PEFT field for what it cannot express (see the module's docstring).
    Reads the model only."""
    peft_type = data.get("peft_type")
    if peft_type != "LORA":
        raise ValueError(f"{config_path}: PEFT field peft_type is {peft_type!r}; only PEFT's LoRA (\"LORA\") maps to "
                         f"this package's adapters (LoraConfig)")
    for field, why in UNSUPPORTED.items():
        if not _unset(data.get(field)):
            raise ValueError(f"{config_path}: PEFT field {field} = {data[field]!r} is not supported: {why}")
    unknown = [key for key in data if key not in MAPPED and key not in IGNORED and key not in UNSUPPORTED
               and not _unset(data[key])]
    if unknown:
        raise ValueError(f"{config_path}: PEFT field {unknown[0]} = {data[unknown[0]]!r} is not one this reader knows "
                         f"(it knows PEFT {PEFT_VERSION}'s LoraConfig); it may change the adapter's math, so the "
                         f"folder is refused")
    if data.get("bias", "none") != "none":
        raise ValueError(f"{config_path}: PEFT field bias = {data['bias']!r} is not supported: it trains the "
                         f"backbone's biases; this package's LoRA adapters train A and B only (bias \"none\")")
    init = data.get("init_lora_weights", True)
    if isinstance(init, bool) or init == "gaussian":
        init = INITS[init]
    else:
        raise ValueError(f"{config_path}: PEFT field init_lora_weights = {init!r} is not supported: only true, false "
                         f"and \"gaussian\" leave the base weights as they are and map to LoraConfig.init; "
                         f"\"pissa\", \"olora\", \"loftq\", \"corda\" ... rewrite W or stand for a data-driven "
                         f"procedure")
    rank = data.get("r", 8)
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or not 1 <= rank <= MAX_RANK:
        raise ValueError(f"{config_path}: PEFT field r must be an int from 1 to {MAX_RANK} (the fused kernels' "
                         f"limit), got {rank!r}")
    alpha = data.get("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"{config_path}: PEFT field lora_alpha must be a positive finite number, got {alpha!r}")
    dropout = data.get("lora_dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"{config_path}: PEFT field lora_dropout must be a number in [0, 1), got {dropout!r}")
    use_rslora = data.get("use_rslora", False)
    if not isinstance(use_rslora, bool):
        raise ValueError(f"{config_path}: PEFT field use_rslora must be true or false, got {use_rslora!r}")
    names = plain_module_names(model)
    train_head = _resolve_head(config_path, data, names, head_paths(model))
    targets = _resolve_targets(config_path, data, names, len(vit_blocks(model)))
    return LoraConfig(rank=int(rank), alpha=float(alpha), targets=targets, dropout=float(dropout), init=init,
                      train_head=train_head, use_rslora=use_rslora)


def peft_key(key: str) -> str:
    """This package's tensor key (adapter_state's) -> PEFT's: "blocks.0.attn.qkv.lora_A" ->
    "base_model.model.blocks.0.attn.qkv.lora_A.weight"; "head.weight" -> "base_model.model.head.weight"."""
    if key.endswith((".lora_A", ".lora_B")):
        key += ".weight"
    return PEFT_PREFIX + key


_NAMED = re.compile(r"(.*\.lora_[AB])\.([^.]+)\.weight")


def read_state(state: dict, expected: dict, weights_path) -> dict:
    """The tensors of a PEFT adapter_model.safetensors under this package's keys (those of
    `expected`, name -> tensor of the shape the model needs); ValueError naming the file and the
    PEFT key that is missing, unexpected or of another shape."""
    ours = {peft_key(key): key for key in expected}
    renamed, names = {}, set()
    for key, tensor in state.items():
        plain = key
        if key not in ours:
            named = _NAMED.fullmatch(key)
            if named is not None and f"{named[1]}.weight" in ours:  # "...lora_A.<adapter name>.weight"
                plain = f"{named[1]}.weight"
                names.add(named[2])
        if plain in renamed:
            raise ValueError(f"{weights_path}: {key} and {renamed[plain][0]} both hold {plain} (one with an "
                             f"adapter's name in the key); a PEFT file holds one adapter")
        renamed[plain] = (key, tensor)
    if len(names) > 1:
        raise ValueError(f"{weights_path}: its keys name several adapters {sorted(names)}; a PEFT file holds one")
    missing = sorted(set(ours) - set(renamed))
    unexpected = sorted(renamed[plain][0] for plain in set(renamed) - set(ours))
    if missing or unexpected:
        raise ValueError(f"{weights_path}: missing tensors {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                         f"unexpected tensors {unexpected[:8]}{'...' if len(unexpected) > 8 else ''} (PEFT keys; "
                         f"adapter_config.json says which modules they must cover)")
    out = {}
    for plain, (key, tensor) in renamed.items():
        want = expected[ours[plain]].shape
        if tensor.shape != want:
            raise ValueError(f"{weights_path}: {key} has shape {tuple(tensor.shape)}, the model expects {tuple(want)}")
        out[ours[plain]] = tensor
    return out


def _target_regex(targets) -> str:
    """A regex PEFT fullmatches against module names: the blocks' target linears and nothing else."""
    paths = "|".join(re.escape(TARGET_PATHS[target]) for target in targets)
    return rf"blocks\.[0-9]+\.(?:{paths})"


def peft_config(model: nn.Module, config: LoraConfig) -> dict:
    """adapter_config.json for PEFT: the PEFT LoraConfig equal to `config` on this model."""
    heads = head_paths(model) if config.train_head else []
    alpha = int(config.alpha) if float(config.alpha).is_integer() else config.alpha
    return {
        "peft_type": "LORA",
        "peft_version": PEFT_VERSION,
        "auto_mapping": {"base_model_class": type(model).__name__, "parent_library": type(model).__module__},
        "base_model_name_or_path": None,
        "revision": None,
        "task_type": None,
        "inference_mode": True,
        "r": config.rank,
        "lora_alpha": alpha,
        "lora_dropout": config.dropout,
        "use_rslora": config.use_rslora,
        "target_modules": _target_regex(config.targets),
        "modules_to_save": heads or None,
        "init_lora_weights": True if config.init == "lora" else config.init,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": False,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def write(model: nn.Module, name: str, config, state: dict, config_path: Path, weights_path: Path,
          atomic_write: Callable[[Path, Callable[[str], None]], None]) -> None:
    """Write adapter `name` (its tensors `state`, adapter_state's) as a PEFT LoRA folder: the
    weights to weights_path, then the config to config_path, each with atomic_write. ValueError for
    an adapter that is not LoRA, or a model on which PEFT would not match exactly its targets and
    head, before anything is written."""
    from safetensors.torch import save_file

    if not isinstance(config, LoraConfig):
        raise ValueError(f"cannot save adapter {name!r} with format='peft': it is {kind_of(config).noun} "
                         f"({type(config).__name__}); only LoRA adapters (LoraConfig) have a PEFT equivalent")
    data = peft_config(model, config)
    names = plain_module_names(model)
    for head in data["modules_to_save"] or []:  # PEFT matches by suffix: the entry must name this head alone
        found = [path for path in names if _list_match(path, [head])]
        if found != [head]:
            raise ValueError(f"cannot save adapter {name!r} with format='peft': modules_to_save entry {head!r} "
                             f"would match {found} in PEFT, not the head alone")
    # What PEFT's matching makes of the written config; a model without a classifier head has none to save.
    expected = config if data["modules_to_save"] or not config.train_head else replace(config, train_head=False)
    if read_config(model, data, "the PEFT config to write") != expected:
        raise ValueError(f"cannot save adapter {name!r} with format='peft': PEFT would not read back {config}")
    text = json.dumps(data, indent=2, sort_keys=True, allow_nan=False)
    tensors = {peft_key(key): tensor.detach().contiguous().cpu() for key, tensor in state.items()}
    config_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(weights_path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write(config_path, lambda tmp: Path(tmp).write_text(text))

