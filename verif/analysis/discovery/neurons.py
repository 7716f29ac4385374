"""Direct effect of each MLP value vector on the verdict: `logit_yes_no`.

Neuron i of layer l writes `a_i * down_proj.weight[:, i]` (its value vector) into the residual
stream. Read straight through the final norm's weight and the unembedding, as a logit lens does,
the vector raises the Yes variants' logits by `W_U[yes] @ (g * v)` and the No variants' by
`W_U[no] @ (g * v)`. The score is the mean over Yes variants minus the mean over No variants: the
direction in which the vector pushes the verdict per unit of activation. It ignores the norm's
division by the residual's RMS (a positive per-prompt factor, the same for every vector) and every
path through later layers; an lm_head bias would add the same constant to every vector and is left out.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from verif.model.loading import decoder_layers
from verif.model.score import YesNoIds


def value_vectors(model: nn.Module) -> list[torch.Tensor]:
    """Each layer's `down_proj.weight` `[hidden, I]`: column i is neuron i's value vector."""
    return [block.mlp.down_proj.weight.detach() for block in decoder_layers(model)]


@torch.inference_mode()
def logit_yes_no(model: nn.Module, ids: YesNoIds) -> np.ndarray:
    """`[L, I]` float64: mean Yes logit minus mean No logit written by each value vector."""
    unembed = model.get_output_embeddings().weight.detach()
    device = unembed.device
    yes = unembed[torch.tensor(ids.yes, device=device)].double().mean(0)
    no = unembed[torch.tensor(ids.no, device=device)].double().mean(0)
    direction = (yes - no) * model.model.norm.weight.detach().double()  # [hidden]
    rows = [direction @ weight.double() for weight in value_vectors(model)]
    return torch.stack(rows).cpu().numpy()
