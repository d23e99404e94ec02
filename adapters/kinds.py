"""The interface every adapter kind implements, and the registry that maps configs and file kinds
to kinds. The public calls (adapters/timm_vit.py, adapters/io.py) dispatch through it and never
ask what kind an adapter is; a kind lives in one file (bottleneck.py, lora.py, losa.py) and
registers itself with register_kind.

A kind builds its modules without touching the model (build), attaches them in a step that
cannot fail (Built.attach), reports the modules it added per name (modules: a file prefix ->
module map, also the layout of the saved tensors), and takes them out again (remove). Its
modules read the model's record (adapters/record.py) in their forward to know whether their
name runs; the kind never stores what is active.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

from torch import nn

from . import owned

__all__ = ["AdapterKind", "Built", "register_kind", "unregister_kind", "kind_of", "kind_named", "registered_kinds"]


@dataclass
class Built:
    """The modules a kind built for one adapter, not yet in the model: `modules` maps a file
    prefix to a module, as AdapterKind.modules will once `attach` (which must not fail) has run."""

    modules: dict
    attach: Callable[[], None] = field(repr=False)


class AdapterKind:
    """One kind of adapter. Subclasses set file_kind (the kind in adapter_config.json),
    config_class and noun (for messages: "a LoRA adapter"), and implement build, modules and
    remove; the rest have defaults that refuse or do nothing."""

    file_kind: str = ""
    config_class: type = type(None)
    noun: str = "an adapter"
    # For kinds whose adapters run over adapters already in the model (AdapterFusion): what they
    # need, said after their config class in kind_of's error.
    runs_over: str = ""

    def build(self, model: nn.Module, name: str, config, record) -> Built:
        """Check the model can take this adapter (TypeError/ValueError naming what is wrong) and
        build its modules, without changing the model."""
        raise NotImplementedError

    def modules(self, model: nn.Module, name: str) -> dict:
        """prefix -> module of the adapter named `name` (its parameters train when it is active;
        its state is saved as prefix.key)."""
        raise NotImplementedError

    def remove(self, model: nn.Module, name: str) -> None:
        """Take out what attach added for `name`; modules left with no adapter get their class back."""
        raise NotImplementedError

    def owned_paths(self, model: nn.Module, config) -> list:
        """Module paths the adapter owns a trainable copy of (its head with train_head, the
        backbone's LayerNorms with train_norms)."""
        paths = owned.head_paths(model) if getattr(config, "train_head", False) else []
        if getattr(config, "train_norms", False):
            paths += owned.norm_paths(model)
        return paths

    def summary(self, model: nn.Module, name: str, config) -> str:
        """What inject logs about the adapter, e.g. "LoRA on qkv, rank 8, alpha 8"."""
        return type(config).__name__

    def model_info(self, model: nn.Module, config) -> dict:
        """What the saved adapter needs of the backbone beyond depth, width and head shapes (e.g.
        the shapes of LoRA's target linears), for adapter_config.json's "model"."""
        return {}

    def check_model_info(self, saved: dict, current: dict, source) -> None:
        """ValueError naming what differs when `saved` (model_info of the model the adapter was saved
        from) does not fit `current` (this model's)."""

    def routing_refusal(self, name: str, config) -> Optional[str]:
        """Why task_routing cannot route this adapter per image, or None if it can."""
        return (f"task_routing mixes bottleneck and LoRA adapters; {name!r} is {self.noun} (set_adapter runs it, "
                f"one name per batch)")

    def routing_fields(self, config) -> tuple:
        """The config fields that every adapter task_routing mixes with this one must share (the
        ones its per-image launch stacks along); their other fields (scales) may differ."""
        return ()

    def merge_refusal(self, name: str, config) -> Optional[str]:
        """Why merge_adapters cannot fold this adapter into the weights, or None if it can."""
        return (f"cannot merge adapter {name!r}: it is {self.noun}, not a low-rank update of a linear's weight; only "
                f"LoRA adapters merge")

    def delete_refusal(self, name: str, config, deleted: str) -> Optional[str]:
        """Why adapter `deleted` cannot be deleted while this kind's adapter `name` (with `config`)
        is in the model, e.g. because it runs over it; None if it can."""
        return None

    def merge(self, model: nn.Module, name: str) -> None:
        raise NotImplementedError

    def unmerge(self, model: nn.Module, name: str) -> None:
        raise NotImplementedError

    def check_load(self, model: nn.Module, state_dict, prefix: str, local_metadata: dict) -> None:
        """Refuse (ValueError) to load `state_dict` into the model, before anything of it loads,
        where this kind's modules cannot take it. Called once per kind present, from the model's
        load_state_dict pre-hook (prefix and local_metadata are the model's own there)."""

    def root_metadata(self, model: nn.Module) -> dict:
        """Entries this kind adds to the model's own state-dict metadata (what check_load reads
        back when the model is loaded inside a wrapper, whose children get no full metadata)."""
        return {}


_BY_CONFIG: dict = {}
_BY_FILE: dict = {}


def register_kind(kind: AdapterKind) -> AdapterKind:
    """Make `kind` the kind of its config class and its file kind; returns it."""
    for table, key in ((_BY_CONFIG, kind.config_class), (_BY_FILE, kind.file_kind)):
        if key in table and type(table[key]) is not type(kind):
            raise ValueError(f"{key!r} already belongs to {type(table[key]).__name__}")
        table[key] = kind
    return kind


def unregister_kind(kind: AdapterKind) -> None:
    """Take `kind` out of the registry (models holding its adapters keep working until deleted)."""
    for table, key in ((_BY_CONFIG, kind.config_class), (_BY_FILE, kind.file_kind)):
        if table.get(key) is kind:
            del table[key]


def registered_kinds() -> list:
    return list(_BY_FILE.values())


def kind_of(config) -> AdapterKind:
    """The kind a config builds; TypeError naming the accepted config classes otherwise."""
    kind = _BY_CONFIG.get(type(config))
    if kind is None:
        def named(cls):
            return ("an " if cls.__name__[0] in "AEIOU" else "a ") + cls.__name__

        names = [named(cls) for cls, each in _BY_CONFIG.items() if not each.runs_over]
        accepted = ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else "".join(names)
        accepted += "".join(f" (or {named(cls)} {each.runs_over})" for cls, each in _BY_CONFIG.items() if each.runs_over)
        raise TypeError(f"config must be {accepted}, got {type(config).__name__}")
    return kind


def kind_named(file_kind: str) -> Optional[AdapterKind]:
    return _BY_FILE.get(file_kind)


def file_kinds() -> list:
    return sorted(_BY_FILE)
