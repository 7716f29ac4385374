"""Discovery effect estimates: AtP against an independent float64 autograd computation, AtP equal to
the exact effect where the objective is linear, exact effects against single-condition runs.

The reference computations here share nothing with `verif.analysis.discovery` but the model: one
prompt per forward (no padding, no batching), zero leaves added at the hooked inputs instead of
gradient hooks on them, and the Yes/No arithmetic written out.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from verif.analysis.discovery.atp import atp_sums
from verif.design.conditions import Ablation
from verif.analysis.discovery.exact import delta_sums, heads_to_screen, single_head_sets
from verif.analysis.discovery.inputs import length_batches, same_length_batches
from verif.analysis.discovery.metric import choose_prompts
from verif.analysis.discovery.sums import PromptSums, combine
from verif.model.ablation import AblationMasks, HookedAblation, head_masks
from verif.model.engine import EngineOptions, Scorer
from verif.model.interventions import Sites, Sources, all_components
from verif.model.score import resolve_yes_no, score_plain
from tests.support.exact_models import small_seed_model

PAD = 151643  # Qwen2.5's <|endoftext|>
# float64 throughout (float64 norms, see tests/support/exact_models.py): results that sum the same
# terms in other orders differ by ~sqrt(n) * 1.1e-16 relative per operation over 4 layers; 1e-9 of
# the largest value leaves a wide margin and still fails on any real error (a padded position
# counted, a head slice shifted, a prompt dropped: all O(1) relative).
F64 = 1e-9


@pytest.fixture(scope="module")
def small(qwen_tokenizer):
    return small_seed_model(qwen_tokenizer)


@pytest.fixture(scope="module")
def tokens(qwen_tokenizer, short_prompts):
    return [qwen_tokenizer.encode(p, add_special_tokens=False) for p in short_prompts]


def reference_atp(model, arch, token_ids, yes, no, z_ref=None) -> tuple[np.ndarray, np.ndarray, float]:
    """sum over prompts and positions of (z_ref - z) . dM/dz, M = mean log-odds, by autograd on zero leaves;
    `z_ref(i, kind, layer)` is prompt i's reference input `[T, width]` there (None: 0)."""
    heads = np.zeros((arch.n_layers, arch.n_heads))
    neurons = np.zeros((arch.n_layers, arch.intermediate_size))
    objective = 0.0
    n = len(token_ids)
    for i, toks in enumerate(token_ids):
        leaves, inputs, handles = {}, {}, []

        def add_leaf(key):
            def pre_hook(module, args):
                x = args[0]
                leaves[key] = torch.zeros_like(x, requires_grad=True)
                inputs[key] = x.detach()
                return (x + leaves[key],)
            return pre_hook

        for layer, block in enumerate(model.model.layers):
            handles.append(block.self_attn.o_proj.register_forward_pre_hook(add_leaf(("head", layer))))
            handles.append(block.mlp.down_proj.register_forward_pre_hook(add_leaf(("neuron", layer))))
        try:
            with torch.enable_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([toks])).logits[0, -1].double(), -1)
                m = (torch.logsumexp(logp[list(yes)], 0) - torch.logsumexp(logp[list(no)], 0)) / n
                keys = list(leaves)
                grads = torch.autograd.grad(m, [leaves[k] for k in keys])
        finally:
            for h in handles:
                h.remove()
        objective += float(m.detach())
        for (kind, layer), g in zip(keys, grads):
            ref = 0 if z_ref is None else torch.as_tensor(z_ref(i, kind, layer), dtype=g.dtype)
            contrib = ((ref - inputs[(kind, layer)]) * g)[0].double()  # [T, width]
            if kind == "head":
                heads[layer] += contrib.view(len(toks), arch.n_heads, arch.head_dim).sum((0, 2)).numpy()
            else:
                neurons[layer] += contrib.sum(0).numpy()
    return heads, neurons, objective


