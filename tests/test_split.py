"""A model split over devices gives the same rows as the unsplit model, and its activations follow its layers.

On a CPU every slot of a split is the CPU, so the test model is split over three fake devices
(`tests.support.fake_devices`): each move tags the tensors with their new slot, and any operation that
reads two slots raises, as CUDA does for two devices. The fast path's layer weights carry their
layer's slot, so hidden states (or positions, rotary tables, masks) left behind fail at once. Both
paths give exactly the unsplit rows (the same arithmetic in the same order: nothing but the moves
differs), and the moves are counted: one per slot change (layer boundaries, final norm, LM head).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from verif.design.conditions import Ablation
from verif.model.engine import EngineOptions, Scorer
from verif.model.families import decoder_layers, final_norm
from verif.model.score import resolve_yes_no
from verif.model.selfcheck import self_check
from tests.support.fake_devices import FakeDevices, SlotMismatch, split_evenly, tag_inputs, tag_weights


def _ablations(study_heads) -> list[Ablation]:
    return [Ablation(), Ablation(heads=tuple(study_heads)), Ablation(neurons=((13, 5), (30, 7))),
            Ablation(heads=((20, 3),), neurons=((25, 1),))]


def _watch(scorer: Scorer, split: FakeDevices) -> dict[str, int]:
    """Check where the final norm, the LM head and (hook path) every decoder layer get their inputs;
    count the forwards, for the expected number of moves."""
    calls = {"forwards": 0, "heads": 0}
    model = scorer.loaded.model

    def expect(slot: int, key: str | None = None):
        def pre_hook(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            assert x.slot == slot, (type(module).__name__, x.slot, slot)
            if key:
                calls[key] += 1

        return pre_hook

    handles = [model.get_output_embeddings().register_forward_pre_hook(expect(split.head, "heads"), with_kwargs=True)]
    if scorer.path == "fast":
        scorer.forward.weights = tag_weights(scorer.forward.weights, split)
        norm, last_hidden = scorer.forward.final_norm, scorer.forward.last_hidden

        def checked_norm(x):
            assert x.slot == split.norm
            return norm(x)

        def counted(*args, **kwargs):
            calls["forwards"] += 1
            return last_hidden(*args, **kwargs)

        scorer.forward.final_norm, scorer.forward.last_hidden = checked_norm, counted
    else:
        handles += [layer.register_forward_pre_hook(expect(slot), with_kwargs=True)
                    for layer, slot in zip(decoder_layers(model), split.layers)]
        handles.append(final_norm(model).register_forward_pre_hook(expect(split.norm), with_kwargs=True))
        handles.append(model.register_forward_pre_hook(lambda m, a, k: calls.__setitem__("forwards", calls["forwards"] + 1),
                                                       with_kwargs=True))
    calls["handles"] = handles
    return calls


@pytest.mark.parametrize("path", ["fast", "hook"])
def test_split_gives_the_unsplit_rows_and_moves_at_every_boundary(seed_model, study_heads, short_prompts, path,
                                                                   monkeypatch):
    ids = resolve_yes_no(seed_model.tokenizer)
    opts = EngineOptions(path=path)
    abls = _ablations(study_heads)
    plain = Scorer(seed_model, ids, opts).score_prompts(short_prompts, abls)
    # layers 0-11, 12-23, 24-35 on slots 0, 1, 2; the final norm on 1; embeddings and the tied LM head on 0
    split = split_evenly(seed_model.arch.n_layers, 3, norm=1)
    scorer = Scorer(dataclasses.replace(seed_model, placement=split), ids, opts)
    calls = _watch(scorer, split)
    tag_inputs(monkeypatch, seed_model.model, split)
    try:
        table = scorer.score_prompts(short_prompts, abls)
    finally:
        for h in calls["handles"]:
            h.remove()
    for field in ("p_yes", "p_no", "p_yes_norm", "log_odds"):
        assert np.array_equal(getattr(table, field), getattr(plain, field)), field
    assert np.ptp(plain.log_odds) > 0.1  # the conditions differ: equal rows are not vacuous
    assert calls["forwards"] > 0 and calls["heads"] > 0
    # per forward the two layer boundaries and layer 35 -> final norm; per LM-head call norm -> LM head
    assert scorer.forward.stats.device_moves == 3 * calls["forwards"] + calls["heads"]


def test_fake_devices_catch_a_forgotten_move(seed_model, short_prompts, monkeypatch):
    """The check above is not vacuous: a placement whose moves to slot 2 do nothing fails at layer 24."""

    @dataclasses.dataclass(frozen=True)
    class Forgetful(FakeDevices):
        def to(self, t, slot):
            return super().to(t, 1 if slot == 2 else slot)

    split = split_evenly(seed_model.arch.n_layers, 3)
    forgetful = Forgetful(split.devices, split.layers, split.embed, split.norm, split.head)
    scorer = Scorer(dataclasses.replace(seed_model, placement=forgetful), resolve_yes_no(seed_model.tokenizer),
                    EngineOptions(path="fast"))
    scorer.forward.weights = tag_weights(scorer.forward.weights, split)
    tag_inputs(monkeypatch, seed_model.model, split)
    with pytest.raises(SlotMismatch, match=r"slots \[1, 2\]"):
        scorer.score_prompts(short_prompts[:1], [Ablation()])


def test_self_check_runs_on_a_split_model(seed_model, short_prompts):
    ids = resolve_yes_no(seed_model.tokenizer)
    tokens = seed_model.tokenizer.encode(short_prompts[1], add_special_tokens=False)
    split = split_evenly(seed_model.arch.n_layers, 4)
    whole, parts = self_check(seed_model, ids, tokens), self_check(dataclasses.replace(seed_model, placement=split), ids, tokens)
    assert parts.path == "fast" and parts.fast_log_odds == whole.fast_log_odds and parts.hook_log_odds == whole.hook_log_odds


def test_placement_read_from_a_device_map(seed_model):
    """`Placement.from_map` takes each module's slot from its longest prefix in the map, as accelerate reads one."""
    from verif.model.placement import Placement

    model = seed_model.model
    device_map = {"model.embed_tokens": 0, "lm_head": 0, "model.rotary_emb": 0, "model.norm": 1,
                  **{f"model.layers.{i}": int(i >= 20) for i in range(seed_model.arch.n_layers)}}
    p = Placement.from_map(model, device_map, [torch.device("cpu")] * 2)
    assert p.layers == tuple(int(i >= 20) for i in range(36)) and (p.embed, p.norm, p.head) == (0, 1, 0) and p.split
    whole = Placement.from_map(model, {"": 0}, ["cpu"])
    assert not whole.split and whole == Placement.of_model(model) == Placement.single("cpu", 36)
