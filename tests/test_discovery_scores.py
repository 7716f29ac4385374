"""Discovery heuristics: attention to the target number, value vectors' direct Yes-No logit, and
the per-layer probes (a planted direction must be recovered; noise must be called noise)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from verif.analysis.discovery.attention import (
    attn_to_target_sums,
    encode_with_target_positions,
    target_spans,
    target_token_positions,
)
from verif.analysis.discovery.neurons import logit_yes_no
from verif.analysis.discovery.probes import (
    binomial_tail,
    fit_logistic,
    fit_probes,
    last_position_residuals,
    probe_cosines,
    probe_table,
    stratified_split,
)
from verif.model.score import resolve_yes_no
from verif.task.prompts import render_prompt
from tests.support.exact_models import small_seed_model
from tests.tolerances import U64, gamma

ATTEMPTS = [  # (numbers, target, attempt)
    ([79, 17, 60], 36, "79 - 60 + 17 = 19 + 17 = 36"),
    ([3, 5, 7], 22, "3 * 5 + 7 = 15 + 7 = 22"),
    ([12, 4, 9, 2], 50, "12 * 4 + 9 - 2 = 48 + 9 - 2 = 57 - 2 = 55"),
]


@pytest.fixture(scope="module")
def small(qwen_tokenizer):
    return small_seed_model(qwen_tokenizer, seed=1)


def test_target_spans_count_whole_numbers_only():
    text = "equals 36. Not 136, 3.6, 36.5 or 360; 7 + 29 = 36"
    spans = target_spans(text, 36)
    assert [text[a:b] for a, b in spans] == ["36", "36"]
    assert spans[0] == (7, 9) and spans[1][1] == len(text)


def test_target_token_positions_on_the_study_prompt(qwen_tokenizer):
    prompt = render_prompt(*ATTEMPTS[0])
    enc = qwen_tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    positions = target_token_positions(prompt, 36, enc["offset_mapping"])
    # Twice in the task statement, twice in the attempt (its claimed result); Qwen spells "36" as two digit tokens.
    assert "".join(qwen_tokenizer.decode([enc["input_ids"][p]]) for p in positions).replace(" ", "") == "36" * 4
    ids, all_positions = encode_with_target_positions(qwen_tokenizer, [prompt], [36])
    assert ids[0] == qwen_tokenizer.encode(prompt, add_special_tokens=False) and all_positions[0] == positions
    with pytest.raises(ValueError, match="no copy of the target 37"):
        target_token_positions(prompt, 37, enc["offset_mapping"])


def reference_attention(model, arch, toks, positions) -> np.ndarray:
    """[L, H] attention of the last position to `positions`, from the layers' own q/k projections
    and rotary tables (softmax written out; the model runs its SDPA path)."""
    inputs, handles = {}, []
    for layer, block in enumerate(model.model.layers):
        def keep(module, args, kwargs, layer=layer):
            inputs[layer] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        handles.append(block.self_attn.register_forward_pre_hook(keep, with_kwargs=True))
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([toks]))
            out = np.zeros((arch.n_layers, arch.n_heads))
            seq, d = len(toks), arch.head_dim
            for layer, block in enumerate(model.model.layers):
                x = inputs[layer][0]
                q = block.self_attn.q_proj(x).view(seq, arch.n_heads, d)
                k = block.self_attn.k_proj(x).view(seq, arch.n_kv_heads, d)
                cos, sin = (t[0, :, None, :] for t in model.model.rotary_emb(x[None], torch.arange(seq)[None]))

                def rope(t):
                    half = d // 2
                    return t * cos + torch.cat((-t[..., half:], t[..., :half]), -1) * sin

                q, k = rope(q), rope(k).repeat_interleave(arch.n_heads // arch.n_kv_heads, dim=1)
                probs = torch.softmax(torch.einsum("hd,thd->ht", q[-1], k) * d**-0.5, dim=-1)
                out[layer] = probs[:, positions].sum(-1).numpy()
    finally:
        for h in handles:
            h.remove()
    return out


def test_attn_to_target_matches_attention_from_q_and_k(small, qwen_tokenizer):
    prompts = [render_prompt(*a) for a in ATTEMPTS]
    token_ids, positions = encode_with_target_positions(qwen_tokenizer, prompts, [a[1] for a in ATTEMPTS])
    got = attn_to_target_sums(small.model, small.arch, token_ids, positions, batch_size=2)
    expected = np.mean([reference_attention(small.model, small.arch, t, p) for t, p in zip(token_ids, positions)], axis=0)
    # Eager attention takes its softmax in float32 even in a float64 model: probabilities carry ~6e-8
    # relative rounding, summed over <= 8 tokens; 1e-6 is above that, and a wrong or shifted token
    # moves a score by ~1e-2 (each token holds ~1/200 of the mass on average, far more on targets).
    np.testing.assert_allclose(got.mean("attn_to_target"), expected, rtol=0, atol=1e-6)
    assert small.model.config._attn_implementation == "sdpa"  # switched back after the pass
    assert expected.min() > 0 and expected.max() < 1


def test_logit_yes_no_is_the_unembedded_value_vector(small):
    ids = resolve_yes_no(small.tokenizer)
    got = logit_yes_no(small.model, ids)
    assert got.shape == (small.arch.n_layers, small.arch.intermediate_size)
    model = small.model
    for layer, neuron in [(0, 0), (1, 17), (3, 63)]:
        v = model.model.layers[layer].mlp.down_proj.weight[:, neuron]
        logits = model.lm_head(model.model.norm.weight * v)  # the module itself, full vocabulary
        expected = logits[list(ids.yes)].mean() - logits[list(ids.no)].mean()
        # float64 dot products of 32 terms, in two orders: ~1e-15 relative.
        assert got[layer, neuron] == pytest.approx(float(expected), rel=1e-12)


def test_last_position_residuals_are_the_layer_outputs(small, qwen_tokenizer, short_prompts):
    """Against the model's own hidden states, one unpadded prompt at a time (transformers returns the
    last layer's output after the final norm, so that one is compared through the norm)."""
    token_ids = [qwen_tokenizer.encode(p, add_special_tokens=False) for p in short_prompts]
    got = last_position_residuals(small.model, token_ids, 151643, batch_size=3)  # padded batches
    assert got.shape == (len(token_ids), small.arch.n_layers, small.model.config.hidden_size)
    for i, toks in enumerate(token_ids):
        with torch.no_grad():
            states = small.model(input_ids=torch.tensor([toks]), output_hidden_states=True).hidden_states
            last = small.model.model.norm(torch.from_numpy(got[i, -1]).double())
        expected = np.stack([s[0, -1].numpy() for s in states[1:-1]])
        # Stored as float32: 6e-8 relative rounding of values up to ~1e2.
        np.testing.assert_allclose(got[i, :-1], expected, rtol=1e-6, atol=1e-5)
        np.testing.assert_allclose(last.numpy(), states[-1][0, -1].numpy(), rtol=1e-5, atol=1e-5)


