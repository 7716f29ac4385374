"""Zero-ablation of attention heads and MLP neurons, with one ablation per batch row.

Head h of layer l writes to the residual stream only through columns [h*d:(h+1)*d] of that layer's
attention output projection; zeroing that slice of its input at every position removes exactly
that head (MISSION.md, item 2). A bias of the projection belongs to no head and stays. Zeroing the
value projection's output instead would remove a key/value head shared by several query heads under
grouped-query attention.

Neuron i of layer l is coordinate i of the MLP down projection's input: zeroing it at every position
removes exactly the value vector `down_proj.weight[:, i]` times its activation.

Head masks are float tensors `[rows, n_layers, n_heads]` (1 keep, 0 ablate), so one forward pass can
mix conditions. Neuron ablations stay sparse (`AblationMasks.neurons`): a dense `[conditions, layers,
intermediate]` mask would cost 577 x 36 x 11008 floats for a single-head sweep that ablates no neuron.
A dense keep-mask is built only for the rows and the layer of one forward call, when one of those
rows ablates a neuron there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from verif.design.conditions import Ablation
from verif.design.heads import Head, validate_heads
from verif.design.neurons import validate_neurons
from verif.model.arch import Arch
from verif.model.families import down_projs, o_projs
from verif.model.placement import Placement
from verif.model.interventions import Edit


def head_masks(
    ablations: Sequence[Ablation | Iterable[Head]], arch: Arch, device="cpu", dtype=torch.float32
) -> torch.Tensor:
    """Stack one keep-mask per condition: `[len(ablations), n_layers, n_heads]`, zeros at ablated heads."""
    masks = torch.ones(len(ablations), arch.n_layers, arch.n_heads, dtype=dtype)
    for row, item in enumerate(ablations):
        for layer, head in Ablation.of(item).heads:
            masks[row, layer, head] = 0
    return masks.to(device)


def apply_head_mask(attn_out: torch.Tensor, mask: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Multiply `[rows, T, H*d]` head outputs by a `[rows, H]` keep-mask (per row, every position)."""
    rows, seq, width = attn_out.shape
    heads = mask.shape[-1]
    scaled = attn_out.view(rows, seq, heads, head_dim) * mask.to(attn_out.dtype)[:, None, :, None]
    return scaled.view(rows, seq, width)


