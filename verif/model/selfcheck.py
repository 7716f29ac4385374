"""A worker's check, before its first shard, that the fast path computes what the model computes.

The fast path re-implements each family's decoder block (`verif.model.forward`). Tests pin it to the
installed transformers; a worker may run another version, or a checkpoint whose block differs in a
way no config key shows. So a worker scores one real prompt under no ablation, one head and one
neuron with the fast path and with the hook path (the model's own forward with ablation hooks) and
compares the log-odds.

Why raise rather than fall back to the hook path: a disagreement means one of the two paths is wrong
for this model, and nothing says which (a transformers change could as well move the point the hooks
edit). Falling back would hide that, and change the sweep's speed without a word. A stopped sweep
with both numbers in the error is what a researcher can act on; `engine.path: hook` then runs the
model's own forward knowingly.

The comparison runs in float32 whatever the model's dtype: in bf16 the two paths already differ by
~0.1 in log-odds from rounding alone (benchmarks/results/gpu_throughput_h200.json: 0.023 in
p_yes_norm), which would hide most errors. bf16 and fp16 weights convert to float32 and back exactly,
so the model is cast in place for the check and restored bit for bit; where the float32 copy would
not fit in free GPU memory the check is skipped with a warning.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from verif.design.conditions import Ablation
from verif.model.engine import EngineOptions, Scorer, choose_path
from verif.model.loading import LoadedModel
from verif.model.score import YesNoIds

UNIT_ROUNDOFF_F32 = 2.0**-24
# Rounding of a float32 forward: a block's dot products over `hidden` terms carry a relative error of
# ~sqrt(hidden) * u, and L blocks add up like a random walk, ~sqrt(L * hidden) * u relative on the
# residual stream; logits are O(10) times the normed state. The tests allow 16x that between the two
# paths (tests/support/families.py); a worker stops a sweep on failure, so it allows 4x more. That is
# ~5e-4 x (1 + |log-odds|) for SmolLM2 and ~1e-3 x (1 + |log-odds|) for Qwen2.5-3B, 100x or more above
# the differences measured between the paths, while a wrong block (a dropped bias moved p_yes_norm by
# 0.19 in issue 9) fails by orders of magnitude.
SAFETY = 64.0


class SelfCheckError(RuntimeError):
    """The fast path and the hook path disagree on this model (the message carries both numbers)."""


@dataclass(frozen=True)
class SelfCheck:
    """What the check compared: log-odds per condition on both paths (None when only one path runs)."""

    path: str
    conditions: tuple[str, ...]
    fast_log_odds: tuple[float, ...] | None
    hook_log_odds: tuple[float, ...] | None
    max_abs_diff: float | None
    tolerance: float | None
    seconds: float
    note: str = ""


def tolerance(n_layers: int, hidden: int, log_odds: np.ndarray) -> np.ndarray:
    """Allowed |fast - hook| per condition, in float32 (see SAFETY)."""
    return SAFETY * UNIT_ROUNDOFF_F32 * math.sqrt(n_layers * hidden) * (1.0 + np.abs(log_odds))


def default_ablations(loaded: LoadedModel) -> list[Ablation]:
    """No ablation, one head and one neuron, in the middle layer (so the shared trunk branches)."""
    mid = loaded.arch.n_layers // 2
    return [Ablation(), Ablation(heads=((mid, 0),)), Ablation(neurons=((mid, 0),))]


def _fits_float32(model: torch.nn.Module) -> bool:
    """Whether every GPU holding part of the model has room for that part in float32 (a split model too)."""
    extra: dict[torch.device, int] = {}
    for p in model.parameters():
        if p.device.type == "cuda":
            extra[p.device] = extra.get(p.device, 0) + p.numel() * (4 - p.element_size())
    return all(need * 1.25 < torch.cuda.mem_get_info(d)[0] for d, need in extra.items())


def self_check(
    loaded: LoadedModel, ids: YesNoIds, token_ids: Sequence[int], ablations: Sequence[Ablation] | None = None,
    path: str = "auto",
) -> SelfCheck:
    """Score `token_ids` (one real prompt) under `ablations` (default: none, one head, one neuron) on the
    fast and the hook path and compare; raises `SelfCheckError` past the tolerance.

    Call it before building the worker's own `Scorer` (the check builds two of its own, and casts
    the model to float32 and back). `path` is the worker's `EngineOptions.path`: with "hook", or on a
    model the fast path does not implement, there is nothing to compare and nothing is run.
    """
    start = time.perf_counter()
    abls = list(ablations) if ablations is not None else default_ablations(loaded)
    names = tuple(a.describe() for a in abls)
    chosen, gaps = choose_path(loaded, path)
    if chosen == "hook":
        why = "engine.path is hook" if path == "hook" else "; ".join(gaps)
        return SelfCheck("hook", names, None, None, None, None, time.perf_counter() - start, f"hook path only: {why}")
    model = loaded.model
    dtype = next(model.parameters()).dtype
    if dtype != torch.float32 and not _fits_float32(model):
        warnings.warn(f"{loaded.name}: fast-path self-check skipped: a float32 copy of the weights does not fit in free GPU memory")
        return SelfCheck("fast", names, None, None, None, None, time.perf_counter() - start, "skipped: no memory for float32")
    cast = dtype != torch.float32
    try:
        if cast:
            model.float()
        fast = Scorer(loaded, ids, EngineOptions(path="fast")).score_tokens([list(token_ids)], abls).log_odds[0]
        hook = Scorer(loaded, ids, EngineOptions(path="hook")).score_tokens([list(token_ids)], abls).log_odds[0]
    finally:
        if cast:
            if hasattr(model, "_verif_fused_weights"):
                del model._verif_fused_weights  # float32 copies: the worker's Scorer fuses its own weights
            model.to(dtype)
    diff = np.abs(fast - hook)
    tol = tolerance(loaded.arch.n_layers, loaded.arch.hidden_size, hook)
    result = SelfCheck("fast", names, tuple(map(float, fast)), tuple(map(float, hook)), float(diff.max()),
                       float(tol.min()), time.perf_counter() - start)  # fmt: skip
    bad = [i for i in range(len(abls)) if not diff[i] <= tol[i]]  # NaN fails too
    if bad:
        rows = "; ".join(f"{names[i]}: fast {fast[i]:.6g}, hook {hook[i]:.6g} (|diff| {diff[i]:.3g} > {tol[i]:.3g})"
                         for i in bad)  # fmt: skip
        raise SelfCheckError(
            f"{loaded.name} ({loaded.arch.family}): the fast path disagrees with the model's own forward in log-odds "
            f"(float32, one prompt of {len(token_ids)} tokens): {rows}. Its block may differ from what "
            "verif.model.forward implements (another transformers version?); set engine.path: hook to score "
            "with the model's own forward."
        )
    return result
