"""The scorer a worker owns: tokenises prompts, plans units of work, returns Yes/No scores.

A unit is a group of prompts scored under a group of conditions in one pass: a branching pass of the
fast path (`verif.model.forward.FastForward`), or batched rows of the model's own forward with
ablation hooks (`verif.model.hooked.HookForward`) for a model the fast path does not implement
(`verif.model.families.fast_path_gaps`: the scorer says so in one warning and never refuses). Prompts
are sorted by token length into buckets (longest at most `bucket_ratio` x shortest) that no unit spans,
so a long prompt never pads short ones, and grouped so that a unit holds one length wherever the rows
allow it: no padding, so attention runs causal-only; prompts that share a unit with others of
different lengths (only to fill a forward chunk) are left padded with correct position ids.

Memory is bounded by two token budgets whatever the prompts: a unit holds at most `max_unit_tokens`
tokens of hidden states (rows x padded length), a forward chunk at most `max_chunk_tokens` tokens of
temporaries (`activation_bytes_per_token` each; attention runs in SDPA's blocked kernels, and a
padded chunk adds its boolean mask, rows x length^2 bytes, at most `max_chunk_tokens` x length). A
prompt longer than `EngineOptions.max_prompt_tokens` is refused before anything is allocated.

Nothing here imports Ray, W&B or polars: the GPU benchmark drives this class directly.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from verif.design.conditions import Ablation
from verif.design.heads import Head
from verif.model.ablation import AblationMasks
from verif.model.families import fast_path_gaps
from verif.model.forward import FastForward, SharedPrefix, to_device
from verif.model.hooked import HookForward
from verif.model.interventions import (
    ActivationCache,
    Capture,
    ReferenceSums,
    Sites,
    Sources,
    UnitEdits,
    check_sources,
)
from verif.model.loading import Arch, LoadedModel
from verif.model.memory import AUTO_TOKENS_PER_CALL, activation_bytes_per_token  # noqa: F401  (re-exported)
from verif.model.options import EngineOptions
from verif.model.placement import Placement
from verif.model.score import YesNoIds, YesNoScores, left_pad, scores_from_log_probs


# Rows of a forward chunk for `max_rows="auto"` off the GPU (where free memory says nothing useful).
CPU_AUTO_ROWS = 64


def auto_max_rows(arch: Arch, seq_len: int, device: torch.device, dtype: torch.dtype, mem_fraction: float = 0.5) -> int:
    """Rows per decoder-block call for `max_rows="auto"`: `AUTO_TOKENS_PER_CALL` tokens, fewer when
    `mem_fraction` of the free GPU memory cannot hold their temporaries; `CPU_AUTO_ROWS` on a CPU."""
    if device.type != "cuda":
        return CPU_AUTO_ROWS
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # cached, reusable
    by_memory = int(free * mem_fraction) // (activation_bytes_per_token(arch, dtype) * seq_len)
    return max(1, min(AUTO_TOKENS_PER_CALL // seq_len, by_memory))


def chunk_rows(max_rows: int, seq_len: int, opts: EngineOptions) -> int:
    """Rows of one forward chunk at `seq_len` tokens: `max_rows`, fewer where `max_chunk_tokens` demands."""
    return max(1, min(int(max_rows), opts.max_chunk_tokens // max(seq_len, 1)))


@dataclass
class Unit:
    """Prompts (by index) scored under conditions (by index) in one pass, `chunk_rows` rows per forward chunk."""

    prompts: list[int]
    conditions: list[int]
    chunk_rows: int


@dataclass
class ScoreTable:
    """Scores for n prompts x c conditions (arrays shaped `[n, c]`)."""

    p_yes: np.ndarray
    p_no: np.ndarray
    p_yes_norm: np.ndarray
    log_odds: np.ndarray
    row_layers: int = 0
    nonfinite: int = 0  # rows with a NaN or infinite value (YesNoScores.nonfinite)
    row_positions: int = 0  # (row x layer x position) states computed (ForwardStats.row_positions)


def check_lengths(lengths: Sequence[int], opts: EngineOptions) -> None:
    """Refuse a prompt longer than the token budgets allow (ValueError naming it and the budgets)."""
    limit = opts.max_prompt_tokens
    over = [(n, i) for i, n in enumerate(lengths) if n > limit]
    if over:
        n, i = max(over)
        raise ValueError(
            f"prompt {i} has {n} tokens; the engine scores at most {limit} (one row within "
            f"engine.max_chunk_tokens = {opts.max_chunk_tokens}, two within engine.max_unit_tokens = "
            f"{opts.max_unit_tokens}); {len(over)} prompt(s) are longer"
        )


def length_buckets(order: Sequence[int], lengths: Sequence[int], ratio: float) -> list[list[int]]:
    """`order` (sorted by length) cut wherever a length exceeds its bucket's shortest by more than `ratio`."""
    buckets: list[list[int]] = []
    for i in order:
        if buckets and lengths[i] <= lengths[buckets[-1][0]] * ratio:
            buckets[-1].append(i)
        else:
            buckets.append([i])
    return buckets


