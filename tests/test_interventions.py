"""Mean, positional-mean and resample interventions in the engine, against an independent reference.

The reference (`tests/support/interventions.py`) reads and overwrites activations with its own hooks on the
model's own o_proj and down_proj, one unpadded prompt at a time, means and partner activations computed
separately with numpy. The engine runs the four kinds per row, mixed in one forward, on the fast path (shared
trunk) and on the hook path. Models: the seed-shaped model in float64 (exactness) and the packaged SmolLM2 in
float32 (real weights). Resample uses hand-made pairs: two prompts cut to one token length each.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.support.interventions import means_of, own_inputs, reference_table
from tests.tolerances import ScoreTol, assert_scores_close
from verif.design.conditions import CROSS_KINDS, INTERVENTIONS, PAIRED_KINDS, REFERENCE_KINDS, Ablation
from verif.design.heads import parse_heads
from verif.design.neurons import parse_neurons
from verif.model.engine import EngineOptions, Scorer
from verif.model.interventions import Sites, Sources
from verif.model.score import resolve_yes_no

FIELDS = ("p_yes", "p_no", "p_yes_norm", "log_odds")
# The kinds one model's own passes feed; cross reads another model's activations (tests/test_cmap_sweep.py checks
# it against hooks on a planted pair of models).
KINDS = tuple(k for k in INTERVENTIONS if k not in CROSS_KINDS)
# Prompts 0 and 1, and 2 and 3, are pairs (equal token lengths); 14 vs 11 tokens: two length buckets.
LENGTHS = (14, 14, 11, 11)
PARTNERS = (1, 0, 3, 2)
SETS = {  # heads, and neurons (on SmolLM2 single late neurons move the answer by less than the tolerance)
    "seed": (parse_heads("L3 H13, L17 H14, L17 H2, L25 H11"), parse_neurons("L10 N5, L20 N7, L20 N100")),
    "smollm2": (parse_heads("L0 H3, L5 H0, L5 H8, L17 H1, L29 H8"), [(l, i) for l in (0, 1) for i in range(3, 1536, 64)]),
}


class Case:
    """A model, four prompts in two pairs, three component sets, their reference means and engine sources."""

    def __init__(self, name, loaded, short_prompts, tol: ScoreTol):
        self.name, self.loaded, self.tol = name, loaded, tol
        self.ids = resolve_yes_no(loaded.tokenizer)
        tok = loaded.tokenizer
        self.toks = [tok.encode(p, add_special_tokens=False)[:n] for p, n in zip(short_prompts, LENGTHS)]
        assert [len(t) for t in self.toks] == list(LENGTHS)
        heads, neurons = (tuple(s) for s in SETS["seed" if "seed" in name else name])
        self.sets = [(heads, ()), ((), neurons), (heads[:2], neurons[1:])]
        self.means = means_of(loaded.model, self.toks)  # the reference prompts are the scored ones (the default)
        self._reference: dict = {}

    def ablations(self, kind: str) -> list[Ablation]:
        return [Ablation()] + [Ablation(h, n, kind) for h, n in self.sets]

    def sources(self, scorer: Scorer, ablations) -> Sources:
        """The engine's sources from its own passes, as a sweep makes them: reference means over the four prompts
        of the mean kinds' components, the partners' cache of the resample conditions' components."""
        means = cache = None
        reference, paired = Sites.of(ablations, REFERENCE_KINDS), Sites.of(ablations, PAIRED_KINDS)
        if reference:
            means = scorer.reference_sums(self.toks, reference, positional=True).means()
        if paired:
            cache = scorer.activations([self.toks[p] for p in PARTNERS], paired)
        return Sources(means, cache)

    def reference(self, kind: str):
        if kind not in self._reference:
            self._reference[kind] = reference_table(self.loaded, self.ids, self.toks, self.ablations(kind), self.means,
                                                    PARTNERS)
        return self._reference[kind]


@pytest.fixture(scope="module")
def _cases():
    return {}


