"""Which prompts a discovery chooses its components on, and which it keeps to test them on.

A ranking and its top-k sets chosen on some prompts and then tested on the same prompts give an
optimistic p-value: whatever noise made a set look strong is counted again as evidence. So the
prompts are split once, before anything is scored: the *selection half* ranks the components and
picks the sets, the *held-out half* only scores them. The split is stratified by label (correct and
incorrect attempts are held out in the same proportion, so both halves can be averaged the same
way) and seeded: within each label, `round(fraction * n)` prompts chosen by a seeded permutation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

# The split's own random stream under discover.seed (the random sets and the probes' split use others).
SPLIT_STREAM = 20261204


def holdout_mask(labels: Sequence[bool], fraction: float, seed: int,
                 pair_ids: Sequence[int | None] | None = None) -> list[bool]:
    """True for each held-out prompt: within each label, floor(fraction * n + 1/2) of its n prompts,
    drawn by a permutation seeded with (seed, SPLIT_STREAM, label).

    With counterfactual pairs (`pair_ids`, every prompt in one), whole pairs are held out instead,
    floor(fraction * n_pairs + 1/2) of them by a permutation seeded with (seed, SPLIT_STREAM, 2): a pair is
    one correct and one incorrect attempt, so the split stays stratified, and a prompt and the partner it
    is patched from are never in different halves."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"discover.holdout: {fraction!r} must be in [0, 1)")
    if pair_ids is not None and len(pair_ids) and all(p is not None for p in pair_ids):
        pairs = sorted(set(pair_ids))
        count = math.floor(fraction * len(pairs) + 0.5)
        order = np.random.default_rng([seed, SPLIT_STREAM, 2]).permutation(len(pairs))
        chosen = {pairs[j] for j in order[:count]}
        return [p in chosen for p in pair_ids]
    labels = [bool(label) for label in labels]
    held = [False] * len(labels)
    for label in (True, False):
        members = [i for i, lab in enumerate(labels) if lab == label]
        count = math.floor(fraction * len(members) + 0.5)
        order = np.random.default_rng([seed, SPLIT_STREAM, int(label)]).permutation(len(members))
        for j in order[:count]:
            held[members[j]] = True
    return held
