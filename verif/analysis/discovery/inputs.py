"""Model inputs for the discovery passes: length-sorted, left-padded batches.

Sorting by token length keeps padding (wasted work in a forward and a backward) small; every score
is a sum over prompts, so the order does not change results.

Left padding is exact in the model's SDPA path, but not in its eager attention path for float64
models: eager takes the softmax in float32, where the mask value `finfo(float64).min` of a padded
query row becomes -inf, the row turns NaN, and a 0 weight times that NaN spreads it to real rows in
the next layer. The attention pass therefore batches only prompts of one length.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from verif.model.score import left_pad


def _by_length(token_ids: Sequence[Sequence[int]], batch_size: int) -> list[int]:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    return sorted(range(len(token_ids)), key=lambda i: (len(token_ids[i]), i))


def length_batches(token_ids: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    """Prompt indices grouped `batch_size` at a time, in order of token length."""
    order = _by_length(token_ids, batch_size)
    return [order[a:a + batch_size] for a in range(0, len(order), batch_size)]


def same_length_batches(token_ids: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    """Prompt indices grouped by exact token length, at most `batch_size` at a time: batches that need
    no padding (for a pass whose output would be spoiled by padded rows)."""
    batches: list[list[int]] = []
    for i in _by_length(token_ids, batch_size):
        last = batches[-1] if batches else None
        if last and len(last) < batch_size and len(token_ids[last[0]]) == len(token_ids[i]):
            last.append(i)
        else:
            batches.append([i])
    return batches


def padded(token_ids: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Keyword arguments of a transformers forward: left-padded ids, mask, and positions of real tokens."""
    input_ids, mask, positions = left_pad(token_ids, pad_id, device)
    return {"input_ids": input_ids, "attention_mask": mask, "position_ids": positions}
