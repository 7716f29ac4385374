"""Zero-ablation of attention heads at the input of `o_proj`, with one head set per batch row.

Head h of layer l writes to the residual stream only through columns [h*d:(h+1)*d] of that layer's
`o_proj`; `o_proj` has no bias in the supported families, so zeroing that slice of its input at every
position removes exactly that head (MISSION.md, item 2). Zeroing `v_proj` output would instead remove
a key/value head shared by several query heads under grouped-query attention.

Masks are float tensors `[rows, n_layers, n_heads]` (1 keep, 0 ablate), so one forward pass can mix
conditions: row i is ablated with its own head set.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from verif.design.heads import Head
from verif.model.loading import Arch, o_projs


def head_masks(head_sets: Sequence[Sequence[Head]], arch: Arch, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """Stack one keep-mask per head set: `[len(head_sets), n_layers, n_heads]`, zeros at ablated heads."""
    masks = torch.ones(len(head_sets), arch.n_layers, arch.n_heads, dtype=dtype)
    for row, heads in enumerate(head_sets):
        for layer, head in heads:
            masks[row, layer, head] = 0
    return masks.to(device)


def apply_head_mask(attn_out: torch.Tensor, mask: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Multiply `[rows, T, H*d]` head outputs by a `[rows, H]` keep-mask (per row, every position)."""
    rows, seq, width = attn_out.shape
    heads = mask.shape[-1]
    scaled = attn_out.view(rows, seq, heads, head_dim) * mask.to(attn_out.dtype)[:, None, :, None]
    return scaled.view(rows, seq, width)


class HookedAblation:
    """Per-row head ablation on an unmodified transformers model, through `o_proj` pre-hooks.

    This is the plain path: the model's own forward, hooks that edit one tensor. The fast engine
    (`verif.model.forward`) is checked against it. Use as a context manager and set `.masks` (or None)
    before each forward.
    """

    def __init__(self, model: nn.Module, arch: Arch):
        self.model = model
        self.arch = arch
        self.masks: torch.Tensor | None = None
        self._handles: list = []

    def _hook(self, layer: int):
        def pre_hook(module: nn.Module, args: tuple) -> tuple | None:
            if self.masks is None:
                return None
            mask = self.masks[:, layer]
            if bool((mask == 1).all()):
                return None
            return (apply_head_mask(args[0], mask, self.arch.head_dim),) + tuple(args[1:])

        return pre_hook

    def __enter__(self) -> HookedAblation:
        self._handles = [proj.register_forward_pre_hook(self._hook(i)) for i, proj in enumerate(o_projs(self.model))]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.masks = None
