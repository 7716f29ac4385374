"""Guards against silently wrong numbers: every config feature of a fast-path family is either
implemented by the fast path (then it must equal the model's own forward, and removing the feature
from the fast path on purpose must fail that comparison) or sends the model to the hook path with a
notice (then the scores must equal the model's own forward).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import warnings

import numpy as np
import pytest
from torch import nn
from transformers import CONFIG_MAPPING

from tests.support.families import HIDDEN, N_LAYERS, family_dir, family_tokenizer, load_family, score_tolerance
from verif.design.conditions import Ablation
from verif.model.engine import EngineOptions, Scorer
from verif.model.families import FAMILIES, config_gaps, fast_path_gaps, is_unread_key
from verif.model.families.base import BASE_KEYS
from verif.model.loading import check_layout, load_model
from verif.model.score import resolve_yes_no

ABLATIONS = [Ablation(), Ablation(((1, 2),)), Ablation((), ((2, 5),)), Ablation(((3, 0),), ((0, 11),))]


def score_tol(log_odds: np.ndarray) -> np.ndarray:
    return score_tolerance(N_LAYERS, HIDDEN, log_odds)


@pytest.fixture(scope="module")
def prompts(short_prompts) -> list[list[int]]:
    enc = [family_tokenizer().encode(p, add_special_tokens=False) for p in short_prompts]
    n = min(len(e) for e in enc)
    return [enc[0][:n - 4], enc[2][:n - 4], enc[1][:n]]  # a same-length pair and a padded unit


def both_paths(loaded, prompts):
    ids = resolve_yes_no(loaded.tokenizer)
    fast = Scorer(loaded, ids, EngineOptions(path="fast"))
    hook = Scorer(loaded, ids, EngineOptions(path="hook")).score_tokens(prompts, ABLATIONS)
    return fast, hook


def _drop_biases(w):
    return dataclasses.replace(w, qkv_b=None, o_b=None, gate_up_b=None, down_b=None)


def _drop_window(w):
    return dataclasses.replace(w, window=None)


# (family, config overrides, what removing the feature from the fast path means)
IMPLEMENTED = [
    ("llama", (("mlp_bias", True),), _drop_biases),
    ("llama", (("attention_bias", True),), _drop_biases),
    ("qwen2", (("use_sliding_window", True), ("sliding_window", 8), ("max_window_layers", 2)), _drop_window),
    ("qwen3", (("attention_bias", True),), _drop_biases),
    ("qwen3", (("use_sliding_window", True), ("sliding_window", 8), ("max_window_layers", 1)), _drop_window),
    ("olmo2", (("attention_bias", True),), _drop_biases),
    ("mistral", (), _drop_window),  # sliding_window 8 in the tiny config
    ("phi3", (), _drop_window),  # sliding_window 8 and partial rotary in the tiny config
]


@pytest.mark.parametrize("family, overrides, remove", IMPLEMENTED,
                         ids=[f"{f}-{','.join(k for k, _ in o) or 'window'}" for f, o, _ in IMPLEMENTED])
def test_implemented_feature_runs_fast_and_equals_the_model(family, overrides, remove, prompts):
    loaded = load_family(family, overrides)
    assert fast_path_gaps(loaded.model) == []
    fast, hook = both_paths(loaded, prompts)
    got = fast.score_tokens(prompts, ABLATIONS)
    assert (np.abs(got.log_odds - hook.log_odds) <= score_tol(hook.log_odds)).all(), got.log_odds - hook.log_odds
    # Remove the feature from the fast path (the bug the guard exists for): the comparison must fail.
    fast.forward.weights = [remove(w) for w in fast.forward.weights]
    fast.forward.windows = {w.window for w in fast.forward.weights}
    broken = fast.score_tokens(prompts, ABLATIONS)
    assert (np.abs(broken.log_odds - hook.log_odds) > 100 * score_tol(hook.log_odds)).any()


def test_every_config_key_is_reviewed():
    """Each key of each fast-path family's config class (in the installed transformers) has been
    decided on. A transformers release that adds a key fails here until someone reviews it; until
    then a config that sets it runs on the hook path (test below)."""
    for fam in FAMILIES.values():
        if fam.fast is None:
            continue
        keys = set(CONFIG_MAPPING[fam.model_type]().to_dict()) - BASE_KEYS
        unreviewed = sorted(k for k in keys if not is_unread_key(k) and k not in fam.fast.config_keys)
        assert unreviewed == [], (fam.model_type, unreviewed)


def test_unreviewed_config_key_goes_to_the_hook_path(tmp_path, prompts):
    """A key nobody reviewed (here Gemma's attention soft-capping written into a Llama config) sends the
    model to the hook path with a notice naming the key, and its scores are the model's own."""
    folder = tmp_path / "llama-extra"
    shutil.copytree(family_dir("llama"), folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "attn_logit_softcapping": 30.0}))
    loaded = load_model(str(folder), dtype="float32", device="cpu")
    assert any("attn_logit_softcapping" in g for g in config_gaps(loaded.model.config))
    ids = resolve_yes_no(loaded.tokenizer)
    with pytest.warns(UserWarning, match="hook path.*attn_logit_softcapping"):
        scorer = Scorer(loaded, ids)
    assert scorer.path == "hook"
    got = scorer.score_tokens(prompts, ABLATIONS)
    ref = Scorer(load_family("llama"), ids, EngineOptions(path="hook")).score_tokens(prompts, ABLATIONS)
    np.testing.assert_array_equal(got.log_odds, ref.log_odds)  # same weights, same forward, same batches


