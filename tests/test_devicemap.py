"""The device map as data: which GPU holds which part, from hand-made sizes and memory (no model, no GPU).

Sizes are in MB (1e6 bytes) of a Qwen2.5-like model: tied embeddings of 400, 36 layers of 100, a final
norm of 1, rotary tables of 0. The optimum is known by hand where the numbers make it plain, and by
trying every contiguous cut elsewhere.
"""

from __future__ import annotations

import itertools
import random

import pytest

from jobs.runtime.pool import workers_for
from verif.model.devicemap import DoesNotFitError, balanced_map, loads, min_room

MB = 10**6
LAYERS = 36
EMBED, HEAD = "model.embed_tokens", "lm_head"
TIED = ((EMBED, HEAD),)


def qwen_like(embed: int = 400, head: int = 0) -> dict[str, int]:
    """Forward order, as `verif.model.memory.part_sizes` lists a model (a tied head costs 0: counted once)."""
    return {EMBED: embed * MB, **{f"model.layers.{i}": 100 * MB for i in range(LAYERS)}, "model.norm": 1 * MB,
            "model.rotary_emb": 0, HEAD: head * MB}


def layer_slots(device_map: dict[str, int]) -> list[int]:
    return [device_map[f"model.layers.{i}"] for i in range(LAYERS)]


def assert_valid(device_map: dict[str, int], units: dict[str, int], rooms: list[int], tied=TIED) -> dict[int, int]:
    """Every part placed on one of the GPUs, in forward order (tied parts with their leader), within each room."""
    assert set(device_map) == set(units)
    order = [device_map[n] for n in units if not any(n in g[1:] for g in tied)]
    assert order == sorted(order) and set(order) <= set(range(len(rooms)))
    used = loads(device_map, units, tied)
    assert all(used[g] <= rooms[g] for g in used), (used, rooms)
    return used


def best_ratio(units: dict[str, int], rooms: list[int], tied=TIED) -> float:
    """The least possible fullest-GPU share over every contiguous cut (brute force)."""
    sizes = [v for n, v in units.items() if not any(n in g[1:] for g in tied)]
    best = float("inf")
    for cuts in itertools.combinations(range(len(sizes) + 1), len(rooms) - 1):
        bounds = (0, *cuts, len(sizes))
        share = max(sum(sizes[a:b]) / r for a, b, r in zip(bounds, bounds[1:], rooms))
        best = min(best, share)
    return best


@pytest.mark.parametrize("n_gpus, layers_per_gpu, fullest", [
    (2, [16, 20], 2001),  # 400 + 16 x 100 | 20 x 100 + 1
    (4, [6, 10, 10, 10], 1001),  # 400 + 6 x 100 | 1000 | 1000 | 1000 + 1
    (8, [1, 5, 5, 5, 5, 5, 5, 5], 501),  # every GPU used: 400 + 100 | 500 x 6 | 500 + 1
])
def test_equal_gpus_split_as_evenly_as_layers_allow(n_gpus, layers_per_gpu, fullest):
    units, rooms = qwen_like(), [80_000 * MB] * n_gpus
    device_map = balanced_map(units, rooms, TIED)
    used = assert_valid(device_map, units, rooms)
    slots = layer_slots(device_map)
    assert [slots.count(g) for g in range(n_gpus)] == layers_per_gpu
    assert max(used.values()) == fullest * MB == min_room(units, n_gpus, TIED)
    assert device_map[HEAD] == device_map[EMBED] == 0  # tied: the LM head is the embedding matrix
    assert device_map["model.norm"] == n_gpus - 1


def test_uneven_memory_gets_weights_in_proportion():
    units, rooms = qwen_like(), [3000 * MB, 1000 * MB, 3000 * MB, 3000 * MB]
    device_map = balanced_map(units, rooms, TIED)
    used = assert_valid(device_map, units, rooms)
    share = max(used[g] / rooms[g] for g in used)
    assert share == pytest.approx(best_ratio(units, rooms), rel=1e-9)
    assert used[1] < min(used[0], used[2], used[3]) / 2  # the small GPU holds less than half of any other's
    assert share < 0.45  # 4001 / 10000 = 0.40 is the bound: near it


def test_random_sizes_and_rooms_reach_the_optimum():
    rng = random.Random(0)
    for _ in range(25):
        n_layers = rng.randint(3, 12)
        units = {EMBED: rng.randint(1, 50), **{f"model.layers.{i}": rng.randint(1, 30) for i in range(n_layers)},
                 "model.norm": 1, HEAD: 0}
        rooms = [rng.randint(60, 200) for _ in range(rng.randint(1, 4))]
        try:
            device_map = balanced_map(units, rooms, TIED)
        except DoesNotFitError:
            assert best_ratio(units, rooms) > 1
            continue
        used = assert_valid(device_map, units, rooms)
        assert max(used[g] / rooms[g] for g in used) == pytest.approx(best_ratio(units, rooms), rel=1e-8)


def test_untied_head_goes_last_and_tied_parts_stay_together():
    units = qwen_like(head=400)  # an untied LM head: its own 400 MB, after the norm
    device_map = balanced_map(units, [80_000 * MB] * 4, tied=())
    assert_valid(device_map, units, [80_000 * MB] * 4, tied=())
    assert device_map[HEAD] == 3 and device_map[EMBED] == 0
    # tied even where the head comes last in forward order: it follows the embeddings to GPU 0
    tied = balanced_map(qwen_like(), [2200 * MB, 2200 * MB], TIED)
    assert tied[HEAD] == tied[EMBED] == 0 and tied["model.norm"] == 1


def test_what_does_not_fit_is_refused_with_the_numbers():
    with pytest.raises(DoesNotFitError, match=r"4.00 GB of weights \(largest part 0.40 GB\) do not fit 2 GPU\(s\) "
                                              r"with room for 1.50, 1.50 GB"):
        balanced_map(qwen_like(), [1500 * MB] * 2, TIED)
    with pytest.raises(DoesNotFitError, match="largest part 0.40 GB"):  # the embeddings fit no GPU whole
        balanced_map(qwen_like(), [300 * MB] * 20, TIED)
    with pytest.raises(DoesNotFitError):  # a GPU whose room went to the reserve
        balanced_map(qwen_like(), [80_000 * MB, -1], TIED)


def test_workers_per_node():
    """`ray.workers: auto`: a worker's GPUs are on one node, so a node's spare GPUs do not add up across nodes."""
    assert workers_for([8, 8], 1) == 16
    assert workers_for([8, 8], 2) == 8
    assert workers_for([8, 4, 2], 4) == 3
    assert workers_for([3, 3], 2) == 2  # not 6 // 2 = 3: no worker can take one GPU of each node
    assert workers_for([1, 1], 0.5) == 4
    assert workers_for([0, 0], 1) == 0 and workers_for([8], 0) == 0
