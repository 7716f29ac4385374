"""The worker's self-check: fast path vs the model's own forward on one real prompt, in float32.

It must pass on every fast-path family and on real weights, raise with both numbers when the fast
path is broken on purpose (in its attention or in its neuron ablation), do nothing on the hook path,
and leave a bf16 model exactly as it found it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import verif.model.forward as forward
from tests.support.families import family_dir, load_family
from verif.model.engine import Scorer
from verif.model.loading import load_model
from verif.model.score import resolve_yes_no
from verif.model.selfcheck import SelfCheckError, self_check


@pytest.fixture(scope="module")
def prompt_text(short_prompts) -> str:
    return short_prompts[1]


@pytest.mark.parametrize("family, overrides", [
    ("llama", (("attention_bias", True), ("mlp_bias", True))), ("qwen2", ()), ("qwen3", ()), ("olmo2", ()),
    ("phi3", ()), ("mistral", ()),
])  # fmt: skip
def test_passes_on_every_fast_family(family, overrides, prompt_text):
    loaded = load_family(family, overrides)
    toks = loaded.tokenizer.encode(prompt_text, add_special_tokens=False)
    result = self_check(loaded, resolve_yes_no(loaded.tokenizer), toks)
    assert result.path == "fast" and len(result.fast_log_odds) == 3
    assert result.conditions == ("nothing", "L2 H0", "L2 N0")
    assert result.max_abs_diff <= result.tolerance
    assert len(set(result.hook_log_odds)) == 3  # the head and the neuron each moved the answer


def test_passes_on_smollm2(smollm2, prompt_text):
    toks = smollm2.tokenizer.encode(prompt_text, add_special_tokens=False)
    result = self_check(smollm2, resolve_yes_no(smollm2.tokenizer), toks)
    assert result.path == "fast" and result.max_abs_diff <= result.tolerance


@pytest.mark.parametrize("family", ["gemma2", "gpt_neox"])
def test_nothing_to_compare_on_the_hook_path(family, prompt_text):
    loaded = load_family(family)
    toks = loaded.tokenizer.encode(prompt_text, add_special_tokens=False)
    result = self_check(loaded, resolve_yes_no(loaded.tokenizer), toks)
    assert result.path == "hook" and result.fast_log_odds is None and "no fast path" in result.note
    forced = self_check(load_family("qwen3"), resolve_yes_no(loaded.tokenizer), toks, path="hook")
    assert forced.path == "hook" and forced.note == "hook path only: engine.path is hook"


def _no_rope(x, cos, sin):
    return x


def _no_neuron_mask(acts, mask):
    return acts


@pytest.mark.parametrize("broken, which", [("_rope", _no_rope), ("apply_neuron_mask", _no_neuron_mask)])
def test_raises_with_both_numbers_when_the_fast_path_is_wrong(monkeypatch, prompt_text, broken, which):
    loaded = load_family("qwen3")
    toks = loaded.tokenizer.encode(prompt_text, add_special_tokens=False)
    monkeypatch.setattr(forward, broken, which)
    with pytest.raises(SelfCheckError) as err:
        self_check(loaded, resolve_yes_no(loaded.tokenizer), toks)
    msg = str(err.value)
    assert "fast " in msg and "hook " in msg and "engine.path: hook" in msg
    if broken == "apply_neuron_mask":  # only the neuron condition is wrong
        assert "L2 N0: fast" in msg and "L2 H0: fast" not in msg and "nothing: fast" not in msg
    else:
        assert "nothing: fast" in msg


def test_bf16_model_is_checked_in_float32_and_restored_bit_for_bit(prompt_text):
    folder = str(family_dir("qwen3"))
    loaded = load_model(folder, dtype="bfloat16", device="cpu")
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    ids = resolve_yes_no(loaded.tokenizer)
    toks = loaded.tokenizer.encode(prompt_text, add_special_tokens=False)
    result = self_check(loaded, ids, toks)
    assert result.path == "fast" and result.max_abs_diff <= result.tolerance
    after = loaded.model.state_dict()
    assert all(after[k].dtype == torch.bfloat16 and torch.equal(after[k], v) for k, v in before.items())
    assert not hasattr(loaded.model, "_verif_fused_weights")  # no float32 copies kept alive
    # The worker's scorer, built after the check, computes what it computes on a model never checked.
    got = Scorer(loaded, ids).score_tokens([toks], [[], [(1, 1)]])
    fresh = load_model(folder, dtype="bfloat16", device="cpu")
    want = Scorer(fresh, ids).score_tokens([toks], [[], [(1, 1)]])
    np.testing.assert_array_equal(got.log_odds, want.log_odds)