@pytest.fixture(scope="module", params=["seed64", "smollm2"])
def case(request, _cases, short_prompts, rounding) -> Case:
    name = request.param
    if name not in _cases:
        if name == "seed64":
            loaded, tol = request.getfixturevalue("seed_model64"), ScoreTol.float64_forwards(
                rounding(request.getfixturevalue("seed_model")))
            assert tol.log < 1e-6  # the float64 tolerance, derived here from the model's rounding
        else:
            loaded = request.getfixturevalue("smollm2")
            tol = ScoreTol.between_forwards(rounding(loaded))
        _cases[name] = Case(name, loaded, short_prompts, tol)
    return _cases[name]


def _table(s) -> dict[str, np.ndarray]:
    return {f: getattr(s, f) for f in FIELDS}


@pytest.mark.parametrize("path", ["fast", "hook"])
@pytest.mark.parametrize("kind", KINDS)
def test_kind_equals_reference(case, kind, path):
    scorer = Scorer(case.loaded, case.ids, EngineOptions(path=path))
    abls = case.ablations(kind)
    got = scorer.score_tokens(case.toks, abls, case.sources(scorer, abls) if kind != "zero" else None)
    want = case.reference(kind)
    assert got.nonfinite == 0
    assert_scores_close(got, _table(want), case.tol, f"{case.name} {kind} {path} vs reference")
    # not vacuous: every set moves every prompt's answer by more than the tolerance
    assert (np.abs(want.log_odds[:, 1:] - want.log_odds[:, :1]) > 4 * case.tol.log).all()


def test_kinds_differ_from_each_other(case):
    """The four kinds are four different interventions here (one scored as another would be seen)."""
    lo = np.stack([case.reference(k).log_odds[:, 1:] for k in KINDS])
    for a in range(len(KINDS)):
        for b in range(a + 1, len(KINDS)):
            assert np.abs(lo[a] - lo[b]).max() > 10 * case.tol.log, (KINDS[a], KINDS[b])


def test_padded_units_equal_reference(case):
    """bucket_ratio 2 puts the 20- and 16-token prompts in one left-padded unit: positions from the end and the
    partners' activations are aligned to the right."""
    scorer = Scorer(case.loaded, case.ids, EngineOptions(bucket_ratio=2.0))
    abls = [a for kind in KINDS for a in case.ablations(kind)[1:]]
    got = scorer.score_tokens(case.toks, abls, case.sources(scorer, abls))
    want = {f: np.concatenate([getattr(case.reference(k), f)[:, 1:] for k in KINDS], axis=1) for f in FIELDS}
    assert_scores_close(got, want, case.tol, f"{case.name} padded unit vs reference")


def test_per_row_mixing_equals_rows_alone(case):
    """Rows of every kind and several sets in one forward (one unit, trunk shared, chunks of 5 rows), each kind's
    source covering only its own components as in a sweep, equal each condition scored alone."""
    mixed = [Ablation(), Ablation(*case.sets[0], "zero"), Ablation(*case.sets[1], "mean"),
             Ablation(*case.sets[0], "mean_positional"), Ablation(*case.sets[2], "resample"),
             Ablation(*case.sets[2], "mean"), Ablation(*case.sets[1], "resample"),
             Ablation(((20, 1), (3, 5)), (), "resample")]  # components no mean kind touches, in a layer one does
    scorer = Scorer(case.loaded, case.ids, EngineOptions(max_rows=5, bucket_ratio=2.0))
    sources = case.sources(scorer, mixed)
    together = scorer.score_tokens(case.toks, mixed, sources)
    alone = np.zeros_like(together.log_odds)
    every = Sites.of(mixed)  # alone, each condition reads sources that cover every component
    one = Sources(scorer.reference_sums(case.toks, every, positional=True).means(),
                  scorer.activations([case.toks[p] for p in PARTNERS], every))
    for j, a in enumerate(mixed):
        alone[:, j] = scorer.score_tokens(case.toks, [a], one).log_odds[:, 0]
    np.testing.assert_allclose(together.log_odds, alone, rtol=0, atol=case.tol.log)


