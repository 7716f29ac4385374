"""Attribution patching (AtP): a first-order estimate of every component's ablation effect at once.

For a component with activation z (a head's slice of the o_proj input, or one coordinate of the
down_proj input: the coefficient of that neuron's value vector), replacing z by z_ref changes M by about

    atp = sum over prompts and positions of (z_ref - z) . dM/dz

with z_ref = 0 for zero-ablation, the reference prompts' mean for mean-ablation, or the prompt's partner's
activation at the same position for resample (activation patching; Nanda 2023, Kramar et al. 2024). The
partners' activations come from an unablated forward of each batch's partners, padded as the batch is.

One forward and one backward per batch give it for every head and every neuron. M is a mean over
prompts, so a batch returns its sums (`PromptSums`) of `(0 - z) . dS/dz` with S the batch's summed
log-odds; the driver adds all batches and divides by the prompt count once.

Gradients are taken through the model's own forward (transformers), with hooks that only read: a
pre-hook on each o_proj and down_proj registers a gradient hook on its input, which reduces the
product to per-head and per-neuron sums as soon as the gradient arrives (no gradient is kept).
Padding positions are masked out of the sums. The model must be float32 or float64: in bf16 a
gradient has 3 significant digits, so a model that scores in bf16 needs a float32 copy for this.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from verif.analysis.discovery.inputs import length_batches, padded
from verif.analysis.discovery.metric import log_odds
from verif.analysis.discovery.sums import PromptSums
from verif.model.loading import Arch, decoder_layers
from verif.model.score import YesNoIds

GRADIENT_DTYPES = (torch.float32, torch.float64)


class _ActivationGrads:
    """Hooks that accumulate `sum (0 - z) . dS/dz` per head and per neuron, in float64, on the model's device."""

    def __init__(self, model: nn.Module, arch: Arch):
        self.model = model
        self.arch = arch
        self.z_ref: dict[tuple[bool, int], torch.Tensor] = {}  # (per_head, layer) -> broadcastable to z (none: 0)
        device = next(model.parameters()).device
        self.heads = torch.zeros(arch.n_layers, arch.n_heads, dtype=torch.float64, device=device)
        self.neurons = torch.zeros(arch.n_layers, arch.intermediate_size, dtype=torch.float64, device=device)
        self.mask: torch.Tensor | None = None  # [B, T] float64, 1 at real tokens
        self._handles: list = []

    def _reducer(self, layer: int, per_head: bool, z: torch.Tensor, mask: torch.Tensor):
        ref = self.z_ref.get((per_head, layer))

        def reduce(grad: torch.Tensor) -> None:
            diff = -z.detach().double() if ref is None else ref.double() - z.detach().double()
            contrib = (diff * grad.double()) * mask[:, :, None]  # [B, T, width]
            if per_head:
                rows, seq, _ = contrib.shape
                self.heads[layer] += contrib.view(rows, seq, self.arch.n_heads, self.arch.head_dim).sum((0, 1, 3))
            else:
                self.neurons[layer] += contrib.sum((0, 1))

        return reduce

    def _pre_hook(self, layer: int, per_head: bool):
        def hook(module: nn.Module, args: tuple) -> None:
            z = args[0]
            if z.requires_grad:
                z.register_hook(self._reducer(layer, per_head, z, self.mask))

        return hook

    def __enter__(self) -> _ActivationGrads:
        for i, block in enumerate(decoder_layers(self.model)):
            self._handles.append(block.self_attn.o_proj.register_forward_pre_hook(self._pre_hook(i, True)))
            self._handles.append(block.mlp.down_proj.register_forward_pre_hook(self._pre_hook(i, False)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def require_gradient_dtype(model: nn.Module) -> None:
    """AtP needs float32 gradients at least: refuse a lower-precision model before any work."""
    dtype = next(model.parameters()).dtype
    if dtype not in GRADIENT_DTYPES:
        raise ValueError(
            f"attribution patching needs a float32 or float64 model for its gradients, got {dtype}; "
            "load a float32 copy for the gradient pass (load_model(..., dtype='float32'))"
        )


@torch.no_grad()
def _inputs(model: nn.Module, kwargs: dict) -> dict[tuple[bool, int], torch.Tensor]:
    """Every layer's o_proj and down_proj input in the model's own unablated forward of a padded batch."""
    got: dict[tuple[bool, int], torch.Tensor] = {}
    handles = []
    for i, block in enumerate(decoder_layers(model)):
        for per_head, mod in ((True, block.self_attn.o_proj), (False, block.mlp.down_proj)):
            handles.append(mod.register_forward_pre_hook(
                lambda m, args, key=(per_head, i): got.__setitem__(key, args[0].detach().clone())))
    try:
        model(**kwargs, logits_to_keep=1, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return got


def atp_sums(
    model: nn.Module,
    arch: Arch,
    token_ids: Sequence[Sequence[int]],
    ids: YesNoIds,
    pad_id: int,
    batch_size: int = 8,
    means: dict[tuple[str, int], np.ndarray] | None = None,
    partners: Sequence[Sequence[int]] | None = None,
) -> PromptSums:
    """AtP sums over these prompts: `atp_heads` `[L, H]`, `atp_neurons` `[L, I]` and `log_odds` (scalar).

    `.mean("atp_heads")` of the (combined) result is the AtP estimate of each head's effect on M,
    `.mean("log_odds")` is M itself. z_ref is 0, or `means[(site, layer)]` (the full o_proj / down_proj
    input width, `verif.model.interventions.ReferenceMeans.mean` over every head and neuron), or the
    activations of `partners[i]` (prompt i's partner, as long as prompt i).
    """
    require_gradient_dtype(model)
    if not token_ids:
        raise ValueError("atp_sums: no prompts given")
    device = next(model.parameters()).device
    embed = model.get_input_embeddings()
    # Everything, the accumulators included, is made outside any inference mode of the caller:
    # inference tensors can be neither part of a graph nor updated in place outside that mode.
    with torch.inference_mode(False), torch.enable_grad(), _ActivationGrads(model, arch) as grads:
        total = torch.zeros((), dtype=torch.float64, device=device)
        if means is not None:
            dtype = next(model.parameters()).dtype
            grads.z_ref = {(site == "heads", layer): torch.as_tensor(v, dtype=dtype, device=device)
                           for (site, layer), v in means.items()}
        for batch in length_batches(token_ids, batch_size):
            kwargs = padded([token_ids[i] for i in batch], pad_id, device)
            grads.mask = kwargs["attention_mask"].to(torch.float64)
            if partners is not None:
                if any(len(partners[i]) != len(token_ids[i]) for i in batch):
                    raise ValueError("atp_sums: a partner is not as long as its prompt; positions would not match")
                grads.z_ref = _inputs(model, padded([partners[i] for i in batch], pad_id, device))
            # A leaf that requires grad makes every activation downstream part of the graph while the
            # weights stay frozen.
            embeds = embed(kwargs.pop("input_ids")).detach().requires_grad_(True)
            out = model(inputs_embeds=embeds, **kwargs, logits_to_keep=1, use_cache=False)
            batch_sum = log_odds(out.logits[:, -1], ids).sum()
            torch.autograd.grad(batch_sum, embeds)  # the hooks collect what is needed on the way
            total += batch_sum.detach()
    return PromptSums(
        {
            "atp_heads": grads.heads.cpu().numpy(),
            "atp_neurons": grads.neurons.cpu().numpy(),
            "log_odds": total.cpu().numpy(),
        },
        len(token_ids),
    )