def test_unset_unknown_keys_do_not_count():
    config = CONFIG_MAPPING["llama"]()
    config.some_future_switch = None
    config.another_one = False
    assert config_gaps(config) == []
    config.another_one = True
    assert any("another_one" in g for g in config_gaps(config))


def test_quantized_weights_go_to_the_hook_path(monkeypatch):
    loaded = load_family("qwen3")
    monkeypatch.setattr(loaded.model.config, "quantization_config", {"quant_method": "bitsandbytes"}, raising=False)
    gaps = fast_path_gaps(loaded.model)
    assert any("quantized" in g and "bitsandbytes" in g for g in gaps)
    monkeypatch.setattr(loaded.model.config, "quantization_config", {"quant_method": "gguf"})
    assert fast_path_gaps(loaded.model) == []  # GGUF is dequantized while loading: plain weights


class PatchedLinear(nn.Linear):
    """A projection that is no longer plain nn.Linear (as a quantizer or a patch would leave it)."""


def test_replaced_modules_go_to_the_hook_path(prompts):
    loaded = load_model(str(family_dir("olmo2")), dtype="float32", device="cpu")  # its own copy: patched below
    attn = loaded.model.model.layers[1].self_attn
    patched = PatchedLinear(attn.o_proj.in_features, attn.o_proj.out_features, bias=False)
    patched.weight = attn.o_proj.weight
    attn.o_proj = patched
    gaps = fast_path_gaps(loaded.model)
    assert gaps == ["projection of type PatchedLinear, not nn.Linear"]
    ids = resolve_yes_no(loaded.tokenizer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scorer = Scorer(loaded, ids)
    assert scorer.path == "hook"
    with pytest.raises(ValueError, match="PatchedLinear"):
        Scorer(loaded, ids, EngineOptions(path="fast"))
    # The hook on the patched projection still ablates (PatchedLinear is an nn.Module like any other).
    got = scorer.score_tokens(prompts, ABLATIONS)
    assert np.abs(got.log_odds[:, 1] - got.log_odds[:, 0]).min() > 1e-4


def test_family_table_lists_every_family_and_its_path():
    from verif.model.families import family_table

    lines = family_table().splitlines()
    assert len(lines) == 2 + len(FAMILIES)
    for name, fam in FAMILIES.items():
        row = next(line for line in lines if line.startswith(f"| {name} |"))
        assert f"| {'fast' if fam.fast else 'hook'} |" in row
    assert "`mlp_bias`" in next(line for line in lines if line.startswith("| llama |"))


def test_hook_only_families_say_why():
    for name in ("gemma2", "gemma3_text", "gpt_neox"):
        assert config_gaps(load_family(name).model.config) == [f"{name} has no fast path"]


def test_layout_mismatch_is_refused():
    loaded = load_family("llama")
    with pytest.raises(ValueError, match="attention output projection input width 32, expected 16"):
        check_layout(loaded.model, dataclasses.replace(loaded.arch, head_dim=4))
    with pytest.raises(ValueError, match="MLP down projection input width 64, expected 65"):
        check_layout(loaded.model, dataclasses.replace(loaded.arch, intermediate_size=65))


def test_refused_families_name_the_supported_ones(tmp_path):
    from verif.model.families import family_of

    with pytest.raises(ValueError, match="multimodal Gemma 3.*gemma3_text") as err:
        family_of("gemma3")
    for name in FAMILIES:
        assert name in str(err.value)
    with pytest.raises(ValueError, match="'gpt2' is not supported"):
        family_of("gpt2")


def test_ablation_outside_the_model_is_refused_before_work(prompts):
    loaded = load_family("llama")
    scorer = Scorer(loaded, resolve_yes_no(loaded.tokenizer))
    with pytest.raises(ValueError, match=r"condition 1 neurons: L2 N64: model has 64 MLP neurons per layer \(0-63\)"):
        scorer.score_tokens(prompts, [Ablation(), Ablation((), ((2, 64),))])
    with pytest.raises(ValueError, match=r"condition 0 heads: L9 H0: model has 4 layers"):
        scorer.score_tokens(prompts, [[(9, 0)]])