def test_positional_mean_of_one_prompt_is_resample_from_it(case):
    """mean_positional over a reference of one prompt R is R's activation at each position from the end, which
    is resample from R on prompts of R's length. (Plain `mean` over one prompt averages its positions too.)"""
    scorer = Scorer(case.loaded, case.ids)
    r, scored = case.toks[1], [case.toks[0], case.toks[1]]  # both of R's length
    abls_pos = [Ablation(h, n, "mean_positional") for h, n in case.sets]
    abls_res = [Ablation(h, n, "resample") for h, n in case.sets]
    sites = Sites.of(abls_pos)
    means = scorer.reference_sums([r], sites, positional=True).means()
    pos = scorer.score_tokens(scored, abls_pos, Sources(means=means))
    res = scorer.score_tokens(scored, abls_res, Sources(cache=scorer.activations([r, r], sites)))
    assert_scores_close(pos, _table(res), case.tol, "mean_positional of R vs resample from R")
    mean = scorer.score_tokens(scored, [Ablation(h, n, "mean") for h, n in case.sets], Sources(means=means))
    assert np.abs(mean.log_odds - res.log_odds).max() > 10 * case.tol.log


@pytest.mark.parametrize("path", ["fast", "hook"])
def test_resample_from_itself_changes_nothing_exactly(case, path):
    scorer = Scorer(case.loaded, case.ids, EngineOptions(path=path, bucket_ratio=2.0))
    abls = [Ablation()] + [Ablation(h, n, "resample") for h, n in case.sets]
    got = scorer.score_tokens(case.toks, abls, Sources(cache=scorer.activations(case.toks, Sites.of(abls))))
    for j in range(1, len(abls)):
        np.testing.assert_array_equal(got.log_odds[:, j], got.log_odds[:, 0])


def test_activations_are_the_model_inputs(case):
    """`Scorer.activations` (the cache filler) reads what the model's own o_proj and down_proj receive."""
    scorer = Scorer(case.loaded, case.ids, EngineOptions(bucket_ratio=2.0))
    sites = Sites.of([Ablation(h, n, "resample") for h, n in case.sets])
    cache = scorer.activations(case.toks, sites)
    d = case.loaded.arch.head_dim
    atol = 1e-9 if "64" in case.name else 1e-4
    for i, toks in enumerate(case.toks):
        own = own_inputs(case.loaded.model, toks)
        for site, layer in sites.keys():
            want = own[site][layer][:, sites.columns((site, layer), d)]
            np.testing.assert_allclose(cache.entries[i][(site, layer)].double().numpy(), want, rtol=0, atol=atol)


