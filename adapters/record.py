"""The one record of a model's adapters: which are injected (name -> config, in injection order),
which is active, which is merged, what the context managers run inside their blocks, and the
auxiliary losses of the last forward.

The model holds it (`model._fused_record`) and so does every module an adapter kind swapped in
(adapted blocks, LoRA linears, a LoSA model): each forward reads `running` / `routing` from it,
so no module keeps a flag of its own to get out of step. Only the public calls of
adapters/timm_vit.py change it. It is plain Python state: it moves with the model in deepcopy
and pickling (without the last forward's losses, which belong to that forward's graph), not in
the state dict.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

__all__ = ["Routing", "Frame", "AdapterRecord", "record_of", "refuse_inside_frames"]

ATTRIBUTE = "_fused_record"


@dataclass(frozen=True)
class Routing:
    """task_routing's batch: image b runs the adapters named names[task_of_sample[b]]."""

    names: tuple
    task_of_sample: torch.Tensor  # [batch] int64, on the CPU


@dataclass(frozen=True, eq=False)
class Frame:
    """What runs inside a context manager's block: no adapter (routing None: disable_adapters),
    or each image its own (task_routing). `owner` names the context manager for messages;
    `modules` is what sits at owned module paths inside (module path -> module; the originals
    at the paths it leaves out)."""

    owner: str
    routing: Optional[Routing] = None
    modules: dict = field(default_factory=dict)


class AdapterRecord:
    """See the module docstring. `configs` is name -> config; `active` the name set_adapter made
    active (None: the bare backbone); `merged` the LoRA adapter folded into the weights (always
    the active one, or None); `frames` the open context managers, innermost last; `aux` the last
    forward's auxiliary losses by the (block, adapter, slot) that recorded them."""

    def __init__(self):
        self.configs: dict = {}
        self.active: Optional[str] = None
        self.merged: Optional[str] = None
        self.frames: list[Frame] = []
        self.aux: dict = {}

    @property
    def running(self) -> Optional[str]:
        """The name whose adapters the forward applies; None for none, and inside disable_adapters
        and task_routing (whose adapters run through `routing`)."""
        return None if self.frames else self.active

    @property
    def routing(self) -> Optional[Routing]:
        return self.frames[-1].routing if self.frames else None

    def put_aux(self, key, loss: Optional[torch.Tensor]) -> None:
        """What the adapter at key recorded in this forward: a loss, or None (none this time)."""
        if loss is None:
            self.aux.pop(key, None)
        else:
            self.aux[key] = loss

    def state(self) -> tuple:
        """(configs, active, merged): what the public calls set, for comparing before and after."""
        return dict(self.configs), self.active, self.merged

    def __getstate__(self):
        # The losses belong to the last forward's graph: a copy (deepcopy, pickling) starts without.
        return {**self.__dict__, "aux": {}}

    def __repr__(self) -> str:
        frames = [frame.owner for frame in self.frames]
        return (f"AdapterRecord(adapters={list(self.configs)}, active={self.active!r}, merged={self.merged!r}, "
                f"inside={frames})")


def record_of(model: nn.Module) -> Optional[AdapterRecord]:
    """The model's record, or None for a model without adapters."""
    return model.__dict__.get(ATTRIBUTE)


def refuse_inside_frames(record: Optional[AdapterRecord], call: str) -> None:
    """RuntimeError for a call that would change the record inside a context manager's block:
    on exit the block puts the model back as it was, which would undo part of the call."""
    if record is not None and record.frames:
        owner = record.frames[-1].owner
        raise RuntimeError(f"{call} inside `with {owner}(model)`: the block puts the model's adapters back as they "
                           f"were on exit, which would undo this call halfway; call it after the block")