def test_atp_equals_float64_autograd_reference(small, tokens):
    ids = resolve_yes_no(small.tokenizer)
    ref_heads, ref_neurons, ref_m = reference_atp(small.model, small.arch, tokens, ids.yes, ids.no)
    # Two shards (padded batches of 2 and of 1 + 1), combined as a driver would.
    parts = [atp_sums(small.model, small.arch, tokens[:2], ids, PAD, batch_size=2),
             atp_sums(small.model, small.arch, tokens[2:], ids, PAD, batch_size=1)]
    total = combine(parts)
    assert total.n_prompts == len(tokens)
    np.testing.assert_allclose(total.mean("atp_heads"), ref_heads, rtol=0, atol=F64 * np.abs(ref_heads).max())
    np.testing.assert_allclose(total.mean("atp_neurons"), ref_neurons, rtol=0, atol=F64 * np.abs(ref_neurons).max())
    assert float(total.mean("log_odds")) == pytest.approx(ref_m, rel=F64)
    assert np.abs(ref_heads).max() > 1e-2  # not vacuous: heads move the verdict in this model


def test_atp_of_a_float32_model_matches_float64(qwen_tokenizer, tokens):
    """The usual case, a float32 model, against the float64 reference on the same weights."""
    f32 = small_seed_model(qwen_tokenizer, dtype=torch.float32)
    f64 = small_seed_model(qwen_tokenizer, dtype=torch.float32)
    f64.model.double()
    ids = resolve_yes_no(qwen_tokenizer)
    ref_heads, ref_neurons, _ = reference_atp(f64.model, f64.arch, tokens, ids.yes, ids.no)
    got = atp_sums(f32.model, f32.arch, tokens, ids, PAD, batch_size=4)
    # float32 forward and backward through 4 layers of random weights with a large residual stream
    # (|h| ~ 1e2) and a log-softmax over 152k logits: relative rounding ~ 1e3 * 6e-8 of the largest
    # score; 1e-4 of the largest is above that and well below what a real error moves (O(1)).
    np.testing.assert_allclose(got.mean("atp_heads"), ref_heads, rtol=0, atol=1e-4 * np.abs(ref_heads).max())
    np.testing.assert_allclose(got.mean("atp_neurons"), ref_neurons, rtol=0, atol=1e-4 * np.abs(ref_neurons).max())


def test_atp_refuses_a_bf16_model(qwen_tokenizer, tokens):
    bf16 = small_seed_model(qwen_tokenizer, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="float32 or float64"):
        atp_sums(bf16.model, bf16.arch, tokens, resolve_yes_no(qwen_tokenizer), PAD)


def test_atp_equals_exact_where_the_objective_is_linear(qwen_tokenizer, tokens):
    """Last layer's MLP output zeroed and the final norm removed: with one Yes and one No variant the
    log-odds are logit(Yes) - logit(No), linear in the last layer's head outputs, so the first-order
    estimate is the exact effect."""
    linear = small_seed_model(qwen_tokenizer, seed=3)
    last = linear.arch.n_layers - 1
    linear.model.model.layers[last].mlp.down_proj.weight.data.zero_()
    linear.model.model.norm = torch.nn.Identity()
    ids = resolve_yes_no(qwen_tokenizer, yes=(" Yes",), no=(" No",))
    atp = atp_sums(linear.model, linear.arch, tokens, ids, PAD, batch_size=3)
    heads = [(last, h) for h in range(linear.arch.n_heads)]
    exact = delta_sums(Scorer(linear, ids, EngineOptions(pad_id=PAD)), tokens, single_head_sets(heads))
    atp_last = atp.mean("atp_heads")[last]
    assert np.abs(exact.mean("delta")).max() > 1e-2  # the heads do move the verdict
    np.testing.assert_allclose(atp_last, exact.mean("delta"), rtol=0, atol=F64 * np.abs(atp_last).max())
    assert float(atp.mean("log_odds")) == pytest.approx(float(exact.mean("log_odds")), rel=F64)


def test_exact_equals_single_condition_runs(small, tokens):
    """One engine call for several sets (two shards) against the plain path, one prompt and one
    condition per forward."""
    ids = resolve_yes_no(small.tokenizer)
    sets = [Ablation(heads=((0, 1),)), Ablation(heads=((2, 3),)), Ablation(heads=((1, 0), (3, 2), (3, 3)))]
    scorer = Scorer(small, ids, EngineOptions(pad_id=PAD))
    got = delta_sums(scorer, tokens[:3], sets) + delta_sums(scorer, tokens[3:], sets)
    masks = head_masks([(), *[s.heads for s in sets]], small.arch)
    lo = np.zeros((len(tokens), len(sets) + 1))
    with HookedAblation(small.model, small.arch) as hooks:
        for i, toks in enumerate(tokens):
            for c in range(len(sets) + 1):
                lo[i, c] = score_plain(small.model, hooks, [toks], masks[c:c + 1], ids, PAD).log_odds[0]
    expected = (lo[:, 1:] - lo[:, :1]).mean(0)
    assert np.abs(expected).min() > 1e-3  # every set has an effect to get right
    np.testing.assert_allclose(got.mean("delta"), expected, rtol=F64, atol=0)
    assert float(got.mean("log_odds")) == pytest.approx(lo[:, 0].mean(), rel=F64)


