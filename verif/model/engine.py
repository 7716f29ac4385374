"""The scorer a worker owns: tokenises prompts, plans units of work, returns Yes/No scores.

A unit is a group of prompts scored under a group of conditions in one pass: a branching pass of the
fast path (`verif.model.forward.FastForward`), or batched rows of the model's own forward with
ablation hooks (`verif.model.hooked.HookForward`) for a model the fast path does not implement
(`verif.model.families.fast_path_gaps`: the scorer says so in one warning and never refuses). Prompts
are sorted by token length and grouped so that a unit holds one length wherever the rows allow it: no
padding, so attention runs causal-only, and prompts that must share a unit with others of different
lengths are left padded with correct position ids.

Nothing here imports Ray, W&B or polars: the GPU benchmark drives this class directly.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from verif.design.conditions import Ablation
from verif.design.heads import Head
from verif.model.ablation import AblationMasks
from verif.model.families import fast_path_gaps
from verif.model.forward import FastForward, to_device
from verif.model.hooked import HookForward
from verif.model.loading import Arch, LoadedModel
from verif.model.options import EngineOptions
from verif.model.score import YesNoIds, YesNoScores, left_pad, scores_from_log_probs


# "auto" aims at this many tokens per decoder-block call: GEMMs at the 3B model's shapes reach their
# full rate well below it (the anchor: bs 64 x 170 tokens already within 4% of bs 256), while larger
# calls only add memory.
AUTO_TOKENS_PER_CALL = 32768


def activation_bytes_per_token(arch: Arch, dtype: torch.dtype) -> int:
    """Peak temporary memory of one decoder-block call per token (upper estimate).

    Counts the fused q/k/v output with its rotary temporaries and repeated k/v, the hidden-size
    temporaries (norms in float32, residuals), and the gate/up output with the activation product.
    """
    elt = torch.finfo(dtype).bits // 8
    qkv = (arch.n_heads + 2 * arch.n_kv_heads) * arch.head_dim
    return elt * (6 * arch.hidden_size + 4 * qkv + 4 * arch.intermediate_size) + 8 * arch.hidden_size


def auto_max_rows(arch: Arch, seq_len: int, device: torch.device, dtype: torch.dtype, mem_fraction: float = 0.5) -> int:
    """Rows per decoder-block call for `max_rows="auto"`: `AUTO_TOKENS_PER_CALL` tokens, fewer when
    `mem_fraction` of the free GPU memory cannot hold their temporaries; 64 on a CPU."""
    if device.type != "cuda":
        return 64
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # cached, reusable
    by_memory = int(free * mem_fraction) // (activation_bytes_per_token(arch, dtype) * seq_len)
    return max(1, min(AUTO_TOKENS_PER_CALL // seq_len, by_memory))


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
    nonfinite: int = 0  # rows with a NaN or infinite value (YesNoScores.nonfinite)


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


def choose_path(loaded: LoadedModel, path: str = "auto") -> tuple[str, list[str]]:
    """("fast" or "hook", why not fast) for `EngineOptions.path`; "fast" on a model the fast path
    does not implement is refused, naming what it lacks."""
    gaps = fast_path_gaps(loaded.model)
    if path == "fast" and gaps:
        raise ValueError(f"{loaded.name} ({loaded.arch.family}) cannot run on the fast path: " + "; ".join(gaps))
    if path == "hook" or gaps:
        return "hook", gaps
    return "fast", []


class Scorer:
    """Owns a loaded model and scores prompts under ablation conditions (heads and/or neurons).

    A tokenizer is needed only to tokenise text (`score_prompts`) and, by default, for the padding
    id; `score_tokens` with `EngineOptions.pad_id` (or a model config that names one) needs none.
    `path` says which path runs ("fast" or "hook"), `gaps` why the fast path does not.
    """

    def __init__(self, loaded: LoadedModel, ids: YesNoIds, opts: EngineOptions | None = None):
        self.loaded = loaded
        self.ids = ids
        self.opts = opts or EngineOptions()
        param = next(loaded.model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.path, self.gaps = choose_path(loaded, self.opts.path)
        self.forward: FastForward | HookForward
        if self.path == "fast":
            self.forward = FastForward(loaded.model, loaded.arch, 64, self.opts.compile, self.opts.last_position_only)
        else:
            if self.opts.path == "auto":
                warnings.warn(
                    f"{loaded.name} ({loaded.arch.family}): scoring on the hook path (the model's own forward "
                    f"with ablation hooks, no shared trunk): {'; '.join(self.gaps)}", stacklevel=2,
                )  # fmt: skip
            self.forward = HookForward(loaded.model, loaded.arch, 64)
        self.pad_id = self._pad_id()
        self._yes_idx = torch.tensor(ids.yes, device=self.device)
        self._no_idx = torch.tensor(ids.no, device=self.device)

    def _rows_for(self, seq_len: int) -> int:
        if self.opts.max_rows == "auto":
            return auto_max_rows(self.loaded.arch, seq_len, self.device, self.dtype)
        return int(self.opts.max_rows)

    def _pad_id(self) -> int:
        """Any id works for padding (padded keys are masked); take the first one that is named."""
        candidates = [
            self.opts.pad_id,
            getattr(self.loaded.tokenizer, "pad_token_id", None),
            getattr(self.loaded.model.config, "pad_token_id", None),
            getattr(self.loaded.model.config, "eos_token_id", None),
        ]
        for c in candidates:
            if isinstance(c, (list, tuple)):
                c = c[0] if c else None
            if c is not None:
                return int(c)
        return 0

    def _yes_no_log_probs(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`verif.model.score.yes_no_log_probs` with the token ids kept on the device (indexing with a
        Python list would copy them over, and wait for the GPU, at every call)."""
        logp = torch.log_softmax(logits.double(), dim=-1)
        return (
            torch.logsumexp(logp.index_select(-1, self._yes_idx), dim=-1),
            torch.logsumexp(logp.index_select(-1, self._no_idx), dim=-1),
        )

    def tokenize(self, prompts: Sequence[str]) -> list[list[int]]:
        """Token ids of each prompt as the model reads it (no special tokens added)."""
        if self.loaded.tokenizer is None:
            raise ValueError("this Scorer has no tokenizer: pass token ids to score_tokens")
        return [self.loaded.tokenizer.encode(p, add_special_tokens=False) for p in prompts]

    @torch.inference_mode()
    def score_tokens(
        self, token_ids: Sequence[Sequence[int]], ablations: Sequence[Ablation | Iterable[Head]]
    ) -> ScoreTable:
        """Score every prompt under every ablation (an empty one is the baseline).

        An ablation is an `Ablation` (heads and neurons) or a plain head set. Each is checked against
        the model before any work. Results stay on the device until every unit is queued and are
        copied back once at the end: the only point where the host waits for the GPU.
        """
        masks = AblationMasks.build(ablations, self.loaded.arch)  # on the CPU: the row plan is made there
        n, c = len(token_ids), len(ablations)
        lengths = [len(t) for t in token_ids]
        max_rows = self._rows_for(max(lengths, default=1))
        opts = replace(self.opts, max_rows=max_rows)
        self.forward.max_rows = max_rows
        before = self.forward.stats.row_layers
        done: list[tuple[Unit, torch.Tensor, torch.Tensor]] = []
        for unit in plan_units(lengths, c, opts):
            toks = [token_ids[i] for i in unit.prompts]
            ids, attn = (to_device(t, self.device) for t in left_pad(toks, self.pad_id)[:2])
            same_length = len({len(t) for t in toks}) == 1
            ly, ln = [], []
            unit_masks = masks.select(unit.conditions)
            for logits in self.forward.logits(ids, None if same_length else attn, unit_masks, self.opts.share_trunk):
                y, no = self._yes_no_log_probs(logits)
                ly.append(y)
                ln.append(no)
            done.append((unit, torch.cat(ly), torch.cat(ln)))
        log_yes = np.full((n, c), np.nan)
        log_no = np.full((n, c), np.nan)
        if done:
            all_yes = torch.cat([y for _, y, _ in done]).cpu().numpy()
            all_no = torch.cat([no for _, _, no in done]).cpu().numpy()
            start = 0
            for unit, y, _ in done:
                shape = (len(unit.prompts), len(unit.conditions))
                rows = np.ix_(unit.prompts, unit.conditions)
                log_yes[rows] = all_yes[start:start + y.numel()].reshape(shape)
                log_no[rows] = all_no[start:start + y.numel()].reshape(shape)
                start += y.numel()
        s: YesNoScores = scores_from_log_probs(log_yes, log_no)
        return ScoreTable(s.p_yes, s.p_no, s.p_yes_norm, s.log_odds, self.forward.stats.row_layers - before,
                          int(s.nonfinite.sum()))

    def score_prompts(self, prompts: Sequence[str], ablations: Sequence[Ablation | Iterable[Head]]) -> ScoreTable:
        return self.score_tokens(self.tokenize(prompts), ablations)
