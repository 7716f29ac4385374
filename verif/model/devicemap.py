"""Which GPU of a worker holds which part of a model: a device map built from sizes and memory alone.

A model split over a worker's N GPUs runs its decoder layers in order, one GPU after another, so a
map is a cut of the ordered parts (embeddings, layer 0 ... layer L-1, final norm, LM head) into N
contiguous runs, one per GPU, each within that GPU's room (its free memory less what scoring needs
there besides weights: `verif.model.memory`). Tied parts (an LM head sharing the embedding matrix) go
where their first part goes and cost nothing more.

The cut minimises the fullest GPU's share of its room: a binary search on that share, each step a
greedy fill (which is optimal for cutting an ordered list into ordered bins). With equal GPUs that is
the most even split; with uneven ones each GPU gets weights in proportion to its room. accelerate's
own `get_balanced_memory` + `infer_auto_device_map` were tried first: on a hand-made 36-layer model
on 8 equal GPUs they left GPUs empty (equal shares plus a 1.25-layer buffer, and a layer's worth held
back on GPU 0 for offloading), and shares ignore uneven memory. accelerate still loads and dispatches
the model from this map (`from_pretrained(device_map=...)`, `verif.model.loading`).

Pure: numbers in, a dict out; tested on hand-made sizes.
"""

from __future__ import annotations

from collections.abc import Sequence

GB = 1e9


class DoesNotFitError(ValueError):
    """A model that cannot fit a worker's GPUs, with the numbers in the message."""


def _fill(sizes: Sequence[int], caps: Sequence[float]) -> list[int] | None:
    """Greedy: each part on the current GPU while it fits its capacity, else on the next; None if N run out."""
    slot, load, out = 0, 0, []
    for size in sizes:
        while load + size > caps[slot]:
            slot, load = slot + 1, 0
            if slot == len(caps):
                return None
        load += size
        out.append(slot)
    return out


def _order(units: dict[str, int], tied: Sequence[Sequence[str]]) -> tuple[list[str], dict[str, str]]:
    """The parts that are placed in order, and each tied follower's leader (the first of its group in order)."""
    names = list(units)
    follows = {}
    for group in tied:
        group = sorted(group, key=names.index)
        follows.update({name: group[0] for name in group[1:]})
    return [n for n in names if n not in follows], follows


def balanced_map(units: dict[str, int], rooms: Sequence[int], tied: Sequence[Sequence[str]] = ()) -> dict[str, int]:
    """`{part: GPU index}` for `units` (part name -> bytes, in forward order; a tied follower's bytes are
    counted with its leader) over GPUs with `rooms` bytes each; raises `DoesNotFitError` with the numbers.

    The fullest GPU's weights / room is as small as a contiguous cut allows (to 1e-9 of it).
    """
    if not rooms:
        raise ValueError("balanced_map needs at least one GPU")
    placed, follows = _order(units, tied)
    sizes = [units[n] for n in placed]
    total = sum(sizes)
    if any(r <= 0 for r in rooms) or _fill(sizes, rooms) is None:
        raise DoesNotFitError(
            f"{total / GB:.2f} GB of weights (largest part {max(sizes) / GB:.2f} GB) do not fit {len(rooms)} GPU(s) "
            f"with room for {', '.join(f'{r / GB:.2f}' for r in rooms)} GB"
        )
    lo, hi = 0.0, 1.0  # the share of its room the fullest GPU uses: infeasible at lo, feasible at hi
    while hi - lo > 1e-9:
        mid = (lo + hi) / 2
        if _fill(sizes, [mid * r for r in rooms]) is None:
            lo = mid
        else:
            hi = mid
    slots = _fill(sizes, [hi * r for r in rooms])
    out = dict(zip(placed, slots))
    out.update({name: out[leader] for name, leader in follows.items()})
    return {name: out[name] for name in units}


def min_room(units: dict[str, int], n_gpus: int, tied: Sequence[Sequence[str]] = ()) -> int:
    """The least room per GPU (bytes, equal GPUs) that holds `units` split over `n_gpus`."""
    placed, _ = _order(units, tied)
    sizes = [units[n] for n in placed]
    lo, hi = max(sizes) - 1, sum(sizes)  # lo does not fit, hi does
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _fill(sizes, [mid] * n_gpus) is None:
            lo = mid
        else:
            hi = mid
    return hi


def loads(device_map: dict[str, int], units: dict[str, int], tied: Sequence[Sequence[str]] = ()) -> dict[int, int]:
    """Bytes of weights on each GPU of a map (tied followers cost nothing)."""
    _, follows = _order(units, tied)
    out: dict[int, int] = {}
    for name, slot in device_map.items():
        out[slot] = out.get(slot, 0) + (0 if name in follows else units[name])
    return out
