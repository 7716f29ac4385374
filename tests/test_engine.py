"""The fast engine (`verif.model.engine.Scorer` over `verif.model.forward.FastForward`) against the plain path.

The plain path is the model's own forward with `HookedAblation` pre-hooks (`score_plain`), run one
prompt and one condition at a time: no padding, no batching, no shared trunk. Every option of the
fast path (trunk sharing, length bucketing, chunk and unit sizes, the padded path, torch.compile)
must reproduce it; these are the exactness claims behind the throughput work.
"""

from __future__ import annotations

import inspect
import random
import time
from collections import Counter

import numpy as np
import pytest
import torch

from verif.model.ablation import HookedAblation, head_masks
from verif.model.engine import EngineOptions, Scorer, plan_units
from verif.model.forward import decoder_layer
from verif.design.heads import parse_heads, random_head_sets
from verif.model.score import resolve_yes_no, score_plain
from tests.support.exact_models import small_seed_model
from tests.tolerances import ScoreTol, assert_scores_close

SMOL_SET = "L0 H3, L5 H0, L5 H8, L12 H4, L17 H1, L17 H2, L17 H5, L29 H8"
FIELDS = ("p_yes", "p_no", "p_yes_norm", "log_odds")


# Tolerances (tests/tolerances.py). The fast path and the plain path are two float32 forwards that reduce in
# different orders (fused q/k/v, shared trunk, padding, chunking), so on the float32 models they may differ by
# what a float32 forward's rounding allows: ScoreTol.between_forwards(delta), delta measured for the model
# (`rounding` fixture; seed-shaped ~4e-4 in the logits, it is chaotic; SmolLM2 ~7e-5).
# Exactness is therefore proven on the float64 copy of the seed model ("seed64"), where the same operations
# round 2^-29 as much: ScoreTol.float64_forwards(delta), ~1e-12 in log-odds.


class EngineCase:
    def __init__(self, name, loaded, token_ids, head_sets, tol: ScoreTol):
        self.name = name
        self.loaded = loaded
        self.arch = loaded.arch
        self.ids = resolve_yes_no(loaded.tokenizer)
        self.token_ids = token_ids
        self.head_sets = head_sets
        self.tol = tol
        self.reference = plain_reference(loaded, self.ids, token_ids, head_sets)
        self.by_options: dict = {}  # `_scores` of this case, by options (each computed once)

    @property
    def default(self):
        """The fast path with default options (computed once)."""
        return _scores(self)


def plain_reference(loaded, ids, token_ids, head_sets) -> dict[str, np.ndarray]:
    """score_plain, one prompt and one condition per forward: `[n_prompts, n_conditions]` arrays."""
    model, arch, pad = loaded.model, loaded.arch, loaded.tokenizer.pad_token_id
    masks = head_masks(head_sets, arch)
    out = {f: np.zeros((len(token_ids), len(head_sets))) for f in FIELDS}
    with HookedAblation(model, arch) as hooks:
        for i, toks in enumerate(token_ids):
            for j in range(len(head_sets)):
                s = score_plain(model, hooks, [toks], masks[j:j + 1], ids, pad)
                for f in FIELDS:
                    out[f][i, j] = getattr(s, f)[0]
    return out


def _prompt_tokens(tok, prompts, max_len):
    """Four prompts of lengths n, n-6, n-6, n-14 (n <= max_len): mixed lengths and a same-length pair."""
    enc = [tok.encode(p, add_special_tokens=False) for p in prompts]
    n = min(max_len, *(len(e) for e in enc))
    return [enc[0][:n], enc[2][:n - 6], enc[3][:n - 6], enc[1][:n - 14]]


