"""The scorer a worker owns: tokenises prompts, plans units of work, returns Yes/No scores.

A unit is a group of prompts scored under a group of conditions in one branching pass
(`verif.forward.FastForward`). Prompts are sorted by token length and grouped so that a unit holds one
length wherever the rows allow it: no padding, so attention runs causal-only, and prompts that must
share a unit with others of different lengths are left padded with correct position ids.

Nothing here imports Ray, W&B or polars: the GPU benchmark drives this class directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from verif.ablate import head_masks
from verif.forward import FastForward
from verif.heads import Head
from verif.model import LoadedModel
from verif.score import YesNoIds, YesNoScores, left_pad, scores_from_log_probs, yes_no_log_probs


@dataclass
class EngineOptions:
    """How the scorer cuts work; none of these change results (tested)."""

    max_rows: int = 64  # rows (prompt x condition) per forward chunk
    max_unit_rows: int = 2048  # rows whose hidden states are held at once while branching
    share_trunk: bool = True  # run layers below a condition's first ablated layer once per prompt
    bucket_by_length: bool = True  # group same-length prompts to avoid padding
    compile: bool = False  # torch.compile the decoder layer


@dataclass
class Unit:
    """Prompts (by index) scored under conditions (by index) in one pass."""

    prompts: list[int]
    conditions: list[int]


@dataclass
class ScoreTable:
    """Scores for n prompts x c conditions (arrays shaped `[n, c]`)."""

    p_yes: np.ndarray
    p_no: np.ndarray
    p_yes_norm: np.ndarray
    log_odds: np.ndarray
    row_layers: int = 0
    nonfinite: int = field(init=False)

    def __post_init__(self):
        self.nonfinite = int((~np.isfinite(np.stack([self.p_yes, self.p_no, self.log_odds]))).any(0).sum())


def plan_units(lengths: Sequence[int], n_conditions: int, opts: EngineOptions) -> list[Unit]:
    """Group prompts (sorted by length) and conditions into units of at most `max_unit_rows` rows.

    A unit changes length only when it already fills a forward chunk, so padding happens only where
    a single length has too few rows to fill one.
    """
    cond_per_unit = max(1, min(n_conditions, opts.max_unit_rows - 1))
    cond_groups = [list(range(a, min(a + cond_per_unit, n_conditions))) for a in range(0, n_conditions, cond_per_unit)]
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i)) if opts.bucket_by_length else list(range(len(lengths)))
    units: list[Unit] = []
    for conds in cond_groups:
        rows_per_prompt = len(conds) + 1  # + the trunk row
        current: list[int] = []
        for i in order:
            full = (len(current) + 1) * rows_per_prompt > opts.max_unit_rows
            new_length = opts.bucket_by_length and current and lengths[i] != lengths[current[-1]]
            if current and (full or (new_length and len(current) * rows_per_prompt >= opts.max_rows)):
                units.append(Unit(current, conds))
                current = []
            current.append(i)
        if current:
            units.append(Unit(current, conds))
    return units


class Scorer:
    """Owns a loaded model and scores prompts under head-ablation conditions."""

    def __init__(self, loaded: LoadedModel, ids: YesNoIds, opts: EngineOptions | None = None):
        self.loaded = loaded
        self.ids = ids
        self.opts = opts or EngineOptions()
        self.device = next(loaded.model.parameters()).device
        self.forward = FastForward(loaded.model, loaded.arch, self.opts.max_rows, self.opts.compile)

    def tokenize(self, prompts: Sequence[str]) -> list[list[int]]:
        """Token ids of each prompt as the model reads it (no special tokens added)."""
        return [self.loaded.tokenizer.encode(p, add_special_tokens=False) for p in prompts]

    @torch.inference_mode()
    def score_tokens(self, token_ids: Sequence[Sequence[int]], head_sets: Sequence[Sequence[Head]]) -> ScoreTable:
        """Score every prompt under every head set (an empty set is the baseline)."""
        arch = self.loaded.arch
        masks = head_masks(head_sets, arch, self.device)
        n, c = len(token_ids), len(head_sets)
        log_yes = np.full((n, c), np.nan)
        log_no = np.full((n, c), np.nan)
        before = self.forward.stats.row_layers
        pad_id = self.loaded.tokenizer.pad_token_id
        for unit in plan_units([len(t) for t in token_ids], c, self.opts):
            toks = [token_ids[i] for i in unit.prompts]
            ids, attn, _ = left_pad(toks, pad_id, self.device)
            same_length = len({len(t) for t in toks}) == 1
            hidden = self.forward.last_hidden(ids, None if same_length else attn, masks[unit.conditions], self.opts.share_trunk)
            flat = hidden.reshape(-1, hidden.shape[-1])
            ly, ln = [], []
            for a in range(0, flat.shape[0], self.opts.max_rows):
                y, no = yes_no_log_probs(self.forward.lm_head(flat[a:a + self.opts.max_rows]), self.ids)
                ly.append(y)
                ln.append(no)
            shape = (len(unit.prompts), len(unit.conditions))
            rows = np.ix_(unit.prompts, unit.conditions)
            log_yes[rows] = torch.cat(ly).cpu().numpy().reshape(shape)
            log_no[rows] = torch.cat(ln).cpu().numpy().reshape(shape)
        s: YesNoScores = scores_from_log_probs(log_yes, log_no)
        return ScoreTable(s.p_yes, s.p_no, s.p_yes_norm, s.log_odds, self.forward.stats.row_layers - before)

    def score_prompts(self, prompts: Sequence[str], head_sets: Sequence[Sequence[Head]]) -> ScoreTable:
        return self.score_tokens(self.tokenize(prompts), head_sets)
