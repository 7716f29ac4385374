"""The hook path: the model's own forward, batched rows with per-row ablation hooks.

Every supported family runs here, whatever its block computes: heads are zeroed at the attention
output projection's input and neurons at the MLP down projection's input by forward pre-hooks
(`verif.model.ablation.HookedAblation`), the rest is transformers' code as is. Rows are (prompt,
condition) pairs, prompt-major, in chunks of `max_rows`, left padded with position ids that count
real tokens only; only the last position's logits are computed. No layer is shared between rows, so
a sweep costs one full forward per row (the fast path shares the un-ablated trunk). On a model split
over devices each layer's inputs move to its device first (`Placement.hooks`), and each layer's masks
are kept there.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from verif.model.ablation import AblationMasks, HookedAblation
from verif.model.arch import Arch
from verif.model.forward import ForwardStats
from verif.model.interventions import Capture, UnitEdits
from verif.model.placement import Placement


class HookForward:
    """Logits of a unit (prompts x conditions) from the model's own forward, `max_rows` rows per call."""

    def __init__(self, model: nn.Module, arch: Arch, max_rows: int = 64, placement: Placement | None = None):
        self.model = model
        self.arch = arch
        self.max_rows = max_rows
        self.stats = ForwardStats()
        self.placement = placement or Placement.of_model(model)

    @torch.inference_mode()
    def logits(
        self, input_ids: torch.Tensor, attn: torch.Tensor | None, masks: AblationMasks, share_trunk: bool = True,
        edits: UnitEdits | Capture | None = None,
    ) -> Iterator[torch.Tensor]:
        """Last-position logits `[rows, vocab]` chunk by chunk, rows ordered prompt-major (`[P, C]`
        flattened). `attn` None means every prompt has the same length (no mask needed);
        `share_trunk` has no meaning here (every row runs every layer). `edits` gives each chunk's edit
        per layer, applied by the same hooks (non-zero interventions, captures)."""
        n_prompts, n_cond = input_ids.shape[0], len(masks.neurons)
        dev = input_ids.device
        positions = None if attn is None else (attn.cumsum(-1) - 1).clamp(min=0)
        rows = np.arange(n_prompts * n_cond)
        with HookedAblation(self.model, self.arch, self.placement) as hooks, self.placement.hooks(self.model, self.stats):
            for a in range(0, len(rows), self.max_rows):
                chunk = rows[a:a + self.max_rows]
                prompt = torch.from_numpy(chunk // n_cond).to(dev)
                hooks.set(masks.select(chunk % n_cond), dev)
                if edits is not None:
                    conds, prompts = chunk % n_cond, chunk // n_cond
                    hooks.edit_at = lambda layer, c=conds, p=prompts: edits.at(layer, c, p)
                kwargs = {} if attn is None else {"attention_mask": attn[prompt], "position_ids": positions[prompt]}
                out = self.model(input_ids=input_ids[prompt], use_cache=False, logits_to_keep=1, **kwargs)
                self.stats.row_layers += len(chunk) * self.arch.n_layers
                self.stats.row_positions += len(chunk) * self.arch.n_layers * input_ids.shape[1]
                yield out.logits[:, -1]