def _make_case(request, name, short_prompts) -> EngineCase:
    if name in ("seed", "seed64"):
        loaded = request.getfixturevalue("seed_model" if name == "seed" else "seed_model64")
        study = request.getfixturevalue("study_heads")
        arch = loaded.arch
        sets = [[], study, *random_head_sets(3, len(study), arch.n_layers, arch.n_heads, seed=11, exclude=study),
                [(35, 0)], [(35, 15)], [(0, 5)], [(17, h) for h in range(arch.n_heads)]]
        toks = _prompt_tokens(loaded.tokenizer, short_prompts, 28)
    else:
        loaded = request.getfixturevalue("smollm2")
        arch = loaded.arch
        target = parse_heads(SMOL_SET)
        sets = [[], target, random_head_sets(1, len(target), arch.n_layers, arch.n_heads, seed=5, exclude=target)[0],
                [(29, 8)], [(0, 0)]]
        toks = _prompt_tokens(loaded.tokenizer, short_prompts, 28)
    lengths = [len(t) for t in toks]
    assert len(set(lengths)) == 3 and max(Counter(lengths).values()) == 2, lengths
    rounding = request.getfixturevalue("rounding")
    if name == "smollm2":
        tol = ScoreTol.between_forwards(rounding(loaded))
    else:
        seed = request.getfixturevalue("seed_model")
        tol = ScoreTol.float64_forwards(rounding(seed)) if name == "seed64" else ScoreTol.between_forwards(rounding(seed))
    return EngineCase(name, loaded, toks, [list(s) for s in sets], tol)


@pytest.fixture(scope="module")
def _case_cache():
    return {}


@pytest.fixture(scope="module", params=["seed", "seed64", "smollm2"])
def case(request, _case_cache, short_prompts) -> EngineCase:
    """The seed-shaped model in float32 and float64 (study heads, random sets, single heads) and SmolLM2."""
    if request.param not in _case_cache:
        _case_cache[request.param] = _make_case(request, request.param, short_prompts)
    return _case_cache[request.param]


@pytest.fixture(scope="module", params=["seed64", "smollm2"])
def exact_case(request, _case_cache, short_prompts) -> EngineCase:
    """The option matrix runs on the float64 seed model (exact to ~1e-12) and on SmolLM2 (real weights); the
    float32 seed model is the same model and head sets as seed64, at a tolerance 2^29 times wider."""
    if request.param not in _case_cache:
        _case_cache[request.param] = _make_case(request, request.param, short_prompts)
    return _case_cache[request.param]


def _scores(case, **opts):
    """The fast path's scores of the case with these options: a fresh Scorer, computed once per case and options
    (the same options on the same inputs compute the same numbers; tests only read the table)."""
    key = tuple(sorted(opts.items()))
    if key not in case.by_options:
        scorer = Scorer(case.loaded, case.ids, EngineOptions(**opts))
        case.by_options[key] = scorer.score_tokens(case.token_ids, case.head_sets)
    return case.by_options[key]


def _first_layers(head_sets, n_layers):
    return [min((layer for layer, _ in hs), default=n_layers) for hs in head_sets]


def test_reference_is_not_vacuous(case):
    ref = case.reference
    assert np.isfinite(ref["log_odds"]).all()
    # every condition moves the answer, and the prompts differ, by more than the tolerance: a condition
    # scored as another one (or not ablated) would be seen
    assert (np.abs(ref["log_odds"][:, 1:] - ref["log_odds"][:, :1]).max(axis=0) > 2 * case.tol.log).all()
    assert np.ptp(ref["log_odds"][:, 0]) > 2 * case.tol.log


def test_fast_equals_plain(case):
    got = case.default
    assert got.p_yes_norm.shape == (len(case.token_ids), len(case.head_sets))
    assert got.nonfinite == 0
    assert_scores_close(got, case.reference, case.tol, "fast vs plain")
    # trunk L per prompt + (L - first ablated layer) per prompt and condition
    n_layers = case.arch.n_layers
    expected = len(case.token_ids) * (n_layers + sum(n_layers - f for f in _first_layers(case.head_sets, n_layers)))
    assert got.row_layers == expected


# The default options (max_rows=64, max_unit_rows=2048, sharing and bucketing on) are `case.default`.
VARIANTS = [
    dict(share_trunk=False),
    dict(bucket_by_length=False),
    dict(max_rows=3),
    dict(max_rows=7),
    dict(max_unit_rows=20),
    dict(max_rows=3, max_unit_rows=20),
    dict(max_rows=64, max_unit_rows=20),
    dict(max_rows=7, max_unit_rows=5),  # fewer unit rows than conditions: conditions split over units
    dict(share_trunk=False, bucket_by_length=False, max_rows=7, max_unit_rows=20),
    dict(max_rows="auto"),  # 64 on a CPU, memory-derived on a GPU
    # The cases' lengths (n, n-6, n-6, n-14) differ by more than the default bucket_ratio: these let
    # units mix them, so the padded path runs under the options above too.
    dict(bucket_ratio=2.0),
    dict(bucket_ratio=2.0, max_chunk_tokens=200, max_unit_tokens=600),  # token budgets cut chunks and units
]


