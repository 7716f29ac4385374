"""Every supported family end to end on a tiny random checkpoint (tests/support/families.py), loaded
through `load_model` from a model folder.

Ablation exactness is checked on the model's own forward with `HookedAblation` against this file's
own hooks and manual float64 arithmetic: zeroing head h equals `W z - W[:, h*d:(h+1)*d] z_h + b` at the
attention output projection; all heads of a layer leave exactly its bias; zeroing neuron i equals
`W x - W[:, i] x_i + b` at the MLP down projection; rows under different ablations in one batch equal
each row run alone. The module paths used here are written out per family below, independently of
`verif.model.families`. Then the engine: the fast path equals the hook path for every family that
has one, and the hook path's batched, padded scorer equals one row at a time.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from tests.support.families import (
    FAMILY_NAMES, HEAD_DIM, HIDDEN, INTER, N_HEADS, N_KV, N_LAYERS, U32, family_tokenizer, load_family,
    score_tolerance,
)  # fmt: skip
from verif.design.conditions import Ablation
from verif.model.ablation import AblationMasks, HookedAblation
from verif.model.engine import EngineOptions, Scorer
from verif.model.families import down_projs, o_projs
from verif.model.interventions import Sites, Sources
from verif.model.loading import read_arch
from verif.model.score import resolve_yes_no, score_plain

FAST = ("llama", "mistral", "qwen2", "qwen3", "olmo2", "phi3")
HOOK = ("gemma2", "gemma3_text", "gpt_neox")
FIELDS = ("p_yes", "p_no", "p_yes_norm", "log_odds")


def own_blocks(model, family: str):
    """(attention output projection, MLP down projection) per layer, written out for each family."""
    if family == "gpt_neox":
        return [(b.attention.dense, b.mlp.dense_4h_to_h) for b in model.gpt_neox.layers]
    return [(b.self_attn.o_proj, b.mlp.down_proj) for b in model.model.layers]


def dot_bound(w: torch.Tensor, x: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """Rounding bound of a float32 `x @ w.T + b` (Higham's gamma_n): |error| <= (n+1) u sum|w_j x_j| + |b|."""
    mag = x.double().abs() @ w.double().abs().T + (0 if b is None else b.double().abs())
    return (w.shape[1] + 1) * U32 * mag


def score_tol(log_odds: np.ndarray) -> np.ndarray:
    return score_tolerance(N_LAYERS, HIDDEN, log_odds)


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module", params=FAST)
def fast_family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def prompts(short_prompts) -> list[list[int]]:
    """Three prompts: two of one length (a same-length unit) and a longer one (a padded unit), all
    longer than the sliding window of the windowed families."""
    enc = [family_tokenizer().encode(p, add_special_tokens=False) for p in short_prompts]
    n = min(len(e) for e in enc)
    return [enc[0][:n - 4], enc[2][:n - 4], enc[1][:n]]


class Capture:
    """This file's own hooks: the o_proj / down_proj inputs before any other pre-hook (prepend), and the
    inputs / outputs those modules actually saw."""

    def __init__(self, model, family):
        self.blocks = own_blocks(model, family)
        self.o_in, self.o_used, self.o_out, self.d_in, self.d_used, self.d_out = ({} for _ in range(6))

    def __enter__(self):
        self.handles = []
        for i, (o, down) in enumerate(self.blocks):
            for mod, first, used, out in ((o, self.o_in, self.o_used, self.o_out), (down, self.d_in, self.d_used, self.d_out)):
                self.handles.append(mod.register_forward_pre_hook(self._pre(first, i), prepend=True))
                self.handles.append(mod.register_forward_hook(self._post(used, out, i)))
        return self

    @staticmethod
    def _pre(store, i):
        def hook(module, args):
            store[i] = args[0].clone()

        return hook

    @staticmethod
    def _post(used, out, i):
        def hook(module, args, output):
            used[i] = args[0].clone()
            out[i] = output.clone()

        return hook

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


@torch.inference_mode()
def run(loaded, family, ids: torch.Tensor, ablations=None):
    """The model's own forward on same-length `ids` (ablated per row by HookedAblation when given)."""
    with Capture(loaded.model, family) as cap, HookedAblation(loaded.model, loaded.arch) as hooks:
        if ablations is not None:
            hooks.set(AblationMasks.build(ablations, loaded.arch))
        logits = loaded.model(input_ids=ids, use_cache=False).logits
    return logits, cap


def same_length(prompts) -> torch.Tensor:
    return torch.tensor(prompts[:2])


# ---------------------------------------------------------------- loading


def test_loads_with_its_shape_and_module_paths(family):
    lm = load_family(family)
    arch = lm.arch
    kv = N_HEADS if family == "gpt_neox" else N_KV
    assert (arch.family, arch.n_layers, arch.n_heads, arch.n_kv_heads, arch.head_dim) == (family, N_LAYERS, N_HEADS, kv, HEAD_DIM)
    assert (arch.hidden_size, arch.intermediate_size, arch.n_neurons) == (HIDDEN, INTER, INTER)
    assert read_arch(lm.source) == arch
    own = own_blocks(lm.model, family)
    assert [o for o, _ in own] == o_projs(lm.model) and [d for _, d in own] == down_projs(lm.model)


def test_path_taken(family):
    lm = load_family(family)
    ids = resolve_yes_no(lm.tokenizer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scorer = Scorer(lm, ids)
    notices = [str(w.message) for w in caught if "hook path" in str(w.message)]
    if family in FAST:
        assert scorer.path == "fast" and scorer.gaps == [] and notices == []
    else:
        assert scorer.path == "hook" and len(notices) == 1 and family in notices[0] and "no fast path" in notices[0]
        with pytest.raises(ValueError, match="cannot run on the fast path"):
            Scorer(lm, ids, EngineOptions(path="fast"))


# ---------------------------------------------------------------- exactness of the ablation (hook path)


@pytest.mark.parametrize("layer, head", [(0, 1), (N_LAYERS - 1, 3)])
def test_single_head_equals_manual_arithmetic(family, prompts, layer, head):
    lm = load_family(family)
    ids = same_length(prompts)
    base_logits, base = run(lm, family, ids)
    logits, cap = run(lm, family, ids, [Ablation(((layer, head),))] * len(ids))
    o = own_blocks(lm.model, family)[layer][0]
    d = HEAD_DIM
    s = slice(head * d, (head + 1) * d)
    z = base.o_in[layer]
    assert torch.equal(cap.o_in[layer], z)  # nothing upstream changed
    assert torch.count_nonzero(cap.o_used[layer][..., s]) == 0
    keep = torch.ones(N_HEADS * d, dtype=torch.bool)
    keep[s] = False
    assert torch.equal(cap.o_used[layer][..., keep], z[..., keep])
    w, b = o.weight.double(), None if o.bias is None else o.bias.double()
    ref = z.double() @ w.T - z[..., s].double() @ w[:, s].T + (0 if b is None else b)
    bound = dot_bound(o.weight, z, o.bias)
    assert ((cap.o_out[layer].double() - ref).abs() <= bound).all()
    removed = (base.o_out[layer].double() - ref).abs().max()
    assert removed > 100 * bound.max(), f"L{layer} H{head} contributes nothing: vacuous test"
    assert (logits - base_logits).abs().max() > 1e-4


def test_all_heads_of_a_layer_leave_exactly_the_bias(family, prompts):
    lm = load_family(family)
    ids = same_length(prompts)
    layer = 2
    _, base = run(lm, family, ids)
    _, cap = run(lm, family, ids, [Ablation(tuple((layer, h) for h in range(N_HEADS)))] * len(ids))
    o = own_blocks(lm.model, family)[layer][0]
    assert base.o_out[layer].abs().max() > 1e-3
    expected = torch.zeros_like(cap.o_out[layer]) + (0 if o.bias is None else o.bias)
    assert torch.equal(cap.o_out[layer], expected)
    for before in range(layer):
        assert torch.equal(cap.o_out[before], base.o_out[before])


def test_neurons_equal_manual_arithmetic(family, prompts):
    lm = load_family(family)
    ids = same_length(prompts)
    layer, neurons = 1, (5, 40)
    base_logits, base = run(lm, family, ids)
    logits, cap = run(lm, family, ids, [Ablation((), tuple((layer, i) for i in neurons))] * len(ids))
    down = own_blocks(lm.model, family)[layer][1]
    x = base.d_in[layer]
    assert torch.equal(cap.d_in[layer], x)
    idx = list(neurons)
    assert torch.count_nonzero(cap.d_used[layer][..., idx]) == 0
    keep = torch.ones(INTER, dtype=torch.bool)
    keep[idx] = False
    assert torch.equal(cap.d_used[layer][..., keep], x[..., keep])
    w = down.weight.double()
    ref = x.double() @ w.T - x[..., idx].double() @ w[:, idx].T + (0 if down.bias is None else down.bias.double())
    bound = dot_bound(down.weight, x, down.bias)
    assert ((cap.d_out[layer].double() - ref).abs() <= bound).all()
    assert (base.d_out[layer].double() - ref).abs().max() > 100 * bound.max()
    for before in range(layer):
        assert torch.equal(cap.d_out[before], base.d_out[before])
    assert (logits - base_logits).abs().max() > 1e-5


def test_per_row_masks_equal_rows_alone(family, prompts):
    lm = load_family(family)
    abls = [Ablation(), Ablation(((1, 2),)), Ablation((), ((2, 7),)), Ablation(((0, 0), (3, 1)), ((0, 9), (3, 60))),
            Ablation(tuple((2, h) for h in range(N_HEADS)))]  # fmt: skip
    ids = torch.tensor([prompts[i % 2] for i in range(len(abls))])
    batched, _ = run(lm, family, ids, abls)
    alone = torch.cat([run(lm, family, ids[i:i + 1], abls[i:i + 1])[0] for i in range(len(abls))])
    scale = batched.abs().max().item()
    # float32 logits of one forward, batch of 5 vs 1: per-row arithmetic is the same, but GEMMs may
    # block and sum in another order (tests.support.families.score_tolerance, on the logit scale).
    assert torch.allclose(batched, alone, rtol=0, atol=float(score_tolerance(N_LAYERS, HIDDEN, scale)))
    baseline, _ = run(lm, family, ids[:2])  # prompts 0 and 1, nothing ablated
    for i in (1, 2, 3, 4):  # every ablation moved its row off the baseline of the same prompt
        assert (batched[i] - baseline[i % 2]).abs().max() > 1e-4


# ---------------------------------------------------------------- the engine


ABLATIONS = [
    Ablation(),
    Ablation(((1, 2),)),
    Ablation((), ((2, 5), (2, 7))),
    Ablation(((0, 1), (3, 3)), ((1, 60),)),
    Ablation(tuple((N_LAYERS - 1, h) for h in range(N_HEADS))),
    Ablation((), ((0, 3),)),
]


@pytest.mark.parametrize("opts", [{}, {"share_trunk": False, "max_rows": 5}, {"last_position_only": True}],
                         ids=["default", "unshared-small-chunks", "last-position"])
def test_fast_path_equals_hook_path(fast_family, prompts, opts):
    lm = load_family(fast_family)
    ids = resolve_yes_no(lm.tokenizer)
    fast = Scorer(lm, ids, EngineOptions(**opts)).score_tokens(prompts, ABLATIONS)
    hook = Scorer(lm, ids, EngineOptions(path="hook")).score_tokens(prompts, ABLATIONS)
    assert fast.nonfinite == 0 and hook.nonfinite == 0
    assert (np.abs(fast.log_odds - hook.log_odds) <= score_tol(hook.log_odds)).all(), (fast.log_odds - hook.log_odds)
    np.testing.assert_allclose(fast.p_yes_norm, hook.p_yes_norm, rtol=0, atol=float(score_tol(np.zeros(1))[0]))
    assert (np.abs(hook.log_odds[:, 1:] - hook.log_odds[:, :1]) > 1e-4).all()  # every condition moves every prompt
    if not opts:
        n_layers = lm.arch.n_layers
        firsts = [min(a.layers) for a in ABLATIONS[1:]]
        assert fast.row_layers == len(prompts) * (n_layers + sum(n_layers - f for f in firsts))  # branches at heads and neurons
        assert hook.row_layers == len(prompts) * len(ABLATIONS) * n_layers


def test_hook_path_equals_rows_alone(family, prompts):
    """The hook path's scorer (padded units, several rows per forward) against `score_plain`, one prompt
    and one condition per forward (no padding, no batching)."""
    lm = load_family(family)
    ids = resolve_yes_no(lm.tokenizer)
    got = Scorer(lm, ids, EngineOptions(path="hook", max_rows=4)).score_tokens(prompts, ABLATIONS)
    masks = AblationMasks.build(ABLATIONS, lm.arch)
    ref = np.zeros_like(got.log_odds)
    with HookedAblation(lm.model, lm.arch) as hooks:
        for p, toks in enumerate(prompts):
            for c in range(len(ABLATIONS)):
                ref[p, c] = score_plain(lm.model, hooks, [toks], masks.select([c]), ids, lm.tokenizer.pad_token_id).log_odds[0]
    assert (np.abs(got.log_odds - ref) <= score_tol(ref)).all(), got.log_odds - ref


def test_resample_skipping_a_shared_prefix_equals_hook_path(fast_family, prompts):
    """Resample rows of pairs that first differ 5 and 3 positions before their last (within the sliding window)
    compute only the positions from there on
    (attending to the trunk's keys and values below): they equal the hook path, which computes every position,
    for every family with a fast path (q/k norms, post-norms, partial rotary, sliding windows shorter than the
    prompts), in a padded unit and with the last block at the last position only."""
    lm = load_family(fast_family)
    ids = resolve_yes_no(lm.tokenizer)
    toks = [prompts[0], list(prompts[0]), prompts[2], list(prompts[2])]
    first = [len(toks[0]) - 5, len(toks[2]) - 3]
    toks[1][first[0]] += 1
    toks[3][first[1]] += 1
    partners = [toks[1], toks[0], toks[3], toks[2]]
    abls = [Ablation()] + [Ablation(a.heads, a.neurons, "resample") for a in ABLATIONS[1:]]
    hook = Scorer(lm, ids, EngineOptions(path="hook"))
    want = hook.score_tokens(toks, abls, Sources(cache=hook.activations(partners, Sites.of(abls))))
    for opts in ({"bucket_ratio": 2.0}, {"last_position_only": True}):
        fast = Scorer(lm, ids, EngineOptions(**opts))
        cache = fast.activations(partners, Sites.of(abls))
        assert cache.same_prefix(toks, fast.origin) == [first[0]] * 2 + [first[1]] * 2
        got = fast.score_tokens(toks, abls, Sources(cache=cache))
        assert got.nonfinite == 0
        assert (np.abs(got.log_odds - want.log_odds) <= score_tol(want.log_odds)).all(), (got.log_odds - want.log_odds)
        whole = fast.score_tokens(toks, abls, Sources(cache=type(cache)(cache.sites, cache.entries)))
        assert got.row_positions < whole.row_positions  # positions were skipped
    assert (np.abs(want.log_odds[:, 1:] - want.log_odds[:, :1]) > 1e-4).any(0).all()  # every condition patches
