"""Exactness of head zero-ablation through `o_proj` pre-hooks (the plain path).

Every check here is against quantities captured by this file's own hooks, independent from
`HookedAblation`: the input `z` of `self_attn.o_proj` before any ablation hook runs, the output of
`o_proj`, the output of `self_attn`, and the residual stream around the attention block. The
reference for "head h removed" is computed by hand in float64: `W z - W[:, h*d:(h+1)*d] z_h`.
Run on the seed-shaped Qwen2 (with the study's 29 heads) and on the packaged SmolLM2 (real weights).
"""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch

from verif.model.ablation import HookedAblation, apply_head_mask, head_masks
from verif.design.heads import parse_heads, validate_heads
from verif.model.loading import decoder_layers
from tests.tolerances import U32, gamma

# A valid head set of SmolLM2 (30 x 9) over several layers, several heads in layers 5 and 17.
SMOL_HEADS_TEXT = "L0 H3, L5 H0, L5 H8, L12 H4, L17 H1, L17 H2, L17 H5, L29 H8"
SEQ = 28  # tokens per row (prompts cut to one length so a batch needs no padding)


class Case:
    def __init__(self, loaded, heads, single, busy_layer, prompts, delta):
        self.loaded = loaded
        self.delta = delta  # float32 rounding of a whole forward's logits, every position (tests/tolerances.py)
        self.model = loaded.model
        self.arch = loaded.arch
        self.heads = list(validate_heads(heads, loaded.arch.n_layers, loaded.arch.n_heads))
        self.single = single  # heads to ablate alone
        self.busy_layer = busy_layer  # the layer holding most of the set's heads
        tok = loaded.tokenizer
        ids = [tok.encode(p, add_special_tokens=False)[:SEQ] for p in prompts]
        assert all(len(t) == SEQ for t in ids)
        self.ids = torch.tensor(ids, dtype=torch.long)


@pytest.fixture(scope="module", params=["seed", "smollm2"])
def case(request, short_prompts, rounding):
    if request.param == "seed":
        loaded = request.getfixturevalue("seed_model")
        heads = request.getfixturevalue("study_heads")
        single = [(17, 14), (3, 13), (0, 0), (35, 15)]
        return Case(loaded, heads, single, 17, short_prompts[:2], rounding(loaded, 0))
    loaded = request.getfixturevalue("smollm2")
    single = [(5, 8), (17, 1), (0, 0), (29, 8)]
    return Case(loaded, parse_heads(SMOL_HEADS_TEXT), single, 17, short_prompts[:2], rounding(loaded, 0))


class Capture:
    """Own hooks: o_proj input before any other pre-hook (prepend), o_proj input/output as seen by
    o_proj, self_attn output, residual before the attention block and after it."""

    def __init__(self, model):
        self.model = model
        self.z_in, self.z_used, self.y, self.attn, self.resid_pre, self.resid_mid = ({} for _ in range(6))
        self.handles = []

    def __enter__(self):
        for i, layer in enumerate(decoder_layers(self.model)):
            o = layer.self_attn.o_proj
            self.handles += [
                o.register_forward_pre_hook(self._store(self.z_in, i), prepend=True),
                o.register_forward_hook(lambda m, a, out, i=i: self._put(self.z_used, i, a[0]) or self._put(self.y, i, out)),
                layer.self_attn.register_forward_hook(lambda m, a, out, i=i: self._put(self.attn, i, out[0])),
                layer.input_layernorm.register_forward_pre_hook(self._store(self.resid_pre, i)),
                layer.post_attention_layernorm.register_forward_pre_hook(self._store(self.resid_mid, i)),
            ]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    @staticmethod
    def _put(store, i, value):
        store[i] = value.detach().clone()

    def _store(self, store, i):
        def hook(module, args):
            self._put(store, i, args[0])

        return hook


@torch.inference_mode()
def run(case, masks=None):
    """Plain forward of the case's batch (optionally hook-ablated); returns (logits, capture)."""
    with Capture(case.model) as cap:
        if masks is None:
            out = case.model(input_ids=case.ids, use_cache=False, logits_to_keep=0)
        else:
            with HookedAblation(case.model, case.arch) as hooks:
                hooks.masks = masks
                out = case.model(input_ids=case.ids, use_cache=False, logits_to_keep=0)
    return out.logits, cap