def plan_units(
    lengths: Sequence[int], n_conditions: int, opts: EngineOptions, rows_for: Callable[[int], int] | None = None
) -> list[Unit]:
    """Group prompts and conditions into units, each within the row and token budgets.

    With `bucket_by_length` prompts are sorted by length and cut into buckets whose longest is at most
    `bucket_ratio` times their shortest; a unit never spans two buckets, so a long prompt never pads
    short ones whatever else the call holds. Inside a bucket a unit changes length only while it is
    smaller than one forward chunk (padding buys a fuller chunk there, nowhere else), and a unit that
    mixes lengths holds at most `max_chunk_tokens` // length prompts, so its padded attention mask
    (prompts x length^2 booleans) is within the bound of one chunk's.
    A unit holds at most `max_unit_rows` rows and `max_unit_tokens` tokens. `rows_for(seq_len)` is
    the rows of a forward chunk at that length (default: `max_rows`, an int here, within
    `max_chunk_tokens`). A prompt over `opts.max_prompt_tokens` is a ValueError (`check_lengths`).
    """
    check_lengths(lengths, opts)
    if rows_for is None:
        rows_for = lambda seq_len: chunk_rows(opts.max_rows, seq_len, opts)  # noqa: E731
    bucketing = opts.bucket_by_length
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i)) if bucketing else list(range(len(lengths)))
    buckets = length_buckets(order, lengths, opts.bucket_ratio) if bucketing else [order]
    units: list[Unit] = []
    for bucket in buckets:
        if not bucket:
            continue
        longest = max(lengths[i] for i in bucket)
        unit_rows = min(opts.max_unit_rows, opts.max_unit_tokens // max(longest, 1))
        chunk = rows_for(longest)
        per_unit = max(1, min(n_conditions, unit_rows - 1))
        for first in range(0, n_conditions, per_unit):
            conds = list(range(first, min(first + per_unit, n_conditions)))
            rows_per_prompt = len(conds) + 1  # + the trunk row
            current: list[int] = []
            for i in bucket:
                full = (len(current) + 1) * rows_per_prompt > unit_rows
                new_length = bucketing and current and lengths[i] != lengths[current[-1]]
                filled = len(current) * rows_per_prompt >= chunk
                # a padded unit's mask is [prompts, 1, T, T]: no bigger than a chunk's bound allows
                mask_full = bucketing and current and lengths[i] != lengths[current[0]] and \
                    (len(current) + 1) * lengths[i] > opts.max_chunk_tokens
                if current and (full or mask_full or (new_length and filled)):
                    units.append(Unit(current, conds, rows_for(max(lengths[j] for j in current))))
                    current = []
                current.append(i)
            if current:
                units.append(Unit(current, conds, rows_for(max(lengths[j] for j in current))))
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
        self.placement = loaded.placement or Placement.of_model(loaded.model)
        self.device = self.placement.device(self.placement.embed)  # where prompts go in
        self.dtype = next(loaded.model.parameters()).dtype
        self.path, self.gaps = choose_path(loaded, self.opts.path)
        self.forward: FastForward | HookForward
        if self.path == "fast":
            self.forward = FastForward(loaded.model, loaded.arch, 64, self.opts.compile, self.opts.last_position_only,
                                       self.placement)
        else:
            if self.opts.path == "auto":
                warnings.warn(
                    f"{loaded.name} ({loaded.arch.family}): scoring on the hook path (the model's own forward "
                    f"with ablation hooks, no shared trunk): {'; '.join(self.gaps)}", stacklevel=2,
                )  # fmt: skip
            self.forward = HookForward(loaded.model, loaded.arch, 64, self.placement)
        self.pad_id = self._pad_id()
        # names this model in the caches it fills: a resample skips shared prefixes only on its own activations
        self.origin = f"{loaded.name}@{id(loaded.model):x}"
        self._yes_idx = torch.tensor(ids.yes, device=self.device)
        self._no_idx = torch.tensor(ids.no, device=self.device)

    def _rows_for(self, seq_len: int) -> int:
        """Rows of a forward chunk at `seq_len` tokens (`max_rows`, or auto), within `max_chunk_tokens`."""
        rows = self.opts.max_rows
        if rows == "auto":  # the device with the least room sets it
            rows = min(auto_max_rows(self.loaded.arch, seq_len, d, self.dtype) for d in set(self.placement.devices))
        return chunk_rows(rows, seq_len, self.opts)

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
        Python list would copy them over, and wait for the GPU, at every call). They follow the logits
        to the LM head's device once."""
        if self._yes_idx.device != logits.device:
            self._yes_idx, self._no_idx = self._yes_idx.to(logits.device), self._no_idx.to(logits.device)
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
        self, token_ids: Sequence[Sequence[int]], ablations: Sequence[Ablation | Iterable[Head]],
        sources: Sources | None = None,
    ) -> ScoreTable:
        """Score every prompt under every ablation (an empty one is the baseline).

        An ablation is an `Ablation` (heads and neurons, and the kind of intervention) or a plain head
        set (zero). Each is checked against the model before any work, and so are the `sources` that
        non-zero kinds read (`verif.model.interventions`: reference means, a per-prompt activation
        cache). Results stay on the device until every unit is queued and are copied back once at the
        end: the only point where the host waits for the GPU.
        """
        abls = [Ablation.of(a) for a in ablations]
        masks = AblationMasks.build(abls, self.loaded.arch)  # on the CPU: the row plan is made there
        n, c = len(token_ids), len(abls)
        lengths = [len(t) for t in token_ids]
        edited = any(a.kind != "zero" for a in abls)
        if edited:
            check_sources(abls, sources, lengths)
        before = self.forward.stats.row_layers, self.forward.stats.row_positions
        shared = self._shared_prefixes(token_ids, abls, sources)
        done: list[tuple[Unit, torch.Tensor, torch.Tensor]] = []
        for unit in plan_units(lengths, c, self.opts, self._rows_for):
            self.forward.max_rows = unit.chunk_rows
            toks = [token_ids[i] for i in unit.prompts]
            ids, attn = (to_device(t, self.device) for t in left_pad(toks, self.pad_id)[:2])
            same_length = len({len(t) for t in toks}) == 1
            ly, ln = [], []
            unit_masks = masks.select(unit.conditions)
            edits = None
            if edited:
                edits = UnitEdits([abls[j] for j in unit.conditions], sources, unit.prompts, ids.shape[1],
                                  self.loaded.arch.head_dim, self.device, self.dtype)
            prefix = None if shared is None else self._unit_prefix(unit, abls, shared, lengths, ids.shape[1])
            kwargs = {} if prefix is None else {"prefix": prefix}
            for logits in self.forward.logits(ids, None if same_length else attn, unit_masks, self.opts.share_trunk,
                                              edits, **kwargs):
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
        return ScoreTable(s.p_yes, s.p_no, s.p_yes_norm, s.log_odds, self.forward.stats.row_layers - before[0],
                          int(s.nonfinite.sum()), self.forward.stats.row_positions - before[1])

    def _shared_prefixes(self, token_ids: Sequence[Sequence[int]], abls: Sequence[Ablation],
                         sources: Sources | None) -> list[int] | None:
        """Per prompt, the tokens it shares from the start with the prompt its resample rows read (the cache's
        `same_prefix`), where the fast path shares the trunk and some condition resamples; else None."""
        if not (self.path == "fast" and self.opts.share_trunk and any(a.kind == "resample" for a in abls)):
            return None
        return sources.cache.same_prefix(token_ids, self.origin)

    @staticmethod
    def _unit_prefix(unit: Unit, abls: Sequence[Ablation], shared: Sequence[int], lengths: Sequence[int],
                     seq: int) -> SharedPrefix | None:
        """The unit's `SharedPrefix`: its resample rows start at the first position (left padding counted)
        where some prompt differs from its partner, at the last position at the latest; None if that is 0."""
        firsts = [seq - lengths[i] + shared[i] for i in unit.prompts]
        start = min(min(firsts), seq - 1)
        if start <= 0:
            return None
        resample = np.array([abls[j].kind == "resample" for j in unit.conditions])
        same = np.array([shared[i] == lengths[i] for i in unit.prompts])
        return SharedPrefix(start, resample, same)

    def score_prompts(self, prompts: Sequence[str], ablations: Sequence[Ablation | Iterable[Head]],
                      sources: Sources | None = None) -> ScoreTable:
        return self.score_tokens(self.tokenize(prompts), ablations, sources)

    @torch.inference_mode()
    def activations(self, token_ids: Sequence[Sequence[int]], sites: Sites) -> ActivationCache:
        """The activations at `sites` of this model's unablated forward of each prompt: the cache a
        non-zero kind reads (resample: the partners'; another model's, for cross-model patching).

        It runs the path that scores (the same units, chunks and layer code, every position), so a
        prompt's own activations replace its own exactly.
        """
        lengths = [len(t) for t in token_ids]
        entries: list[dict] = [{} for _ in token_ids]
        baseline = AblationMasks.build([Ablation()], self.loaded.arch)
        keep_last = getattr(self.forward, "last_position_only", False)
        try:
            if keep_last:
                self.forward.last_position_only = False  # a capture reads every position of the last block too
            for unit in plan_units(lengths, 1, self.opts, self._rows_for):
                self.forward.max_rows = unit.chunk_rows
                toks = [token_ids[i] for i in unit.prompts]
                ids, attn = (to_device(t, self.device) for t in left_pad(toks, self.pad_id)[:2])
                same_length = len({len(t) for t in toks}) == 1
                capture = Capture(sites, range(len(toks)), [len(t) for t in toks], ids.shape[1],
                                  self.loaded.arch.head_dim)
                for _ in self.forward.logits(ids, None if same_length else attn, baseline, self.opts.share_trunk,
                                             capture):
                    pass
                for p, i in enumerate(unit.prompts):
                    entries[i] = capture.entries[p]
        finally:
            if keep_last:
                self.forward.last_position_only = True
        return ActivationCache(sites, entries, [tuple(t) for t in token_ids], self.origin)

    def reference_sums(self, token_ids: Sequence[Sequence[int]], sites: Sites, positional: bool,
                       batch: int = 16) -> ReferenceSums:
        """Float64 sums of the activations at `sites` over these reference prompts (`batch` prompts' caches
        held at a time): what the mean kinds' first pass adds up."""
        total = None
        for a in range(0, len(token_ids), batch):
            part = ReferenceSums.of(self.activations(token_ids[a:a + batch], sites), positional)
            total = part if total is None else total + part
        if total is None:
            raise ValueError("reference_sums: no reference prompt given")
        return total