def apply_neuron_mask(acts: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Multiply `[rows, (T,) I]` down-projection inputs by a `[rows, I]` keep-mask (every position)."""
    shape = (mask.shape[0],) + (1,) * (acts.dim() - 2) + (mask.shape[-1],)
    return acts * mask.to(acts.dtype).view(shape)


@dataclass
class AblationMasks:
    """The ablations of C conditions in the form the forward passes read (all on the CPU).

    `heads` `[C, L, H]` keep-masks; `neurons[c]` maps a layer to the neuron ids condition c ablates
    there; `ablated` `[C, L]` says whether condition c ablates anything (head or neuron) at layer l:
    where a condition leaves the shared trunk.
    """

    heads: torch.Tensor
    neurons: list[dict[int, np.ndarray]]
    neuron_layers: np.ndarray  # [C, L] bool: condition c ablates a neuron at layer l
    n_neurons: int

    @classmethod
    def build(cls, ablations: Sequence[Ablation | Iterable[Head]], arch: Arch) -> AblationMasks:
        """Masks of `ablations` (Ablation objects or plain head sets), each checked against `arch`."""
        abls = [Ablation.of(a) for a in ablations]
        for i, a in enumerate(abls):
            validate_heads(a.heads, arch.n_layers, arch.n_heads, what=f"condition {i} heads")
            validate_neurons(a.neurons, arch.n_layers, arch.n_neurons, what=f"condition {i} neurons")
        neurons = []
        neuron_layers = np.zeros((len(abls), arch.n_layers), dtype=bool)
        for c, a in enumerate(abls):
            by_layer: dict[int, list[int]] = {}
            for layer, i in a.neurons:
                by_layer.setdefault(layer, []).append(i)
            neurons.append({layer: np.asarray(ids, dtype=np.int64) for layer, ids in by_layer.items()})
            neuron_layers[c, list(by_layer)] = True
        return cls(head_masks(abls, arch), neurons, neuron_layers, arch.n_neurons)

    @property
    def ablated(self) -> np.ndarray:
        return (self.heads != 1).any(-1).numpy() | self.neuron_layers

    def select(self, conds: Sequence[int] | np.ndarray) -> AblationMasks:
        """The masks of conditions `conds` in that order (one per row, for a batch of rows)."""
        idx = np.asarray(conds, dtype=np.int64)
        return AblationMasks(self.heads[torch.from_numpy(idx)], [self.neurons[c] for c in idx],
                             self.neuron_layers[idx], self.n_neurons)  # fmt: skip

    def neuron_keep(self, conds: np.ndarray, layer: int) -> torch.Tensor | None:
        """A `[rows, I]` keep-mask at `layer` for rows of conditions `conds` (-1: a row that ablates
        nothing), or None when no such row ablates a neuron there."""
        live = conds >= 0
        hit = np.zeros(len(conds), dtype=bool)
        hit[live] = self.neuron_layers[conds[live], layer]
        if not hit.any():
            return None
        keep = torch.ones(len(conds), self.n_neurons)
        for row in np.flatnonzero(hit):
            keep[row, torch.from_numpy(self.neurons[conds[row]][layer])] = 0
        return keep


class HookedAblation:
    """Per-row head and neuron ablation on an unmodified transformers model, through forward pre-hooks
    on each layer's attention output projection and MLP down projection.

    This is the hook path: the model's own forward, hooks that edit one tensor each. It runs every
    supported family, and the fast engine (`verif.model.forward`) is checked against it. Use as a
    context manager and set `.masks` (head keep-masks `[rows, L, H]`) and `.neuron_masks` (layer ->
    `[rows, I]` keep-mask), or call `set`, before each forward. With a `placement` that splits the model,
    `set` keeps a copy of the head masks on each device and each layer's neuron mask on its layer's device.
    """

    def __init__(self, model: nn.Module, arch: Arch, placement: Placement | None = None):
        self.model = model
        self.arch = arch
        self.placement = placement if placement is not None and placement.split else None
        self._masks_on: dict[int, torch.Tensor] | None = None  # slot -> head masks there (a split model)
        self.masks: torch.Tensor | None = None
        self.neuron_masks: dict[int, torch.Tensor] | None = None
        # layer -> the rows' Edit there (verif.model.interventions: non-zero kinds, captures), or None
        self.edit_at: Callable[[int], Edit | None] | None = None
        self._handles: list = []

    def set(self, masks: AblationMasks | None, device: torch.device | str = "cpu") -> None:
        """Ablate row i of the next forward with condition i of `masks` (None: ablate nothing)."""
        if masks is None:
            self.masks = self.neuron_masks = self._masks_on = None
            return
        self.masks = masks.heads.to(device)
        rows = np.arange(len(masks.neurons))
        found = {layer: masks.neuron_keep(rows, layer) for layer in np.flatnonzero(masks.neuron_layers.any(0))}
        self.neuron_masks = {int(layer): m.to(device) for layer, m in found.items() if m is not None}
        if self.placement is not None:  # each layer's masks where that layer lives
            p = self.placement
            self._masks_on = {slot: p.to(self.masks, slot) for slot in set(p.layers)}
            self.neuron_masks = {layer: p.to(m, p.layers[layer]) for layer, m in self.neuron_masks.items()}

    def _edit(self, layer: int) -> Edit | None:
        return None if self.edit_at is None else self.edit_at(layer)

    def _head_hook(self, layer: int):
        def pre_hook(module: nn.Module, args: tuple) -> tuple | None:
            edit = self._edit(layer)
            mask = None if self.masks is None else self.masks[:, layer]
            if mask is not None and bool((mask == 1).all()):
                mask = None
            if mask is None and edit is None:
                return None
            a = args[0]
            if mask is not None:
                on = self.masks if self._masks_on is None else self._masks_on[self.placement.layers[layer]]
                a = apply_head_mask(a, on[:, layer], self.arch.head_dim)
            return (a if edit is None else edit.at_heads(a),) + tuple(args[1:])

        return pre_hook

    def _neuron_hook(self, layer: int):
        def pre_hook(module: nn.Module, args: tuple) -> tuple | None:
            edit = self._edit(layer)
            keep = self.neuron_masks.get(layer) if self.neuron_masks else None
            if keep is None and edit is None:
                return None
            z = args[0] if keep is None else apply_neuron_mask(args[0], keep)
            return (z if edit is None else edit.at_neurons(z),) + tuple(args[1:])

        return pre_hook

    def __enter__(self) -> HookedAblation:
        self._handles = [p.register_forward_pre_hook(self._head_hook(i)) for i, p in enumerate(o_projs(self.model))]
        self._handles += [p.register_forward_pre_hook(self._neuron_hook(i)) for i, p in enumerate(down_projs(self.model))]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.masks = self._masks_on = None
        self.neuron_masks = None
        self.edit_at = None