@pytest.mark.parametrize("opts", VARIANTS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_options_do_not_change_results(exact_case, opts):
    case = exact_case
    got = _scores(case, **opts)
    assert_scores_close(got, case.default, case.tol, f"{opts} vs default")
    assert_scores_close(got, case.reference, case.tol, f"{opts} vs plain")


def test_share_trunk_saves_work(case):
    shared = case.default
    full = _scores(case, share_trunk=False)
    n, c, n_layers = len(case.token_ids), len(case.head_sets), case.arch.n_layers
    assert full.row_layers == n * c * n_layers  # every (prompt, condition) pair runs every layer
    assert shared.row_layers < full.row_layers


def test_trunk_stops_at_last_branch_without_baseline(case):
    """Without an un-ablated condition the trunk is needed only up to the last branch layer."""
    sets = case.head_sets[1:]
    assert all(sets)
    got = Scorer(case.loaded, case.ids).score_tokens(case.token_ids, sets)
    n_layers = case.arch.n_layers
    firsts = _first_layers(sets, n_layers)
    assert got.row_layers == len(case.token_ids) * (max(firsts) + sum(n_layers - f for f in firsts))
    assert_scores_close(got, {f: case.reference[f][:, 1:] for f in FIELDS}, case.tol, "no baseline vs plain")


def _spy_padding(scorer):
    """Record, per forward unit, whether it ran the padded path (attention mask given)."""
    calls = []
    inner = scorer.forward.last_hidden
    signature = inspect.signature(inner)

    def spy(*args, **kwargs):
        bound = signature.bind(*args, **kwargs).arguments
        calls.append((bound["input_ids"].shape[0], bound["attn"] is not None))
        return inner(*args, **kwargs)

    scorer.forward.last_hidden = spy
    return calls


def test_mixed_length_unit_equals_same_length_units(case):
    opts = EngineOptions(max_rows=64, bucket_ratio=2.0)  # the cases' lengths differ by up to 1.9x
    units = plan_units([len(t) for t in case.token_ids], len(case.head_sets), opts)
    assert any(len({len(case.token_ids[i]) for i in u.prompts}) > 1 for u in units), "no padded unit planned"
    scorer = Scorer(case.loaded, case.ids, opts)
    calls = _spy_padding(scorer)
    mixed = scorer.score_tokens(case.token_ids, case.head_sets)
    assert any(padded for _, padded in calls)
    # Each prompt alone: one unit of one length, no padding at all.
    calls.clear()
    alone = [scorer.score_tokens([t], case.head_sets) for t in case.token_ids]
    assert calls and not any(padded for _, padded in calls)
    stacked = {f: np.concatenate([getattr(a, f) for a in alone]) for f in FIELDS}
    assert_scores_close(mixed, stacked, case.tol, "padded unit vs prompts alone")
    assert_scores_close(mixed, case.reference, case.tol, "padded unit vs plain")
    # The two same-length prompts together: a same-length unit of two prompts (causal path).
    lengths = [len(t) for t in case.token_ids]
    pair = [i for i, n in enumerate(lengths) if lengths.count(n) == 2]
    calls.clear()
    together = scorer.score_tokens([case.token_ids[i] for i in pair], case.head_sets)
    assert calls == [(2, False)]
    assert_scores_close(together, {f: getattr(mixed, f)[pair] for f in FIELDS}, case.tol, "pair vs padded")
    assert_scores_close(together, {f: case.reference[f][pair] for f in FIELDS}, case.tol, "pair vs plain")


def test_score_prompts_tokenizes_without_special_tokens(seed_model, short_prompts):
    ids = resolve_yes_no(seed_model.tokenizer)
    scorer = Scorer(seed_model, ids)
    prompts = list(short_prompts[:2])
    toks = [seed_model.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    assert scorer.tokenize(prompts) == toks
    a = scorer.score_prompts(prompts, [[], [(3, 13)]])
    b = scorer.score_tokens(toks, [[], [(3, 13)]])
    for f in FIELDS:
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))


