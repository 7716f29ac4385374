"""Several devices on one CPU: tensors that know which slot they are on, and refuse to meet another slot's.

A split model on a CPU puts every slot on `cpu`, so a forgotten move computes the right numbers and
nothing shows it. `FakeDevices` is a `Placement` whose moves tag a tensor with its slot (`OnSlot`, a
view of the same data); every torch operation on tagged tensors checks that they share one slot, as
CUDA checks they share a device, and tags what it returns. Untagged tensors (made fresh, or the model's
own weights) go with anything. `tag_inputs` tags what the engine copies from the host (token ids,
masks, row plans) with the embeddings' slot, where CUDA would put it, so everything computed from
them starts there; `tag_weights` tags the fast path's layer weights with their layer's slot, so a
layer fed hidden states left on the previous slot fails at its first matmul.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from torch import nn

from verif.model import engine, forward
from verif.model.forward import LayerWeights
from verif.model.placement import Placement


class SlotMismatch(RuntimeError):
    """An operation read tensors from two slots (on GPUs: 'Expected all tensors to be on the same device')."""


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


def _tag(value: Any, slot: int) -> Any:
    """`value` with every tensor in it viewed as an `OnSlot` on `slot` (call with torch functions disabled)."""
    if isinstance(value, torch.Tensor):
        out = value.as_subclass(OnSlot)
        out.slot = slot
        return out
    if type(value) in (tuple, list) and _tensors(value):
        return type(value)(_tag(v, slot) for v in value)
    return value


class OnSlot(torch.Tensor):
    """A tensor on a fake device `slot`."""

    slot: int

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        slots = {t.slot for t in _tensors((args, kwargs)) if isinstance(t, OnSlot) and hasattr(t, "slot")}
        if len(slots) > 1:
            raise SlotMismatch(f"{getattr(func, '__name__', func)} reads tensors on slots {sorted(slots)}")
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
            return _tag(out, slots.pop()) if slots else out


def on_slot(t: torch.Tensor, slot: int) -> OnSlot:
    with torch._C.DisableTorchFunctionSubclass():
        return _tag(t, slot)


@dataclasses.dataclass(frozen=True)
class FakeDevices(Placement):
    """A placement whose slots are all the CPU; a move tags the tensor with its new slot. `current` is the
    slot last moved to: where the fast path's own host copies (`to_device(t, dev)` with `dev` the device
    of the layer it is at) land."""

    current: dict = dataclasses.field(default_factory=lambda: {"slot": 0}, compare=False)

    def to(self, t: torch.Tensor | None, slot: int) -> torch.Tensor | None:
        self.current["slot"] = slot
        return None if t is None else on_slot(t, slot)


def split_evenly(n_layers: int, n_slots: int, norm: int | None = None) -> FakeDevices:
    """`n_slots` CPU slots, each a run of layers; embeddings and LM head on slot 0, the final norm on `norm`
    (default: with the last layer)."""
    layers = tuple(i * n_slots // n_layers for i in range(n_layers))
    return FakeDevices((torch.device("cpu"),) * n_slots, layers, 0, layers[-1] if norm is None else norm, 0)


def tag_weights(weights: list[LayerWeights], placement: Placement) -> list[LayerWeights]:
    """The fast path's layer weights, each layer's tensors tagged with that layer's slot."""
    out = []
    for w, slot in zip(weights, placement.layers):
        fields = {f.name: on_slot(v, slot) for f in dataclasses.fields(w) if isinstance(v := getattr(w, f.name), torch.Tensor)}
        out.append(dataclasses.replace(w, **fields))
    return out


def tag_inputs(monkeypatch: pytest.MonkeyPatch, model: nn.Module, placement: FakeDevices) -> None:
    """Where the forward starts is tagged as CUDA would place it: the engine's host copies (`to_device`:
    token ids, padding) and the outputs of the embeddings and the rotary tables on the embeddings' slot
    (the device map keeps the rotary module there), the fast path's own host copies (row plans, neuron
    masks) on the slot it has moved to. Tensors made by a plain `.to(device)` or a factory stay untagged:
    one CPU cannot say which slot they were meant for."""
    plain = forward.to_device

    def landing(slot_of):
        return lambda t, device: on_slot(plain(t, device), slot_of())

    monkeypatch.setattr(engine, "to_device", landing(lambda: placement.embed))
    monkeypatch.setattr(forward, "to_device", landing(lambda: placement.current["slot"]))
    for module in (model.get_input_embeddings(), model.model.rotary_emb):
        monkeypatch.setattr(module, "forward", lambda *a, f=module.forward, **k: on_slot(f(*a, **k), placement.embed))