def reference_o_proj(case, layer, z, heads):
    """float64 `W z - sum_h W[:, h] z_h` for the heads of `layer` in `heads`, and the float32 bound.

    float32 inputs multiply exactly in float64, so the reference is exact but for float64 sums. o_proj's
    float32 output is a dot product of n = n_heads * head_dim terms, in whatever order the BLAS of this CPU
    takes: off by at most gamma(n) * sum_i |W_ji z_i| (tests/tolerances.py), on every machine. Zeroed terms
    only lower that sum, so the bound of the whole z covers the ablated product too.
    """
    w = case.model.model.layers[layer].self_attn.o_proj.weight.double()
    z = z.double()
    d = case.arch.head_dim
    y = z @ w.T
    for lyr, h in heads:
        if lyr == layer:
            s = slice(h * d, (h + 1) * d)
            y = y - z[..., s] @ w[:, s].T
    return y, gamma(w.shape[1], U32) * (z.abs() @ w.abs().T)


def assert_within(got, ref, bound, what=""):
    err = (got.double() - ref).abs()
    assert (err <= bound).all(), f"{what}: error {float(err.max()):.3g} beyond the rounding bound (x{float((err / bound).max()):.3g})"


def test_capture_reference_is_sound(case):
    """Unablated: o_proj output equals the float64 `W z` (so the reference below means something)."""
    _, cap = run(case)
    for layer in (0, case.busy_layer, case.arch.n_layers - 1):
        assert_within(cap.y[layer], *reference_o_proj(case, layer, cap.z_in[layer], []), f"layer {layer}")
        assert torch.equal(cap.z_in[layer], cap.z_used[layer])
        assert cap.attn[layer].abs().max() > 1e-3  # a real signal, far above float32 rounding


def test_single_head_equals_subtracting_its_columns(case):
    base_logits, base = run(case)
    d = case.arch.head_dim
    for layer, head in case.single:
        logits, cap = run(case, head_masks([[(layer, head)]] * len(case.ids), case.arch))
        # Layers up to the ablated one see exactly the baseline input.
        assert torch.equal(cap.z_in[layer], base.z_in[layer])
        # o_proj saw z with that head's slice zeroed, every position, and nothing else changed.
        s = slice(head * d, (head + 1) * d)
        assert torch.count_nonzero(cap.z_used[layer][..., s]) == 0
        keep = torch.ones(case.arch.n_heads * d, dtype=torch.bool)
        keep[s] = False
        assert torch.equal(cap.z_used[layer][..., keep], base.z_in[layer][..., keep])
        # The ablated o_proj output is the baseline's minus that head's columns times z_h.
        ref, bound = reference_o_proj(case, layer, base.z_in[layer], [(layer, head)])
        assert_within(cap.y[layer], ref, bound, f"L{layer} H{head}")
        # Not ablating the head would break the bound tenfold: the test can see a wrong or missed head.
        removed = (base.y[layer].double() - ref).abs()
        assert (removed > 10 * bound).any(), f"L{layer} H{head} contributes nothing: vacuous test"
        # Layers before the ablated one are untouched; the logits move by more than float32 rounding.
        for before in range(layer):
            assert torch.equal(cap.y[before], base.y[before])
        assert (logits - base_logits).abs().max() > 10 * case.delta


def test_whole_set_every_layer(case):
    base_logits, _ = run(case)
    logits, cap = run(case, head_masks([case.heads] * len(case.ids), case.arch))
    by_layer = defaultdict(list)
    for layer, head in case.heads:
        by_layer[layer].append(head)
    assert len(by_layer[case.busy_layer]) >= 3
    d = case.arch.head_dim
    for layer in range(case.arch.n_layers):
        # z_in is what the layer computed (upstream ablations included); the reference removes this
        # layer's heads of the set from it, and only those.
        assert_within(cap.y[layer], *reference_o_proj(case, layer, cap.z_in[layer], case.heads), f"layer {layer}")
        zeroed = torch.zeros(case.arch.n_heads * d, dtype=torch.bool)
        for h in by_layer.get(layer, []):
            zeroed[h * d:(h + 1) * d] = True
        assert torch.count_nonzero(cap.z_used[layer][..., zeroed]) == 0
        assert torch.equal(cap.z_used[layer][..., ~zeroed], cap.z_in[layer][..., ~zeroed])
    assert (logits - base_logits).abs().max() > 10 * case.delta  # beyond float32 rounding