def test_single_head_sweep_row_layers(seed_model, short_prompts, rounding):
    """All 576 single heads + baseline on 2 prompts: sharing does <= 0.6x the layer work, same results."""
    arch = seed_model.arch
    n_layers = arch.n_layers
    ids = resolve_yes_no(seed_model.tokenizer)
    tok = seed_model.tokenizer
    toks = [tok.encode(p, add_special_tokens=False)[:8] for p in short_prompts[:2]]
    sets = [[]] + [[(layer, head)] for layer in range(n_layers) for head in range(arch.n_heads)]
    # big chunks only to keep the test quick (row_layers does not depend on max_rows)
    shared = Scorer(seed_model, ids, EngineOptions(share_trunk=True, max_rows=256)).score_tokens(toks, sets)
    full = Scorer(seed_model, ids, EngineOptions(share_trunk=False, max_rows=256)).score_tokens(toks, sets)
    per_prompt = n_layers + sum(n_layers - f for f in _first_layers(sets, n_layers))
    assert per_prompt == 36 + 16 * sum(range(1, 37))
    assert shared.row_layers == 2 * per_prompt == 21384
    assert full.row_layers == 2 * len(sets) * n_layers == 41544
    assert shared.row_layers <= 0.6 * full.row_layers
    tol = ScoreTol.between_forwards(rounding(seed_model))  # float32: shared and full trunk reduce differently
    assert_scores_close(shared, full, tol, "shared vs full trunk")
    # Spot checks against the plain path: baseline, first, middle and last layer heads.
    cols = [0, 1, 1 + 17 * 16 + 14, 1 + 35 * 16 + 15]
    ref = plain_reference(seed_model, ids, toks, [sets[c] for c in cols])
    assert_scores_close({f: getattr(shared, f)[:, cols] for f in FIELDS}, ref, tol, "single heads vs plain")


