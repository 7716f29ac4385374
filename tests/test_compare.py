"""Mechanism comparison of two models (verif.analysis.compare) on the packaged SmolLM2."""

import copy
import math
from dataclasses import replace

import numpy as np
import polars as pl
import pytest
import torch

from verif.analysis.compare import compare_models, plot_comparison, summarize_comparison
from verif.model.loading import decoder_layers
from verif.model.score import left_pad, resolve_yes_no, scores_from_log_probs, yes_no_log_probs
from verif.task.countdown import generate_problems, make_attempts
from verif.task.prompts import render_prompt
from tests.tolerances import ScoreTol

PLANTED_LAYER = 12  # the layer whose down_proj gets one scaled row
PLANTED_ROW = 7
NEURON = 5


@pytest.fixture(scope="module")
def prompts():
    attempts = make_attempts(generate_problems(3, seed=2), seed=2)
    return [render_prompt(a.problem.numbers, a.problem.target, a.text) for a in attempts]


@pytest.fixture(scope="module")
def planted(smollm2):
    """A copy of SmolLM2 with row PLANTED_ROW of layer PLANTED_LAYER's down_proj scaled by 3."""
    model = copy.deepcopy(smollm2.model)
    decoder_layers(model)[PLANTED_LAYER].mlp.down_proj.weight[PLANTED_ROW] *= 3.0
    return replace(smollm2, model=model, name="smollm2-planted")


@pytest.fixture(scope="module")
def self_comparison(smollm2, prompts):
    return compare_models(smollm2, smollm2, prompts, neurons=[(0, NEURON), (29, NEURON)], batch_size=2)


def test_model_against_itself_is_identical_at_every_layer(self_comparison, prompts):
    res, lens = self_comparison.residual, self_comparison.lens
    assert res.height == len(prompts) * 30 and sorted(res["layer"].unique().to_list()) == list(range(30))
    assert (res["cos"] == 1.0).all() and (res["one_minus_cos"] == 0.0).all()  # exactly
    assert (res["norm_ratio"] == 1.0).all() and (res["max_abs_diff"] == 0.0).all() and res["top1_same"].all()
    a = lens.filter(pl.col("side") == "a").drop("side", "model")
    b = lens.filter(pl.col("side") == "b").drop("side", "model")
    assert a.equals(b)  # identical lens, top tokens included
    assert (self_comparison.neurons["diff"] == 0.0).all()


def test_last_layer_lens_is_the_models_own_prediction(smollm2, self_comparison, prompts, rounding):
    ids = resolve_yes_no(smollm2.tokenizer)
    batch = left_pad([smollm2.tokenizer(p)["input_ids"] for p in prompts], smollm2.tokenizer.pad_token_id)
    with torch.inference_mode():
        logits = smollm2.model(input_ids=batch[0], attention_mask=batch[1], position_ids=batch[2]).logits[:, -1]
    own = scores_from_log_probs(*(t.numpy() for t in yes_no_log_probs(logits, ids)))
    last = self_comparison.lens.filter((pl.col("side") == "a") & (pl.col("layer") == 29)).sort("prompt_id")
    # Same float32 ops on the same prompts, batched differently (3 rows at once vs 2 + 1, so other
    # padding): two float32 forwards, whose log-probabilities differ by <= 6 delta (tests/tolerances.py).
    tol = ScoreTol.between_forwards(rounding(smollm2))
    np.testing.assert_allclose(last["p_yes"].to_numpy(), own.p_yes, rtol=math.expm1(tol.log))
    np.testing.assert_allclose(last["p_no"].to_numpy(), own.p_no, rtol=math.expm1(tol.log))
    # The top token is the same where no other logit is within the two forwards' difference (3 delta).
    top2 = logits.topk(2, dim=-1).values
    assert (top2[:, 0] - top2[:, 1] > 2 * 3 * rounding(smollm2)).all()
    assert last["top_ids"].list.first().to_list() == logits.argmax(-1).tolist()
    for probs in last["top_probs"].to_list():  # probabilities (not logits), best first
        # a float64 softmax's k largest terms: each off by a few u relative, their sum by <= 1 + k * 1e-15
        assert all(1 >= p >= q > 0 for p, q in zip(probs, probs[1:])) and sum(probs) <= 1 + 1e-12