def test_exact_neuron_and_mixed_sets_equal_single_condition_runs(small, tokens):
    """Neuron sets (and a set of heads and neurons) through the engine against the plain hook path."""
    ids = resolve_yes_no(small.tokenizer)
    sets = [Ablation(neurons=((1, 5),)), Ablation(neurons=((0, 3), (2, 7), (2, 8))),
            Ablation(heads=((1, 0),), neurons=((3, 1),))]
    got = delta_sums(Scorer(small, ids, EngineOptions(pad_id=PAD)), tokens, sets)
    masks = AblationMasks.build([Ablation(), *sets], small.arch)
    lo = np.zeros((len(tokens), len(sets) + 1))
    with HookedAblation(small.model, small.arch) as hooks:
        for i, toks in enumerate(tokens):
            for c in range(len(sets) + 1):
                lo[i, c] = score_plain(small.model, hooks, [toks], masks.select([c]), ids, PAD).log_odds[0]
    expected = (lo[:, 1:] - lo[:, :1]).mean(0)
    assert np.abs(expected).min() > 1e-6  # every set has an effect to get right
    np.testing.assert_allclose(got.mean("delta"), expected, rtol=F64, atol=0)


def test_heads_to_screen():
    atp = np.array([[0.1, -3.0, 0.0], [2.0, -0.5, 2.0]])
    assert heads_to_screen(atp, "all") == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert heads_to_screen(atp, 3) == [(0, 1), (1, 0), (1, 2)]  # by |atp|, ties in index order
    assert len(heads_to_screen(atp, 64)) == 6
    for bad in (0, -1, "some", 2.5, True):
        with pytest.raises(ValueError, match="discover.exact"):
            heads_to_screen(atp, bad)


def test_choose_prompts():
    labels = [True, False, True, False, False]
    assert choose_prompts(labels, "correct") == [0, 2]
    assert choose_prompts(labels, "incorrect") == [1, 3, 4]
    assert choose_prompts(labels, "all") == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="'wrong' is not one of correct, incorrect, all"):
        choose_prompts(labels, "wrong")
    with pytest.raises(ValueError, match="selects no prompt"):
        choose_prompts([False, False], "correct")


def test_prompt_sums_add_and_refuse_mismatches():
    a = PromptSums({"x": np.array([1.0, 2.0])}, 2)
    b = PromptSums({"x": np.array([3.0, 6.0])}, 4)
    np.testing.assert_array_equal(combine([a, b]).mean("x"), [4.0 / 6, 8.0 / 6])
    with pytest.raises(ValueError, match="cannot add"):
        a + PromptSums({"y": np.array([1.0, 2.0])}, 1)
    with pytest.raises(ValueError, match="shapes"):
        a + PromptSums({"x": np.array([1.0])}, 1)
    with pytest.raises(ValueError, match="zero prompts"):
        PromptSums({"x": np.zeros(1)}, 0).mean("x")


def test_batches_sort_by_length_and_same_length_batches_never_pad():
    tokens = [[1] * n for n in (5, 3, 5, 5, 3, 7)]
    assert length_batches(tokens, 4) == [[1, 4, 0, 2], [3, 5]]
    assert same_length_batches(tokens, 2) == [[1, 4], [0, 2], [3], [5]]
    with pytest.raises(ValueError, match="batch_size"):
        length_batches(tokens, 0)


# ---------------------------------------------------------------- AtP against mean and partner activations


def _pairs(tokens):
    """Hand-made pairs of equal token length: prompt 2k and 2k+1 cut to the shorter's length."""
    out = []
    for a, b in ((0, 1), (2, 3)):
        n = min(len(tokens[a]), len(tokens[b]))
        out += [tokens[a][:n], tokens[b][:n]]
    return out, [1, 0, 3, 2]