def planted(n: int, d: int, seed: int, signal: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Residual-like data: a large common offset, noise, and labels set by a planted direction u
    (or independent of the data when `signal` is False)."""
    rng = np.random.default_rng(seed)
    u = rng.normal(size=d)
    u /= np.linalg.norm(u)
    x = 30.0 * rng.normal(size=d) + rng.normal(size=(n, d))
    y = (x - x.mean(0)) @ u + 0.2 * rng.normal(size=n) > 0 if signal else rng.random(n) < 0.5
    return x, y, u


def test_probe_recovers_a_planted_direction_and_calls_noise_noise():
    n, d = 400, 48
    x_signal, y, u = planted(n, d, 0, True)
    x_noise = np.random.default_rng(1).normal(size=(n, d))  # same labels, no information
    residuals = np.stack([x_noise, x_signal], axis=1)  # layer 0 noise, layer 1 signal
    noise_probe, signal_probe = fit_probes(residuals, y, seed=0)
    cos = signal_probe.weight @ u / np.linalg.norm(signal_probe.weight)
    # A random 48-dim direction has |cos| ~ 1/sqrt(48) = 0.14 with u; 300 training prompts pin 48
    # weights only to a sampling error of roughly sqrt(48 / 300) ~ 0.4 rad, so cos ~ 0.9-0.95.
    assert cos > 0.85
    # Best possible accuracy ~ 1 - atan(0.2) / pi = 0.94; no information: 0.5 +- 0.05 on 100 prompts.
    assert signal_probe.heldout_acc > 0.8 and signal_probe.separates and signal_probe.p_value < 1e-10
    assert not noise_probe.separates and noise_probe.heldout_acc < 0.65
    table = probe_table("m", [noise_probe, signal_probe])
    assert table["separates"].to_list() == [False, True] and table["n_test"].to_list() == [100, 100]

    # probe_cos: a layer-0 value vector along u wins; a layer above every probe is unscored (NaN).
    values = [np.random.default_rng(2).normal(size=(d, 10)) for _ in range(3)]
    values[0][:, 7] = 5.0 * u
    scores = probe_cosines(values, [noise_probe, signal_probe])
    assert np.nanargmax(scores[0]) == 7 and scores[0, 7] == pytest.approx(cos, rel=1e-12)
    assert np.isnan(scores[2]).all() and np.isfinite(scores[:2]).all()
    # only_separating=False adds the noise probe (layer 0) to the max of layer 0: scores can only grow. A
    # maximum it does not change is the same cosine computed by another matrix product (two probe rows, not
    # one: another BLAS kernel and summation order), so equal maxima may differ by the rounding of a d-term
    # dot product of unit vectors (sum of |terms| <= 1 by Cauchy-Schwarz) in each of the two products.
    tol = 2 * gamma(d, U64)
    grown = probe_cosines(values, [noise_probe, signal_probe], only_separating=False)[:2]
    assert (grown >= scores[:2] - tol).all()
    assert (grown > scores[:2] + tol).any()  # the noise probe does win somewhere: the comparison is not vacuous


def test_fit_logistic_solves_its_penalised_problem():
    """At the returned (w, b) the gradient of the documented loss (in the scaled coordinates) is 0."""
    x, y, _ = planted(120, 16, 5, True)
    l2 = 1e-2
    w, b = fit_logistic(x, y, l2)
    mean = x.mean(0)
    scale = np.sqrt(((x - mean) ** 2).sum(1).mean())
    xs = (x - mean) / scale
    w_s, b_s = w * scale, b + mean @ w  # back to the scaled coordinates the penalty is written in
    p = 1 / (1 + np.exp(-(xs @ w_s + b_s)))
    grad_w = xs.T @ (p - y) / len(y) + l2 * w_s
    grad_b = (p - y).mean()
    assert np.abs(grad_w).max() <= 1e-6 and abs(grad_b) <= 1e-6  # probes.GRAD_TOL
    assert np.linalg.norm(w_s) > 1  # not the trivial solution


def test_split_and_binomial_tail():
    labels = np.array([True] * 10 + [False] * 6)
    train, test = stratified_split(labels, 0.25, seed=3)
    assert sorted(np.concatenate([train, test])) == list(range(16))
    assert labels[test].sum() == 2 and (~labels[test]).sum() == 2  # round(0.25 * 10) = 2, round(1.5) = 2
    with pytest.raises(ValueError, match="2 correct and >= 2 incorrect"):
        stratified_split(np.array([True] * 5 + [False]), 0.25, 0)
    assert binomial_tail(0, 10, 0.5) == 1.0
    assert binomial_tail(10, 10, 0.5) == pytest.approx(2.0**-10)
    assert binomial_tail(8, 10, 0.5) == pytest.approx((45 + 10 + 1) / 1024)
