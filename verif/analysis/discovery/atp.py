"""Attribution patching (AtP): a first-order estimate of every component's ablation effect at once.

For a component with activation z (a head's slice of the o_proj input, or one coordinate of the
down_proj input: the coefficient of that neuron's value vector), zero-ablation changes M by about

    atp = sum over prompts and positions of (0 - z) . dM/dz

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
        device = next(model.parameters()).device
        self.heads = torch.zeros(arch.n_layers, arch.n_heads, dtype=torch.float64, device=device)
        self.neurons = torch.zeros(arch.n_layers, arch.intermediate_size, dtype=torch.float64, device=device)
        self.mask: torch.Tensor | None = None  # [B, T] float64, 1 at real tokens
        self._handles: list = []

    def _reducer(self, layer: int, per_head: bool, z: torch.Tensor, mask: torch.Tensor):
        def reduce(grad: torch.Tensor) -> None:
            contrib = -(z.detach().double() * grad.double()) * mask[:, :, None]  # [B, T, width]
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


def atp_sums(
    model: nn.Module,
    arch: Arch,
    token_ids: Sequence[Sequence[int]],
    ids: YesNoIds,
    pad_id: int,
    batch_size: int = 8,
) -> PromptSums:
    """AtP sums over these prompts: `atp_heads` `[L, H]`, `atp_neurons` `[L, I]` and `log_odds` (scalar).

    `.mean("atp_heads")` of the (combined) result is the AtP estimate of each head's effect on M,
    `.mean("log_odds")` is M itself.
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
        for batch in length_batches(token_ids, batch_size):
            kwargs = padded([token_ids[i] for i in batch], pad_id, device)
            grads.mask = kwargs["attention_mask"].to(torch.float64)
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