@pytest.mark.parametrize("where", ["first", "busy", "last"])
def test_all_heads_of_a_layer_remove_attention(case, where):
    layer = {"first": 0, "busy": case.busy_layer, "last": case.arch.n_layers - 1}[where]
    _, base = run(case)
    assert base.attn[layer].abs().max() > 1e-3  # a real signal, so that "exactly zero" below means something
    all_heads = [(layer, h) for h in range(case.arch.n_heads)]
    _, cap = run(case, head_masks([all_heads] * len(case.ids), case.arch))
    assert case.model.model.layers[layer].self_attn.o_proj.bias is None
    assert torch.count_nonzero(cap.attn[layer]) == 0
    assert torch.equal(cap.resid_mid[layer], cap.resid_pre[layer])
    # The layer before is untouched, and nothing else in this layer's attention input changed.
    assert torch.equal(cap.resid_pre[layer], base.resid_pre[layer])


def test_per_row_masks_equal_rows_alone(case):
    """Rows of one batch under different head sets equal each row run alone."""
    arch = case.arch
    layer_all = [(case.busy_layer, h) for h in range(arch.n_heads)]
    sets = [[], case.heads, [case.single[0]], layer_all, case.heads[:5], []]
    n = len(sets)
    ids = case.ids[torch.arange(n) % len(case.ids)]
    masks = head_masks(sets, arch)
    with torch.inference_mode(), HookedAblation(case.model, arch) as hooks:
        hooks.masks = masks
        batched = case.model(input_ids=ids, use_cache=False, logits_to_keep=0).logits
        alone = []
        for i in range(n):
            hooks.masks = masks[i:i + 1]
            alone.append(case.model(input_ids=ids[i:i + 1], use_cache=False, logits_to_keep=0).logits)
    alone = torch.cat(alone)
    # Two float32 forwards (6 rows vs 1): logits differ by <= 3 delta (tests/tolerances.py).
    tol = 3 * case.delta
    assert (batched - alone).abs().max() <= tol
    # Rows really differ (the masks did something per row), each against its prompt's baseline, by more
    # than the tolerance: a mask applied to the wrong row would be seen.
    assert (batched[1] - batched[5]).abs().max() > 10 * tol  # prompt 1: study set vs baseline
    assert (batched[0] - batched[4]).abs().max() > 10 * tol  # prompt 0: 5 heads vs baseline


# ---------------------------------------------------------------- units


def test_head_masks_layout(seed_model, study_heads):
    arch = seed_model.arch
    m = head_masks([[], study_heads, [(35, 15)]], arch)
    assert m.shape == (3, 36, 16) and m.dtype == torch.float32
    assert torch.all(m[0] == 1)
    assert int((m[1] == 0).sum()) == 29
    assert all(m[1, layer, head] == 0 for layer, head in study_heads)
    assert int((m[2] == 0).sum()) == 1 and m[2, 35, 15] == 0
    assert set(torch.unique(m).tolist()) == {0.0, 1.0}


def test_apply_head_mask_matches_manual():
    torch.manual_seed(0)
    rows, seq, heads, d = 3, 5, 4, 6
    x = torch.randn(rows, seq, heads * d)
    mask = torch.ones(rows, heads)
    mask[0, 1] = 0
    mask[2, 0] = 0
    mask[2, 3] = 0
    out = apply_head_mask(x, mask, d)
    expected = x.clone()
    expected[0, :, d:2 * d] = 0
    expected[2, :, 0:d] = 0
    expected[2, :, 3 * d:] = 0
    assert torch.equal(out, expected)
    assert out.shape == x.shape


def test_hooks_removed_and_noop_when_unmasked(seed_model):
    model, arch = seed_model.model, seed_model.arch
    ids = torch.tensor([seed_model.tokenizer.encode("Is 2 + 2 = 4? Answer:", add_special_tokens=False)])
    projs = [layer.self_attn.o_proj for layer in decoder_layers(model)]
    before = [len(p._forward_pre_hooks) for p in projs]
    with torch.inference_mode():
        plain = model(input_ids=ids, use_cache=False).logits
        with HookedAblation(model, arch) as hooks:
            assert all(len(p._forward_pre_hooks) == b + 1 for p, b in zip(projs, before))
            unmasked = model(input_ids=ids, use_cache=False).logits
            hooks.masks = head_masks([[]], arch)
            ones = model(input_ids=ids, use_cache=False).logits
            hooks.masks = head_masks([[(3, 13)]], arch)
            ablated = model(input_ids=ids, use_cache=False).logits
        assert hooks.masks is None
        after = model(input_ids=ids, use_cache=False).logits
    assert [len(p._forward_pre_hooks) for p in projs] == before
    assert torch.equal(plain, unmasked) and torch.equal(plain, ones) and torch.equal(plain, after)
    assert not torch.equal(plain, ablated)