def test_residual_norms_match_an_independent_hook(smollm2, self_comparison, prompts):
    """hidden_states (layers 0..28) and the last-layer hook against forward hooks on every layer."""
    batch = left_pad([smollm2.tokenizer(p)["input_ids"] for p in prompts[:2]], smollm2.tokenizer.pad_token_id)
    seen = {}
    handles = [layer.register_forward_hook(lambda _m, _i, out, k=k: seen.__setitem__(k, out[:, -1].double()))
               for k, layer in enumerate(decoder_layers(smollm2.model))]
    try:
        with torch.inference_mode():
            smollm2.model(input_ids=batch[0], attention_mask=batch[1], position_ids=batch[2])
    finally:
        for h in handles:
            h.remove()
    norms = self_comparison.residual.filter(pl.col("prompt_id") < 2).sort("layer", "prompt_id")["norm_a"].to_numpy()
    # the same batch (prompts 0 and 1) through the same deterministic forward: equal to the last bit
    assert np.array_equal(norms, torch.stack([seen[k].norm(dim=-1) for k in range(30)]).flatten().numpy())


def test_planted_change_appears_from_its_layer_on_and_not_before(smollm2, planted, prompts):
    c = compare_models(smollm2, planted, prompts, neurons=[(PLANTED_LAYER, NEURON), (PLANTED_LAYER + 1, NEURON)])
    before = c.residual.filter(pl.col("layer") < PLANTED_LAYER)
    after = c.residual.filter(pl.col("layer") >= PLANTED_LAYER)
    assert (before["max_abs_diff"] == 0.0).all() and (before["cos"] == 1.0).all()
    assert (after["max_abs_diff"] > 0).all() and (after["one_minus_cos"] > 0).all()
    lens_a = c.lens.filter(pl.col("side") == "a").drop("side", "model").sort("layer", "prompt_id")
    lens_b = c.lens.filter(pl.col("side") == "b").drop("side", "model").sort("layer", "prompt_id")
    early = pl.col("layer") < PLANTED_LAYER
    assert lens_a.filter(early).equals(lens_b.filter(early))
    assert (lens_a.filter(~early)["p_yes"] != lens_b.filter(~early)["p_yes"]).all()
    # the planted layer's own down_proj input is upstream of the change; the next layer's is not
    n = c.neurons
    assert (n.filter(pl.col("layer") == PLANTED_LAYER)["diff"] == 0.0).all()
    assert (n.filter(pl.col("layer") == PLANTED_LAYER + 1)["diff"] != 0.0).all()


def test_summary_and_figure(self_comparison, prompts, tmp_path):
    summary = summarize_comparison(self_comparison, n_boot=200)
    res = summary["residual"]
    assert res.height == 30 and (res["n"] == len(prompts)).all()
    assert (res["cos"] == 1.0).all() and (res["cos_lo"] == 1.0).all() and (res["cos_hi"] == 1.0).all()
    lens = summary["lens"]
    assert lens.height == 60
    assert (lens["p_yes_norm_lo"] <= lens["p_yes_norm"]).all() and (lens["p_yes_norm"] <= lens["p_yes_norm_hi"]).all()
    assert summary["neurons"].height == 2
    path = plot_comparison(summary, self_comparison.names, len(prompts), tmp_path / "compare.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_models_with_different_vocabularies_are_refused(smollm2, seed_model, prompts):
    with pytest.raises(ValueError, match="different tokenizers"):
        compare_models(smollm2, seed_model, prompts)


def test_neurons_outside_the_model_are_refused(smollm2, prompts):
    with pytest.raises(ValueError, match=r"compare.neurons: \(layer 30, neuron 0\) is outside"):
        compare_models(smollm2, smollm2, prompts, neurons=[(30, 0)])
    with pytest.raises(ValueError, match=r"neurons 0..1535"):
        compare_models(smollm2, smollm2, prompts, neurons=[(0, 1536)])