def _own_inputs(model, toks) -> dict:
    got, handles = {}, []
    for layer, block in enumerate(model.model.layers):
        for kind, mod in (("head", block.self_attn.o_proj), ("neuron", block.mlp.down_proj)):
            handles.append(mod.register_forward_pre_hook(
                lambda m, a, key=(kind, layer): got.__setitem__(key, a[0][0].detach().clone())))
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([list(toks)]))
    finally:
        for h in handles:
            h.remove()
    return got


def _own_means(model, token_ids) -> dict:
    """Mean o_proj and down_proj input over every position of these prompts, as atp_sums takes them."""
    reads = [_own_inputs(model, t) for t in token_ids]
    site = {"head": "heads", "neuron": "neurons"}
    return {(site[k], l): torch.cat([r[(k, l)] for r in reads]).mean(0).numpy() for k, l in reads[0]}


@pytest.mark.parametrize("kind", ["mean", "resample"])
def test_atp_with_a_reference_equals_float64_autograd(small, tokens, kind):
    """(z_ref - z) . dM/dz with z_ref the reference prompts' mean or the partner's activation, padded batches
    (the two pairs differ in length), against autograd one prompt at a time."""
    ids = resolve_yes_no(small.tokenizer)
    toks, partners = _pairs(tokens)
    model, arch = small.model, small.arch
    means = partner_toks = None
    if kind == "mean":
        means = _own_means(model, tokens)
        z_ref = lambda i, k, l: means[({"head": "heads", "neuron": "neurons"}[k], l)]  # noqa: E731
    else:
        partner_toks = [toks[p] for p in partners]
        reads = [_own_inputs(model, t) for t in partner_toks]
        z_ref = lambda i, k, l: reads[i][(k, l)]  # noqa: E731
    ref_heads, ref_neurons, _ = reference_atp(model, arch, toks, ids.yes, ids.no, z_ref)
    got = atp_sums(model, arch, toks, ids, PAD, batch_size=4, means=means, partners=partner_toks)
    np.testing.assert_allclose(got.mean("atp_heads"), ref_heads, rtol=0, atol=F64 * np.abs(ref_heads).max())
    np.testing.assert_allclose(got.mean("atp_neurons"), ref_neurons, rtol=0, atol=F64 * np.abs(ref_neurons).max())
    zero_heads, _, _ = reference_atp(model, arch, toks, ids.yes, ids.no)
    assert np.abs(ref_heads - zero_heads).max() > 1e-2 * np.abs(zero_heads).max()  # z_ref matters here


@pytest.mark.parametrize("kind", ["mean", "resample"])
def test_atp_equals_the_exact_effect_of_its_kind_where_the_objective_is_linear(qwen_tokenizer, tokens, kind):
    """In the linear model of the test above, AtP against the mean or the partner is the exact mean- or
    resample-ablation effect of each last-layer head (the engine's, through `Sources`). One prompt of each pair
    is scored: in a linear objective the two directions of a pair cancel exactly."""
    linear = small_seed_model(qwen_tokenizer, seed=3)
    last = linear.arch.n_layers - 1
    linear.model.model.layers[last].mlp.down_proj.weight.data.zero_()
    linear.model.model.norm = torch.nn.Identity()
    ids = resolve_yes_no(qwen_tokenizer, yes=(" Yes",), no=(" No",))
    pairs, _ = _pairs(tokens)
    toks, partner_toks = pairs[0::2], pairs[1::2]
    scorer = Scorer(linear, ids, EngineOptions(pad_id=PAD))
    sets = single_head_sets([(last, h) for h in range(linear.arch.n_heads)], kind)
    sites = Sites.of(sets)
    if kind == "mean":
        ref = scorer.reference_sums(toks, all_components(linear.arch.n_layers, linear.arch.n_heads,
                                                         linear.arch.n_neurons), positional=False).means()
        atp = atp_sums(linear.model, linear.arch, toks, ids, PAD, batch_size=4, means=ref.mean)
        sources = Sources(means=ref)
    else:
        atp = atp_sums(linear.model, linear.arch, toks, ids, PAD, batch_size=4, partners=partner_toks)
        sources = Sources(cache=scorer.activations(partner_toks, sites))
    exact = delta_sums(scorer, toks, sets, sources)
    assert np.abs(exact.mean("delta")).max() > 1e-2
    np.testing.assert_allclose(atp.mean("atp_heads")[last], exact.mean("delta"), rtol=0,
                               atol=F64 * np.abs(exact.mean("delta")).max())