def test_rms_norm_matches_transformers():
    """The fast path's RMSNorm is bitwise transformers' in the dtypes models run in."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    from verif.model.forward import rms_norm

    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        norm = Qwen2RMSNorm(128, eps=1e-6)
        norm.weight.data = torch.randn(128, generator=gen) * 0.5 + 1
        norm = norm.to(dtype)
        x = (torch.randn(3, 5, 128, generator=gen) * 30).to(dtype)
        assert torch.equal(rms_norm(x, norm.weight.data, 1e-6), norm(x)), dtype


# ---------------------------------------------------------------- planning


def test_plan_units_cover_each_pair_once_and_respect_limits():
    rng = random.Random(0)
    for trial in range(400):
        n_prompts = rng.randint(1, 30)
        lengths = [rng.choice([17, 30, 31, 45, 120]) for _ in range(n_prompts)]
        n_cond = rng.randint(1, 60)
        opts = EngineOptions(
            max_rows=rng.choice([1, 3, 7, 64]),
            max_unit_rows=rng.choice([2, 5, 20, 64, 2048]),
            bucket_by_length=rng.random() < 0.5,
            bucket_ratio=rng.choice([1.0, 1.125, 2.0, 10.0]),
            max_chunk_tokens=rng.choice([120, 500, 65536]),
            max_unit_tokens=rng.choice([240, 1000, 524288]),
        )
        units = plan_units(lengths, n_cond, opts)
        seen = Counter((p, c) for u in units for p in u.prompts for c in u.conditions)
        assert set(seen) == {(p, c) for p in range(n_prompts) for c in range(n_cond)}, (trial, opts)
        assert set(seen.values()) == {1}, (trial, opts)
        for u in units:
            assert u.prompts and u.conditions
            rows, padded = len(u.prompts) * (len(u.conditions) + 1), max(lengths[i] for i in u.prompts)
            assert rows <= opts.max_unit_rows and rows * padded <= opts.max_unit_tokens, (trial, opts, u)
            assert 1 <= u.chunk_rows <= opts.max_rows and u.chunk_rows * padded <= opts.max_chunk_tokens
            if opts.bucket_by_length:
                unit_lengths = [lengths[i] for i in u.prompts]
                assert unit_lengths == sorted(unit_lengths)
                assert unit_lengths[-1] <= unit_lengths[0] * opts.bucket_ratio, (trial, opts, u)
                # a unit changes length only while it is smaller than a forward chunk, and a unit of
                # mixed lengths holds no more prompts x padded length than a chunk's token budget
                for j in range(1, len(u.prompts)):
                    if unit_lengths[j] != unit_lengths[j - 1]:
                        assert j * (len(u.conditions) + 1) < u.chunk_rows, (trial, opts, u)
                if unit_lengths[0] != unit_lengths[-1]:
                    assert len(u.prompts) * padded <= opts.max_chunk_tokens, (trial, opts, u)


def test_plan_units_same_length_and_big_units():
    opts = EngineOptions()
    units = plan_units([40] * 10, 30, opts)
    assert len(units) == 1 and units[0].prompts == list(range(10)) and units[0].conditions == list(range(30))
    # one prompt per unit when a prompt's rows nearly fill a unit
    units = plan_units([40] * 3, 2047, opts)
    assert [u.prompts for u in units] == [[0], [1], [2]]
    # bucketing separates lengths once a unit fills a forward chunk
    units = plan_units([50, 40, 50, 40], 63, EngineOptions(bucket_ratio=2.0))
    assert [sorted(u.prompts) for u in units] == [[1, 3], [0, 2]]


def test_plan_units_long_prompt_never_pads_short_ones():
    """Issue 14: one 5,164-token prompt among three short ones used to share their unit (4 x 7 rows < one
    chunk), padding them to 5,164 tokens; a shard of 170- and 300-token prompts mixed them too."""
    opts = EngineOptions()
    units = plan_units([170, 175, 5164, 168], 6, opts)
    assert sorted(sorted(u.prompts) for u in units) == [[0, 1, 3], [2]]
    assert next(u for u in units if u.prompts == [2]).chunk_rows == 65536 // 5164  # the token budget
    units = plan_units([170, 300] * 8, 12, opts)
    assert sorted(sorted(u.prompts) for u in units) == [list(range(0, 16, 2)), list(range(1, 16, 2))]
    # a unit of one length is never cut by the ratio, and ratio 1 allows no padding at all
    assert len(plan_units([170] * 8, 12, opts)) == 1
    assert all(len({[170, 171][i % 2] for i in u.prompts}) == 1
               for u in plan_units([170, 171] * 4, 3, EngineOptions(bucket_ratio=1.0)))


def test_plan_units_refuses_a_prompt_over_the_token_budgets():
    opts = EngineOptions(max_chunk_tokens=1000, max_unit_tokens=1500)
    assert opts.max_prompt_tokens == 750  # a trunk row and one branch row must fit a unit
    assert plan_units([750, 20], 3, opts)
    with pytest.raises(ValueError, match=r"prompt 1 has 751 tokens; the engine scores at most 750 .*"
                                         r"engine.max_chunk_tokens = 1000.*engine.max_unit_tokens = 1500"):
        plan_units([20, 751], 3, opts)


# ---------------------------------------------------------------- torch.compile


@pytest.fixture(scope="module")
def tiny_model(qwen_tokenizer):
    """The seed-shaped layout cut to 2 layers, float32, built in memory (nothing to write and read back)."""
    return small_seed_model(qwen_tokenizer, seed=1, dtype=torch.float32, n_layers=2, n_heads=16)


def test_compiled_equals_uncompiled(tiny_model, short_prompts, rounding):
    tok = tiny_model.tokenizer
    ids = resolve_yes_no(tok)
    toks = [tok.encode(p, add_special_tokens=False) for p in short_prompts[:3]]
    toks.append(toks[0][:len(toks[2])])  # a same-length pair next to mixed lengths
    sets = [[], [(0, 3)], [(1, 0), (1, 15)], [(0, 1), (1, 2)], [(1, h) for h in range(16)]]
    plain = plain_reference(tiny_model, ids, toks, sets)
    eager = Scorer(tiny_model, ids, EngineOptions(compile=False)).score_tokens(toks, sets)
    start = time.perf_counter()
    compiled_scorer = Scorer(tiny_model, ids, EngineOptions(compile=True, max_rows=7))
    compiled = compiled_scorer.score_tokens(toks, sets)
    again = compiled_scorer.score_tokens(toks[:2], sets)  # new shapes after compilation
    elapsed = time.perf_counter() - start
    print(f"compiled path: {elapsed:.1f} s including compilation")
    assert compiled_scorer.forward.compile_error is None  # no silent fallback to eager
    assert compiled_scorer.forward.layer_fn is not decoder_layer
    # Float32 forwards of the tiny model; inductor fuses and reorders reductions: more of the same rounding.
    tol = ScoreTol.between_forwards(rounding(tiny_model))
    assert_scores_close(eager, plain, tol, "eager vs plain")
    assert_scores_close(compiled, eager, tol, "compiled vs eager")
    assert_scores_close(again, {f: getattr(eager, f)[:2] for f in FIELDS}, tol, "compiled again vs eager")
