"""Yes/No scoring: token sets, float64 probabilities, non-finite detection, left padding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from verif.model.ablation import HookedAblation, head_masks
from verif.model.score import (
    YesNoIds,
    left_pad,
    resolve_yes_no,
    score_plain,
    scores_from_log_probs,
    yes_no_log_probs,
)
from tests.tolerances import U64, ScoreTol, assert_scores_close, gamma

QWEN_YES = (7414, 9454, 9834, 9693)
QWEN_NO = (2308, 2753, 902, 2152)


@pytest.fixture(scope="module")
def qwen_tok(qwen_tokenizer):
    return qwen_tokenizer


# ---------------------------------------------------------------- token sets


def test_default_ids_qwen25(qwen_tok):
    assert resolve_yes_no(qwen_tok) == YesNoIds(QWEN_YES, QWEN_NO)


def test_default_ids_smollm2(smollm2):
    ids = resolve_yes_no(smollm2.tokenizer)
    assert len(ids.yes) == 4 and len(ids.no) == 4
    assert not set(ids.yes) & set(ids.no)
    assert smollm2.tokenizer.decode([ids.yes[0]]) == " Yes"
    assert smollm2.tokenizer.decode([ids.no[1]]) == "No"


def test_custom_single_token_variants(qwen_tok):
    ids = resolve_yes_no(qwen_tok, yes=[" Yes"], no=[" No", " no"])
    assert ids == YesNoIds((7414,), (2308, 902))


@pytest.mark.parametrize("variant, n_tokens", [(" Yesss", 3), ("Definitely", 2)])
def test_multi_token_variant_refused(qwen_tok, variant, n_tokens):
    assert len(qwen_tok.encode(variant, add_special_tokens=False)) == n_tokens
    with pytest.raises(ValueError) as err:
        resolve_yes_no(qwen_tok, yes=(" Yes", variant))
    msg = str(err.value)
    assert repr(variant) in msg
    assert f"{n_tokens} tokens" in msg
    assert "scoring.yes" in msg


def test_multi_token_variant_in_no_set(qwen_tok):
    with pytest.raises(ValueError, match=r"scoring\.no: variant ' Nope nope' encodes to \d+ tokens"):
        resolve_yes_no(qwen_tok, no=(" No", " Nope nope"))


def test_overlapping_sets_refused(qwen_tok):
    with pytest.raises(ValueError, match=r"\[7414\].*both the yes and the no set"):
        resolve_yes_no(qwen_tok, yes=(" Yes", "Yes"), no=(" No", " Yes"))


def test_repeated_and_empty_sets_refused(qwen_tok):
    with pytest.raises(ValueError, match="repeat a token id"):
        resolve_yes_no(qwen_tok, yes=(" Yes", " Yes"))
    with pytest.raises(ValueError, match=r"scoring\.no: at least one variant"):
        resolve_yes_no(qwen_tok, no=())


# ---------------------------------------------------------------- probabilities


def _manual(logits_last: torch.Tensor, ids: YesNoIds):
    """float64 softmax by hand: exp(x - max) / sum, summed over the variants."""
    x = logits_last.double()
    e = torch.exp(x - x.max(-1, keepdim=True).values)
    p = e / e.sum(-1, keepdim=True)
    return p[:, list(ids.yes)].sum(-1).numpy(), p[:, list(ids.no)].sum(-1).numpy()


@pytest.mark.parametrize("which", ["seed_model", "smollm2"])
def test_probabilities_match_manual_softmax(request, which, short_prompts, study_heads, rounding):
    loaded = request.getfixturevalue(which)
    model, arch, tok = loaded.model, loaded.arch, loaded.tokenizer
    ids = resolve_yes_no(tok)
    toks = [tok.encode(p, add_special_tokens=False) for p in short_prompts[:2]]
    width = min(len(t) for t in toks)
    toks = [t[:width] for t in toks]  # same length: plain forward needs no padding
    heads = study_heads if which == "seed_model" else [(5, 0), (5, 8), (17, 1), (29, 8)]
    seen = []
    for head_set in ([], heads):
        masks = head_masks([head_set] * len(toks), arch)
        with HookedAblation(model, arch) as hooks:
            handle = model.get_output_embeddings().register_forward_hook(lambda m, a, out: seen.append(out.clone()))
            try:
                got = score_plain(model, hooks, toks, masks, ids, tok.pad_token_id)
            finally:
                handle.remove()
            with torch.inference_mode():
                hooks.masks = masks
                logits = model(input_ids=torch.tensor(toks), use_cache=False, logits_to_keep=0).logits
        used = seen.pop()[:, -1]  # the float32 logits score_plain turned into probabilities
        # score_plain's forward (mask, position ids, last position only) and the plain one are two float32
        # forwards: their logits differ by <= 3 delta (tests/tolerances.py, ScoreTol.between_forwards).
        assert (used - logits[:, -1]).abs().max() <= 3 * rounding(loaded)
        # The same logits through a float64 softmax by hand. Both normalise by a sum of V positive terms,
        # each off by <= gamma(V) relative; exp/log of arguments up to |x - max| add ~u|x - max| each.
        vocab, span = used.shape[-1], 2 * float(used.abs().max())
        rtol = 2 * gamma(vocab, U64) + 8 * U64 * (1 + span)  # 3.5e-11 for 152k logits: float32 would be 1e-7
        p_yes, p_no = _manual(used, ids)
        np.testing.assert_allclose(got.p_yes, p_yes, rtol=rtol, atol=0)
        np.testing.assert_allclose(got.p_no, p_no, rtol=rtol, atol=0)
        np.testing.assert_allclose(got.p_yes_norm, p_yes / (p_yes + p_no), rtol=2 * rtol, atol=0)
        assert np.all(got.p_yes > 0) and np.all(got.p_no > 0)
        # The derived quantities, in float64: one exp, log or division rounds by u (x |argument| for a log);
        # a handful of them in a row.
        log_p = np.abs(np.log(got.p_yes)) + np.abs(np.log(got.p_no))
        np.testing.assert_allclose(got.p_yes_norm, got.p_yes / (got.p_yes + got.p_no), rtol=8 * U64 * (1 + log_p.max()))
        np.testing.assert_allclose(got.log_odds, np.log(got.p_yes) - np.log(got.p_no), rtol=0, atol=4 * U64 * (2 + log_p.max()))
        assert got.p_yes.dtype == np.float64 and got.log_odds.dtype == np.float64
        assert not got.nonfinite.any()


def test_full_logits_flag_changes_nothing(seed_model, short_prompts, rounding):
    model, arch, tok = seed_model.model, seed_model.arch, seed_model.tokenizer
    ids = resolve_yes_no(tok)
    toks = [tok.encode(short_prompts[0], add_special_tokens=False)]
    masks = head_masks([[(17, 3)]], arch)
    with HookedAblation(model, arch) as hooks:
        a = score_plain(model, hooks, toks, masks, ids, tok.pad_token_id)
        b = score_plain(model, hooks, toks, masks, ids, tok.pad_token_id, full_logits=True)
    # Two float32 forwards (the output projection over one position or all of them).
    assert_scores_close(a, b, ScoreTol.between_forwards(rounding(seed_model)), "full logits vs last position")


def test_yes_no_log_probs_float64():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0], [5.0, -5.0, 0.0, 0.0]], dtype=torch.float32)
    ids = YesNoIds((1, 2), (3,))
    ly, ln = yes_no_log_probs(logits, ids)
    assert ly.dtype == torch.float64
    x = logits.double().numpy()
    p = np.exp(x) / np.exp(x).sum(-1, keepdims=True)
    # float64, 4 logits of size <= 5: each exp, log or sum rounds by u (x |argument| for exp and log),
    # about ten of them in a row: <= 10 * 6 * u = 7e-15.
    np.testing.assert_allclose(np.exp(ly.numpy()), p[:, 1] + p[:, 2], rtol=1e-14)
    np.testing.assert_allclose(np.exp(ln.numpy()), p[:, 3], rtol=1e-14)


def test_scores_from_log_probs_no_underflow():
    s = scores_from_log_probs(np.array([-800.0, -2.0]), np.array([-900.0, -2.0]))
    assert s.p_yes[0] == 0.0 and s.p_no[0] == 0.0  # underflow in the raw probabilities ...
    # ... not here: -800 - (-900) is exact, and 1 / (1 + e^-100) rounds to 1 in float64.
    assert s.p_yes_norm[0] == 1.0 and s.log_odds[0] == 100.0
    assert s.p_yes_norm[1] == 0.5 and s.log_odds[1] == 0.0
    assert not s.nonfinite.any()


def test_nonfinite_flags_nan_rows():
    log_yes = np.array([-1.0, np.nan, -0.5, -np.inf, np.nan])
    log_no = np.array([-2.0, -1.0, np.nan, -np.inf, np.nan])
    s = scores_from_log_probs(log_yes, log_no)
    assert s.nonfinite.tolist() == [False, True, True, True, True]
    assert np.isfinite(s.p_yes_norm[0]) and np.isfinite(s.log_odds[0])


def test_nonfinite_from_nan_logits():
    logits = torch.zeros(3, 10)
    logits[1, 4] = float("nan")
    ly, ln = yes_no_log_probs(logits, YesNoIds((1,), (2,)))
    s = scores_from_log_probs(ly.numpy(), ln.numpy())
    assert s.nonfinite.tolist() == [False, True, False]


# ---------------------------------------------------------------- left padding


def test_left_pad_layout():
    ids, mask, pos = left_pad([[5, 6, 7], [8], [1, 2]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 1, 2]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    assert pos.tolist() == [[0, 1, 2], [0, 0, 0], [0, 0, 1]]
    assert ids.dtype == mask.dtype == pos.dtype == torch.long


@pytest.mark.parametrize("which", ["seed_model", "smollm2"])
def test_padded_batch_equals_each_prompt_alone(request, which, short_prompts, study_heads, rounding):
    loaded = request.getfixturevalue(which)
    model, arch, tok = loaded.model, loaded.arch, loaded.tokenizer
    ids = resolve_yes_no(tok)
    toks = [tok.encode(p, add_special_tokens=False) for p in short_prompts]
    assert len({len(t) for t in toks}) == len(toks)  # all lengths differ
    heads = study_heads if which == "seed_model" else [(5, 0), (5, 8), (17, 1), (29, 8)]
    sets = [[], heads, [], heads[:2]]
    masks = head_masks(sets, arch)
    with HookedAblation(model, arch) as hooks:
        batched = score_plain(model, hooks, toks, masks, ids, tok.pad_token_id)
        alone = [score_plain(model, hooks, [t], masks[i:i + 1], ids, tok.pad_token_id) for i, t in enumerate(toks)]
    # Two float32 forwards: padding changes every reduction's shape and order.
    tol = ScoreTol.between_forwards(rounding(loaded))
    stacked = {f: np.array([getattr(a, f)[0] for a in alone]) for f in ("p_yes", "p_no", "p_yes_norm", "log_odds")}
    assert_scores_close(batched, stacked, tol, "padded batch vs each prompt alone")
    # Non-vacuous: the prompts (and masks) give answers further apart than the tolerance.
    assert np.ptp(batched.log_odds) > 10 * tol.log
