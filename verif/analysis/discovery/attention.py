"""The study's head heuristic: how much the last position attends to copies of the target number.

The study (Part III) picked heads by the attention probability from the position where the verdict
is formed onto earlier copies of the target number's tokens. Here: for each head, the attention
probability from the prompt's last position to every token that spells the target number, summed
over those tokens and averaged over prompts (`attn_to_target`).

Which tokens count: every whole-number occurrence of the target in the prompt text before the last
token. In the study's prompt that is both statements of the task ("... equals 36.") and any place the
attempt writes the number (its claimed result, an intermediate value or an operand equal to it):
the model cannot tell copies apart by their origin, and the study counted copies, not sentences.
A number that merely contains the target's digits (136, 3.6) does not count. Tokens are found from
the tokenizer's character offsets, so multi-digit numbers split into single-digit tokens (Qwen2,
Llama 3, SmolLM2) are covered token by token, and a token that also holds a leading space counts.

Attention probabilities exist only in the eager attention implementation, so this pass switches the
model to it for its own forward and back afterwards; the scoring path never computes them. In a bf16
model the probabilities are bf16 (about 3 significant digits): enough for a ranking heuristic.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import nn

from verif.analysis.discovery.inputs import same_length_batches
from verif.analysis.discovery.sums import PromptSums
from verif.model.loading import Arch, decoder_layers


def target_spans(text: str, target: int) -> list[tuple[int, int]]:
    """Character spans of `target` written as a whole number (not inside 136, 3.6 or 36.5)."""
    pattern = re.compile(rf"(?<![\d.])(?<!\d\.){re.escape(str(int(target)))}(?!\d)(?!\.\d)")
    return [m.span() for m in pattern.finditer(text)]


def target_token_positions(text: str, target: int, offsets: Sequence[tuple[int, int]]) -> list[int]:
    """Token positions (before the last token) whose characters overlap a copy of the target.

    `offsets` are the tokenizer's `(start, end)` character offsets of each token of `text`. A prompt
    without any copy is an error: its score would silently be zero.
    """
    spans = target_spans(text, target)
    last = len(offsets) - 1
    positions = [
        i for i, (start, end) in enumerate(offsets)
        if i < last and end > start and any(start < s_end and end > s_start for s_start, s_end in spans)
    ]
    if not positions:
        raise ValueError(f"the prompt contains no copy of the target {target} before its last token: {text[:80]!r}...")
    return positions


def encode_with_target_positions(
    tokenizer, prompts: Sequence[str], targets: Sequence[int]
) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of each prompt (no special tokens, as the scorer encodes them) and its target positions."""
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    all_ids, all_positions = [], []
    for text, target in zip(prompts, targets):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        all_ids.append(list(enc["input_ids"]))
        all_positions.append(target_token_positions(text, target, enc["offset_mapping"]))
    return all_ids, all_positions


class _LastRowAttention:
    """Forward hooks keeping each layer's attention probabilities from the last query position."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.rows: dict[int, torch.Tensor] = {}  # layer -> [B, H, T]
        self._handles: list = []
        self._previous: str | None = None

    def _hook(self, layer: int):
        def hook(module: nn.Module, args: tuple, output: tuple) -> None:
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if weights is None:
                raise RuntimeError(f"layer {layer}: the attention module returned no probabilities")
            self.rows[layer] = weights[:, :, -1].detach()

        return hook

    def __enter__(self) -> _LastRowAttention:
        self._previous = self.model.config._attn_implementation
        self.model.set_attn_implementation("eager")
        if self.model.config._attn_implementation != "eager":
            raise RuntimeError(f"{type(self.model).__name__} cannot switch to eager attention: no probabilities")
        self._handles = [block.self_attn.register_forward_hook(self._hook(i)) for i, block in enumerate(decoder_layers(self.model))]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.model.set_attn_implementation(self._previous)


@torch.inference_mode()
def attn_to_target_sums(
    model: nn.Module,
    arch: Arch,
    token_ids: Sequence[Sequence[int]],
    target_positions: Sequence[Sequence[int]],
    batch_size: int = 8,
) -> PromptSums:
    """Sums over prompts of each head's last-position attention to the target tokens: `attn_to_target` `[L, H]`."""
    if not token_ids or len(token_ids) != len(target_positions):
        raise ValueError(f"attn_to_target_sums: {len(token_ids)} prompts, {len(target_positions)} position lists")
    device = next(model.parameters()).device
    total = torch.zeros(arch.n_layers, arch.n_heads, dtype=torch.float64, device=device)
    with _LastRowAttention(model) as attention:
        for batch in same_length_batches(token_ids, batch_size):  # unpadded: see `inputs`
            input_ids = torch.tensor([token_ids[i] for i in batch], device=device)
            keys = torch.zeros(input_ids.shape, dtype=torch.float64, device=device)
            for row, i in enumerate(batch):
                keys[row, list(target_positions[i])] = 1.0
            model(input_ids=input_ids, logits_to_keep=1, use_cache=False)
            for layer in range(arch.n_layers):
                total[layer] += torch.einsum("bht,bt->h", attention.rows[layer].double(), keys)
    return PromptSums({"attn_to_target": total.cpu().numpy()}, len(token_ids))