def test_reference_sums_add_over_shards(case):
    """Sums of two shards of prompts (of different lengths) add to the sums of all; positions from the end
    that only the longer prompts have are averaged over those."""
    scorer = Scorer(case.loaded, case.ids)
    sites = Sites.of([Ablation(*case.sets[2], "mean")])
    whole = scorer.reference_sums(case.toks, sites, positional=True)
    parts = scorer.reference_sums(case.toks[2:], sites, True) + scorer.reference_sums(case.toks[:2], sites, True)
    assert parts.n_tokens == whole.n_tokens == sum(LENGTHS) and list(parts.n_at) == [4] * 11 + [2] * 3
    a, b = whole.means(), parts.means()
    d = case.loaded.arch.head_dim
    for key in sites.keys():
        np.testing.assert_allclose(a.mean[key], b.mean[key], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(a.positional[key], b.positional[key], rtol=1e-12, atol=1e-12)
        site, layer = key
        cols = sites.columns(key, d)
        np.testing.assert_allclose(a.mean[key], case.means["mean"][site][layer][cols], rtol=0,
                                   atol=1e-9 if "64" in case.name else 1e-5)


def test_missing_sources_are_refused_before_any_forward(seed_model):
    ids = resolve_yes_no(seed_model.tokenizer)
    scorer = Scorer(seed_model, ids)
    toks = [[11] * 8, [12] * 6]
    with pytest.raises(ValueError, match="mean and mean_positional need the reference prompts' means"):
        scorer.score_tokens(toks, [Ablation(((3, 1),), kind="mean")])
    with pytest.raises(ValueError, match="resample needs an activation cache"):
        scorer.score_tokens(toks, [Ablation(((3, 1),), kind="resample")])
    sites = Sites.of([Ablation(((3, 1),), kind="resample")])
    with pytest.raises(ValueError, match="prompt 1 has 6 tokens but its cached activations 8"):
        scorer.score_tokens(toks, [Ablation(((3, 1),), kind="resample")],
                            Sources(cache=scorer.activations([[11] * 8, [13] * 8], sites)))
    means = scorer.reference_sums([[11] * 7], sites, positional=True).means()
    with pytest.raises(ValueError, match="prompt 0 has 8 tokens, more than the longest reference prompt \\(7\\)"):
        scorer.score_tokens(toks, [Ablation(((3, 1),), kind="mean_positional")], Sources(means=means))


def _changed(toks, position: int) -> list[int]:
    """`toks` with the token at `position` replaced by another id: a pair that first differs there."""
    out = list(toks)
    out[position] = toks[position] + 1
    return out


def test_resample_skips_the_positions_a_pair_shares(case):
    """A pair that first differs at position 6 (of 14) and one that differs at position 0 (nothing to skip), with
    zero, mean and resample rows in one unit: the resample rows compute positions >= 6 only (row-positions by
    hand), and every row equals the same rows with every position computed (a cache that does not say its
    tokens), the unshared path, the hook reference one prompt at a time, and each condition scored alone."""
    first = 6
    a, b = case.toks[0], case.toks[2]
    toks = [a, _changed(a, first), b, _changed(b, 0)]
    partners = [1, 0, 3, 2]
    kinds = ("resample", "zero", "mean", "resample")
    abls = [Ablation()] + [Ablation(h, n, kind) for (h, n), kind in zip(case.sets + [case.sets[2]], kinds)]
    scorer = Scorer(case.loaded, case.ids)
    sites = Sites.of(abls)
    means = scorer.reference_sums(case.toks, Sites.of(abls, REFERENCE_KINDS), positional=True).means()
    cache = scorer.activations([toks[p] for p in partners], sites)
    assert cache.same_prefix(toks, scorer.origin) == [first, first, 0, 0]
    got = scorer.score_tokens(toks, abls, Sources(means, cache))
    unknown = type(cache)(cache.sites, cache.entries)  # no tokens, no origin: every position is computed
    full = scorer.score_tokens(toks, abls, Sources(means, unknown))
    unshared = Scorer(case.loaded, case.ids, EngineOptions(share_trunk=False)).score_tokens(toks, abls,
                                                                                            Sources(means, cache))
    want = reference_table(case.loaded, case.ids, toks, abls, case.means, partners)
    for other, what in ((full, "every position"), (unshared, "unshared"), (_table(want), "hook reference")):
        assert_scores_close(got, other if isinstance(other, dict) else _table(other), case.tol, f"{case.name} vs {what}")
    alone = np.column_stack([scorer.score_tokens(toks, [x], Sources(means, cache)).log_odds[:, 0] for x in abls])
    np.testing.assert_allclose(got.log_odds, alone, rtol=0, atol=case.tol.log)
    # only the first pair's resample rows skip: 2 prompts x `first` positions x the layers each row runs
    n_layers = case.loaded.arch.n_layers
    skipped = sum(2 * first * (n_layers - min(x.layers)) for x in abls[1:] if x.kind == "resample")
    assert got.row_layers == full.row_layers and full.row_positions - got.row_positions == skipped
    # not vacuous: a resample row left at the baseline would be more than the tolerance off the reference
    assert (np.abs(want.log_odds[:, [1, 4]] - want.log_odds[:, :1]) > 2 * case.tol.log).all()
