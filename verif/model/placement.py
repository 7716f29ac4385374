"""Where a loaded model's parts live, and the moves that make its activations follow its layers.

A worker that owns N GPUs holds its model split by a device map (`verif.model.devicemap`): slot i is
GPU i as the worker sees it (`cuda:i` after Ray's CUDA_VISIBLE_DEVICES renumbering, never a global
id). The fast path (`verif.model.forward`) and the hook path (`verif.model.hooked`) look up each
layer's slot here and move the hidden states, and everything read with them (positions, rotary
tables, masks), when the next layer sits on another slot. Several slots may name one device: every
move still runs (costing nothing), which is how the split is tested on a CPU and on a single GPU.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from verif.model.families import decoder_layers, final_norm


def _slot_of(name: str, device_map: dict[str, int]) -> int:
    """The slot of module `name`: the entry of its longest prefix in the map ("" is the whole model)."""
    parts = name.split(".") if name else []
    for k in range(len(parts), -1, -1):
        prefix = ".".join(parts[:k])
        if prefix in device_map:
            return device_map[prefix]
    raise KeyError(f"device map has no entry for {name!r}")


@dataclass(frozen=True)
class Placement:
    """The slot of each part of a model (`layers[i]` of decoder layer i) and the device of each slot."""

    devices: tuple[torch.device, ...]
    layers: tuple[int, ...]
    embed: int = 0
    norm: int = 0
    head: int = 0

    @classmethod
    def single(cls, device: torch.device | str, n_layers: int) -> Placement:
        return cls((torch.device(device),), (0,) * n_layers)

    @classmethod
    def from_map(cls, model: nn.Module, device_map: dict[str, int], devices: Sequence[torch.device | str]) -> Placement:
        """The placement of `model` under `device_map` (module name -> slot), slot s on `devices[s]`."""
        names = {id(m): n for n, m in model.named_modules()}

        def slot(module: nn.Module) -> int:
            return _slot_of(names[id(module)], device_map)

        head = model.get_output_embeddings()
        return cls(tuple(torch.device(d) for d in devices), tuple(slot(layer) for layer in decoder_layers(model)),
                   slot(model.get_input_embeddings()), slot(final_norm(model)), slot(head))  # fmt: skip

    @classmethod
    def of_model(cls, model: nn.Module) -> Placement:
        """Read from where the tensors are: one slot per distinct device, in forward order (a part that holds
        no tensor, such as a norm replaced by an identity, runs wherever the part before it does)."""
        parts = [model.get_input_embeddings(), *decoder_layers(model), final_norm(model), model.get_output_embeddings()]
        where: list[torch.device] = []
        for p in parts:
            held = next(iter(p.parameters()), None)
            if held is None:
                held = next(iter(p.buffers()), None)
            where.append(held.device if held is not None else where[-1])
        devices = list(dict.fromkeys(where))
        slots = [devices.index(d) for d in where]
        return cls(tuple(devices), tuple(slots[1:-2]), slots[0], slots[-2], slots[-1])

    @property
    def split(self) -> bool:
        """Whether any two parts sit on different slots (else nothing ever moves)."""
        return len({self.embed, self.norm, self.head, *self.layers}) > 1

    def device(self, slot: int) -> torch.device:
        return self.devices[slot]

    def to(self, t: torch.Tensor | None, slot: int) -> torch.Tensor | None:
        """`t` on `slot`'s device; a copy between GPUs is queued without waiting (a copy to the CPU waits,
        so the values are there when read)."""
        if t is None:
            return None
        device = self.devices[slot]
        return t.to(device, non_blocking=device.type == "cuda")

    def to_all(self, value: Any, slot: int) -> Any:
        """Every tensor in `value` (nested tuples, lists, dicts) on `slot`."""
        if isinstance(value, torch.Tensor):
            return self.to(value, slot)
        if isinstance(value, (tuple, list)):
            return type(value)(self.to_all(v, slot) for v in value)
        if isinstance(value, dict):
            return {k: self.to_all(v, slot) for k, v in value.items()}
        return value

    @contextmanager
    def hooks(self, model: nn.Module, stats: Any) -> Iterator[None]:
        """For the model's own forward: the inputs of every decoder layer, of the final norm and of the LM head
        go to its slot first; `stats.device_moves` counts the slot changes.

        Every layer is hooked, not only the first of a slot: the model hands each layer the same position
        tables and masks, made before layer 0, and only the hidden states come from the layer before.
        Those shared keyword arguments are moved once per slot and forward (a cache, cleared when a forward
        starts); the hidden states move where the slot changes. Nothing is hooked when the model is not
        split. The hooks run before any other pre-hook (an ablation hook on a layer's projection then sees
        tensors on that layer's device).
        """
        if not self.split:
            yield
            return
        parts = [*zip(decoder_layers(model), self.layers), (final_norm(model), self.norm),
                 (model.get_output_embeddings(), self.head)]  # fmt: skip
        shared: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}  # (id, slot) -> (tensor, its copy)
        handles = [model.register_forward_pre_hook(lambda *_: shared.clear())]
        previous = self.embed
        for module, slot in parts:
            handles.append(module.register_forward_pre_hook(self._mover(slot, slot != previous, stats, shared),
                                                            with_kwargs=True, prepend=True))  # fmt: skip
            previous = slot
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            shared.clear()

    def _mover(self, slot: int, counts: bool, stats: Any, shared: dict):
        def move_shared(value: Any) -> Any:
            if isinstance(value, torch.Tensor):
                key = (id(value), slot)
                if key not in shared or shared[key][0] is not value:
                    shared[key] = (value, self.to(value, slot))
                return shared[key][1]
            if isinstance(value, (tuple, list)):
                return type(value)(move_shared(v) for v in value)
            return value

        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            if counts:
                stats.device_moves += 1
            moved = {k: self.to_all(v, slot) if k == "hidden_states" else move_shared(v) for k, v in kwargs.items()}
            return self.to_all(args, slot), moved

        return pre_hook
