"""The fast forward pass: per-row head masks, shared layers across conditions, last-token logits only.

A sweep scores every prompt under many conditions. Two facts make that cheaper than one forward per
(prompt, condition):

* Layers below a condition's first ablated layer compute exactly what the baseline computes, so a
  prompt's un-ablated "trunk" is run once and each condition branches off it at its first ablated
  layer. Rows are kept ordered by branch layer, so at layer l the live rows are one contiguous slice
  of a preallocated buffer and no tensor is ever concatenated.
* A resample row replaces components by its prompt's partner's activations, and a counterfactual pair's
  prompts are the same tokens up to the first one that differs: before it the partner's activations are
  the prompt's own, so the row equals the trunk there in every layer. Such a row computes only the
  positions from there on, attending to the trunk's keys and values below (`SharedPrefix`; eager, never a
  compiled graph). The hook path computes every position.
* Only the last position's logits are needed, so the LM head runs on one position per row.

The arithmetic mirrors the transformers implementation of the Llama decoder (RMSNorm in float32
with the weight applied after the cast, rotary embeddings from the model's own `rotary_emb`, SDPA
attention) with the variations of the families that have a fast path (`verif.model.families`: Qwen2,
Qwen3, Mistral, Phi-3, OLMo 2): biases on any projection, q/k norms, post-norms, partial rotary,
sliding-window layers (`BlockSpec`). It is tested against the model's own forward with hook
ablation (`verif.model.score.score_plain`) for every family. q/k/v and gate/up projections run as one
matmul each: the fused weights are built once per model and the model's own parameters become views
into them, so no memory is duplicated (Phi-3 stores them fused already).

Heads are ablated by a `[rows, H]` keep-mask on the attention output before o_proj, neurons by a
`[rows, I]` keep-mask on the down projection's input, built per forward call only for the layers
where one of its rows ablates a neuron. Interventions other than zero (mean, mean_positional,
resample) then write their replacement values at the same two points through an `Edit` of the chunk's
rows (`verif.model.interventions`), which a capture uses to read activations too; a zero-only unit has
no edit and runs exactly as before.

GPU notes. The whole row plan (which rows are live, which chunk ablates at which layer) is computed
on the CPU before the first kernel and copied over without a stream sync, so the host never waits
for the GPU until results are read. Units of one prompt length need no attention mask: attention then runs
`is_causal` with grouped-query heads read in place, which selects the flash kernel in bf16/fp16.
Padded units repeat k/v to full heads instead, so the masked call can use the memory-efficient
kernel (SDPA's grouped-query mode is flash-only and would fall back to the slow math kernel); this
is the choice transformers makes too (`use_gqa_in_sdpa`), so both paths run the same kernels.
`compile_layers` compiles the decoder block once per process with dynamic row and length dimensions
(every unit has its own, so static shapes would recompile for each one and soon exhaust dynamo's
recompile limit); if compiling fails the block runs eagerly and the error is kept in
`FastForward.compile_error`. The last block can run for the last position only
(`last_position_only`), the one position anything downstream reads.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from verif.model.ablation import AblationMasks, apply_head_mask, apply_neuron_mask
from verif.model.arch import Arch
from verif.model.families import final_norm, model_family
from verif.model.families.base import BlockSpec, get_path
from verif.model.interventions import Capture, Edit, UnitEdits
from verif.model.placement import Placement


@dataclass
class LayerWeights:
    """One decoder layer's tensors in the layout the fast path uses (plain tensors, not Parameters).

    `ln1` / `ln2` are the norms before attention and before the MLP, or with `post_norm` the norms of
    their outputs. Biases are None where the model has none.
    """

    ln1: torch.Tensor
    ln1_eps: float
    qkv_w: torch.Tensor
    qkv_b: torch.Tensor | None
    o_w: torch.Tensor
    ln2: torch.Tensor
    ln2_eps: float
    gate_up_w: torch.Tensor
    down_w: torch.Tensor
    o_b: torch.Tensor | None = None
    gate_up_b: torch.Tensor | None = None
    down_b: torch.Tensor | None = None
    qk_norm: str | None = None  # BlockSpec.qk_norm
    q_norm_w: torch.Tensor | None = None
    k_norm_w: torch.Tensor | None = None
    qk_norm_eps: float = 0.0
    post_norm: bool = False
    norm_f32: bool = False
    window: int | None = None


def _fuse(linears: tuple[nn.Module, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenate the weights (and biases) of linears sharing an input; re-point them at views.
    A single (already fused) linear is used as it is."""
    if len(linears) == 1:
        lin = linears[0]
        return lin.weight.data, None if lin.bias is None else lin.bias.data
    weight = torch.cat([lin.weight.data for lin in linears], dim=0)
    has_bias = [lin.bias is not None for lin in linears]
    if any(has_bias) and not all(has_bias):
        raise ValueError("cannot fuse projections where only some have a bias")
    bias = torch.cat([lin.bias.data for lin in linears], dim=0) if all(has_bias) else None
    start = 0
    for lin in linears:
        rows = lin.weight.shape[0]
        lin.weight.data = weight[start:start + rows]
        if bias is not None:
            lin.bias.data = bias[start:start + rows]
        start += rows
    return weight, bias


def _eps(norm: nn.Module) -> float:
    return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))


def _bias(lin: nn.Module) -> torch.Tensor | None:
    return None if lin.bias is None else lin.bias.data


def _still_fused(layer: nn.Module, w: LayerWeights, modules: Callable) -> bool:
    """Whether the model's q and gate weights are still the views made by an earlier `prepare_weights`
    (a later `model.to(...)`, `.float()` or weight load replaces them, and the cache is stale)."""
    mods = modules(layer)
    return (
        mods.qkv[0].weight.data_ptr() == w.qkv_w.data_ptr()
        and mods.qkv[0].weight.dtype == w.qkv_w.dtype
        and mods.gate_up[0].weight.data_ptr() == w.gate_up_w.data_ptr()
        and mods.norm_attn.weight.data_ptr() == w.ln1.data_ptr()
    )


def prepare_weights(model: nn.Module, arch: Arch) -> list[LayerWeights]:
    """Fuse q/k/v and gate/up per layer (in place, as views) and collect the layer tensors.

    The result is cached on the model, so several engines over one model (benchmarks, option sweeps)
    share the fused weights instead of each holding its own copy. Only for families with a fast path.
    """
    fam = model_family(model)
    if fam.fast is None:
        raise ValueError(f"{fam.model_type} has no fast path: score it on the hook path")
    layers = get_path(model, fam.layers)
    modules = fam.fast.modules
    cached = getattr(model, "_verif_fused_weights", None)
    if cached is not None and len(cached) == len(layers) and all(_still_fused(l, w, modules) for l, w in zip(layers, cached)):
        return cached
    spec: BlockSpec = fam.fast.block(model.config)
    out = []
    for i, layer in enumerate(layers):
        mods = modules(layer)
        qkv_w, qkv_b = _fuse(mods.qkv)
        gate_up_w, gate_up_b = _fuse(mods.gate_up)
        w = LayerWeights(
            mods.norm_attn.weight.data, _eps(mods.norm_attn), qkv_w, qkv_b, mods.o.weight.data,
            mods.norm_mlp.weight.data, _eps(mods.norm_mlp), gate_up_w, mods.down.weight.data,
            o_b=_bias(mods.o), gate_up_b=gate_up_b, down_b=_bias(mods.down),
            post_norm=spec.post_norm, norm_f32=spec.norm_weight_f32, window=spec.windows[i],
        )  # fmt: skip
        if spec.qk_norm is not None:
            w.qk_norm, w.qk_norm_eps = spec.qk_norm, _eps(mods.q_norm)
            w.q_norm_w, w.k_norm_w = mods.q_norm.weight.data, mods.k_norm.weight.data
        out.append(w)
    model._verif_fused_weights = out
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as transformers computes it: normalised in float32, cast back, then times the weight
    (float64 inputs stay float64, where transformers would round through float32).

    `F.rms_norm` without a weight computes exactly `(x32 * rsqrt(mean(x32^2) + eps)).to(dtype)` in
    one fused kernel where torch has one; the weight is applied afterwards, in the input dtype, as
    transformers does (applying it inside would round differently in bf16).
    """
    return weight * F.rms_norm(x, (x.shape[-1],), eps=eps)


def _norm(x: torch.Tensor, weight: torch.Tensor, eps: float, weight_f32: bool) -> torch.Tensor:
    """`rms_norm`, or with `weight_f32` OLMo 2's order: the weight multiplies the float32 result,
    then the product is cast back (equal in float32, rounds differently in bf16)."""
    if not weight_f32:
        return rms_norm(x, weight, eps)
    return (weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps)).to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of `[rows, T, heads, d]` with `[rows or 1, T, r]` tables (transformers'
    arithmetic); tables narrower than d rotate the first r dimensions and pass the rest (partial rotary)."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    r = cos.shape[-1]
    if r == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    rot = x[..., :r]
    return torch.cat((rot * cos + _rotate_half(rot) * sin, x[..., r:]), dim=-1)


def _norm_heads(t: torch.Tensor, weight: torch.Tensor, w: LayerWeights, head_dim: int) -> torch.Tensor:
    """A q or k norm on a flat `[rows, T, heads * d]` projection: per head over d (`head`), or over the whole
    projection (`proj`); returns a `[rows, T, heads, d]` view."""
    if w.qk_norm == "proj":
        return _norm(t, weight, w.qk_norm_eps, w.norm_f32).unflatten(-1, (-1, head_dim))
    return _norm(t.unflatten(-1, (-1, head_dim)), weight, w.qk_norm_eps, w.norm_f32)


def _qk_norm(q: torch.Tensor, k: torch.Tensor, w: LayerWeights, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q/k norms on flat `[rows, T, heads * d]` projections (`_norm_heads`)."""
    return _norm_heads(q, w.q_norm_w, w, head_dim), _norm_heads(k, w.k_norm_w, w, head_dim)


def keys_values(
    h: torch.Tensor, w: LayerWeights, cos: torch.Tensor, sin: torch.Tensor, n_heads: int, n_kv_heads: int,
    head_dim: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A block's keys (normed where the family norms them, rotated) and values `[rows, T, kv heads, d]` for its
    input `h` `[rows, T, hidden]`: the same arithmetic as `decoder_layer`'s, without the queries."""
    rows, seq, _ = h.shape
    nh, nkv, d = n_heads, n_kv_heads, head_dim
    x = h if w.post_norm else _norm(h, w.ln1, w.ln1_eps, w.norm_f32)
    kv = F.linear(x, w.qkv_w[nh * d:], None if w.qkv_b is None else w.qkv_b[nh * d:])
    k = kv[..., : nkv * d]
    k = k.view(rows, seq, nkv, d) if w.qk_norm is None else _norm_heads(k, w.k_norm_w, w, d)
    return _rope(k, cos, sin), kv[..., nkv * d:].view(rows, seq, nkv, d)


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None, causal: bool, gqa_in_kernel: bool
) -> torch.Tensor:
    """SDPA on `[rows, T, heads, d]` inputs; returns `[rows, Tq, heads * d]`.

    `gqa_in_kernel` lets SDPA read the shared k/v heads in place (flash kernel only); otherwise k/v
    are repeated to one per query head first, as transformers does when it passes a mask.
    """
    rows, seq_q, nh, d = q.shape
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    grouped = k.shape[1] != nh
    if grouped and not gqa_in_kernel:
        k = k.repeat_interleave(nh // k.shape[1], dim=1)
        v = v.repeat_interleave(nh // v.shape[1], dim=1)
    a = F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, is_causal=causal and attn_mask is None, scale=d**-0.5,
        enable_gqa=grouped and gqa_in_kernel,
    )
    return a.transpose(1, 2).reshape(rows, seq_q, nh * d)


def _block_output(
    h: torch.Tensor, a: torch.Tensor, w: LayerWeights, head_mask: torch.Tensor | None,
    neuron_mask: torch.Tensor | None, head_dim: int, act: Callable[[torch.Tensor], torch.Tensor],
    edit: Edit | None = None,
) -> torch.Tensor:
    """Head ablation, o_proj and residual, then the gated MLP (neuron ablation at the down projection's
    input) and residual (`[rows, (T,) width]`); with `post_norm` the norms apply to the two outputs.
    `edit` then writes the replacement values of non-zero interventions at the two sites (or reads them)."""
    if head_mask is not None:
        a = apply_head_mask(a, head_mask, head_dim)
    if edit is not None:
        a = edit.at_heads(a)
    attn = F.linear(a, w.o_w, w.o_b)
    if w.post_norm:
        h = h + _norm(attn, w.ln1, w.ln1_eps, w.norm_f32)
        x = h
    else:
        h = h + attn
        x = _norm(h, w.ln2, w.ln2_eps, w.norm_f32)
    gate, up = F.linear(x, w.gate_up_w, w.gate_up_b).chunk(2, dim=-1)
    z = act(gate) * up
    if neuron_mask is not None:
        z = apply_neuron_mask(z, neuron_mask)
    if edit is not None:
        z = edit.at_neurons(z)
    mlp = F.linear(z, w.down_w, w.down_b)
    return h + (_norm(mlp, w.ln2, w.ln2_eps, w.norm_f32) if w.post_norm else mlp)


def decoder_layer(
    h: torch.Tensor,
    w: LayerWeights,
    cos: torch.Tensor,
    sin: torch.Tensor,
    attn_mask: torch.Tensor | None,
    head_mask: torch.Tensor | None,
    n_heads: int,
    n_kv_heads: int,
    head_dim: int,
    act: Callable[[torch.Tensor], torch.Tensor],
    gqa_in_kernel: bool,
    neuron_mask: torch.Tensor | None = None,
    edit: Edit | None = None,
    prefix_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """One decoder block on `[rows, T, hidden]`; `head_mask` `[rows, H]` ablates heads, `neuron_mask`
    `[rows, I]` MLP neurons, `edit` replaces what non-zero interventions replace (`verif.model.interventions`).

    `cos`/`sin` are `[rows or 1, T, rotary dims]`; `attn_mask` `[rows or 1, 1, T, T]` or None (causal).
    With `prefix_kv` (keys and values `[rows, S, kv heads, d]` of S earlier positions, `keys_values`) the
    rows are the last T positions of S + T: their queries also attend to those keys, and `attn_mask` is then
    `[rows or 1, 1, T, S + T]` (never None).
    """
    rows, seq, _ = h.shape
    nh, nkv, d = n_heads, n_kv_heads, head_dim
    x = h if w.post_norm else _norm(h, w.ln1, w.ln1_eps, w.norm_f32)
    qkv = F.linear(x, w.qkv_w, w.qkv_b)
    v = qkv[..., (nh + nkv) * d:].view(rows, seq, nkv, d)
    if w.qk_norm is None:
        qk = _rope(qkv[..., : (nh + nkv) * d].view(rows, seq, nh + nkv, d), cos, sin)  # q and k in one pass
        q, k = qk[:, :, :nh], qk[:, :, nh:]
    else:
        q, k = _qk_norm(qkv[..., : nh * d], qkv[..., nh * d: (nh + nkv) * d], w, d)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
    if prefix_kv is not None:
        k, v = torch.cat((prefix_kv[0], k), 1), torch.cat((prefix_kv[1], v), 1)
    a = _attend(q, k, v, attn_mask, True, gqa_in_kernel)
    return _block_output(h, a, w, head_mask, neuron_mask, d, act, edit)


def last_position_layer(
    h: torch.Tensor,
    w: LayerWeights,
    cos: torch.Tensor,
    sin: torch.Tensor,
    attn_mask: torch.Tensor | None,
    head_mask: torch.Tensor | None,
    n_heads: int,
    n_kv_heads: int,
    head_dim: int,
    act: Callable[[torch.Tensor], torch.Tensor],
    gqa_in_kernel: bool,
    neuron_mask: torch.Tensor | None = None,
    edit: Edit | None = None,
    prefix_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The last decoder block, for the last position only: `[rows, T, hidden]` -> `[rows, hidden]`.

    Nothing after the last block reads another position, so only its keys and values are needed at
    every position; the query, o_proj and MLP run on one position per row (~1/36 of a 36-layer
    model's work saved). The arithmetic is the same (equal to ~1e-15 in float64), but GEMMs with
    fewer rows may sum in another order, so in float32 results move by rounding (~1e-5 in log-odds).
    `prefix_kv` as in `decoder_layer`.
    """
    rows, seq, _ = h.shape
    nh, d = n_heads, head_dim
    k, v = keys_values(h, w, cos, sin, n_heads, n_kv_heads, head_dim)
    if prefix_kv is not None:
        k, v = torch.cat((prefix_kv[0], k), 1), torch.cat((prefix_kv[1], v), 1)
    x = h[:, -1:] if w.post_norm else _norm(h[:, -1:], w.ln1, w.ln1_eps, w.norm_f32)
    q = F.linear(x, w.qkv_w[: nh * d], None if w.qkv_b is None else w.qkv_b[: nh * d])
    q = q.view(rows, 1, nh, d) if w.qk_norm is None else _norm_heads(q, w.q_norm_w, w, d)
    q = _rope(q, cos[:, -1:], sin[:, -1:])
    mask = attn_mask[:, :, -1:] if attn_mask is not None else None
    a = _attend(q, k, v, mask, False, gqa_in_kernel)
    if head_mask is not None:
        a = apply_head_mask(a, head_mask, d)
    return _block_output(h[:, -1], a[:, 0], w, None, neuron_mask, d, act, edit)


def padded_attention_mask(attn: torch.Tensor) -> torch.Tensor:
    """Boolean `[P, 1, T, T]` mask: causal, real keys only; a pad query sees itself (never NaN)."""
    seq = attn.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=attn.device).tril()
    keys = attn.bool()[:, None, None, :]
    diag = torch.eye(seq, dtype=torch.bool, device=attn.device)
    return (causal & keys) | diag


def window_masks(
    attn_mask: torch.Tensor | None, windows: set[int | None], seq: int, device: torch.device
) -> dict[int | None, torch.Tensor | None]:
    """The attention mask of each window size (None: full attention) for a unit of length `seq`.

    A query at index i sees keys j with i - j < window, as transformers' sliding-window mask (indices,
    so left padding shifts query and key alike). A window no shorter than the unit changes nothing
    and keeps the unit's own mask, so short prompts keep the causal-only fast kernels.
    """
    out: dict[int | None, torch.Tensor | None] = {None: attn_mask}
    for win in windows - {None}:
        if seq <= win:
            out[win] = attn_mask
            continue
        i = torch.arange(seq, device=device)
        band = (i[:, None] - i[None, :] < win) & (i[:, None] >= i[None, :])  # [T, T] causal, in the window
        out[win] = band[None, None] if attn_mask is None else attn_mask & band
    return out


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The MLP activation as a plain function: `F.silu` for SiLU models, so compiled code guards on one
    object for every engine (transformers' `ACT2FN` makes a new module per lookup)."""
    return F.silu if name in ("silu", "swish") else ACT2FN[name]


def to_device(t: torch.Tensor | np.ndarray, device: torch.device) -> torch.Tensor:
    """Host to device copy that does not wait for the GPU.

    A plain `.to("cuda")` from pageable memory synchronises the stream: the queue would drain at
    every unit and the GPU would idle while the host plans the next one. A pinned copy is queued.
    """
    t = torch.as_tensor(t)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


_COMPILED: dict[str, Callable] = {}


def compiled_decoder_layer() -> Callable:
    """`decoder_layer` under torch.compile, one per process (dynamo caches per function).

    Row count and length are dynamic (every unit has its own), everything else is specialised:
    architecture ints, eps, attention mask or not (2 graphs per model). The raised recompile limit
    leaves room for several models in one process, so it never silently falls back to eager.
    """
    if "layer" not in _COMPILED:
        limit_name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
        setattr(torch._dynamo.config, limit_name, max(getattr(torch._dynamo.config, limit_name), 64))
        _COMPILED["layer"] = torch.compile(decoder_layer, dynamic=None)
    return _COMPILED["layer"]


@dataclass
class ForwardStats:
    """Work done, in (row x layer) evaluations: what sharing the trunk saves is visible here."""

    row_layers: int = 0
    row_positions: int = 0  # (row x layer x position) evaluations: positions a block computes a state at
    device_moves: int = 0  # times the hidden states went on to another device (a split model, verif.model.placement)


@dataclass
class SharedPrefix:
    """Positions before `start` of a unit that the rows of some conditions leave as the unablated forward has
    them: their rows compute positions >= `start` only, attending to the trunk's keys and values below it.

    A resample row replaces a component by its partner's activation at the same position, and a pair's two
    prompts are the same tokens up to the first position where they differ: below it a causal model's partner
    activations are the prompt's own, so the replacement changes nothing there, in any layer (the engine
    builds this from the cache's tokens, `verif.model.engine.Scorer.score_tokens`). `conditions` `[C]`: the
    conditions whose rows skip; `same` `[P]`: prompts whose partner is the prompt itself (nothing differs),
    whose rows of those conditions are the trunk's, exactly.
    """

    start: int
    conditions: np.ndarray
    same: np.ndarray


@dataclass
class RowPlan:
    """Where each (prompt, condition) result comes from, computed on the CPU before any kernel runs.

    Rows are ordered by the layer they enter at: trunk rows (one per prompt, enter at 0, only when
    the trunk is shared) first, then branch rows by branch layer, then the rows of a `SharedPrefix`'s
    conditions (positions >= `start` only) by branch layer. `live[l]` is the `[lo, hi)` slice of rows
    evaluated at layer l at every position, `live_suffix[l]` the slice evaluated at positions >= `start`;
    `source[p, c]` the row whose final state is prompt p under condition c.
    """

    row_prompt: np.ndarray  # [rows] prompt index of each row
    row_cond: np.ndarray  # [rows] condition of a branch row, -1 for a trunk row
    row_ablates: np.ndarray  # [rows, L] whether the row ablates any head at layer l
    row_neurons: np.ndarray  # [rows, L] whether the row ablates any neuron at layer l
    live: list[tuple[int, int]]
    source: np.ndarray  # [P, C]
    live_suffix: list[tuple[int, int]] = field(default_factory=list)
    start: int = 0


def plan_rows(masks: AblationMasks, n_prompts: int, share_trunk: bool, prefix: SharedPrefix | None = None) -> RowPlan:
    """The row layout for `n_prompts` prompts under C conditions' masks (CPU work only).

    A condition branches off the trunk at the first layer where it ablates a head or a neuron. With
    `share_trunk` a condition that ablates nothing reads the trunk row, and the trunk stops after the
    last branch layer when no condition needs its final state (it runs to the last layer when rows of a
    `prefix` read its keys and values). Without it every (prompt, condition) pair runs all layers on its
    own: the reference for what sharing saves, and `prefix` is ignored (there is no trunk to read).
    """
    heads = (masks.heads != 1).any(-1).numpy()  # [C, L]
    ablated = heads | masks.neuron_layers
    n_cond, n_layers = ablated.shape
    first = np.where(ablated.any(-1), ablated.argmax(-1), n_layers)
    if not share_trunk:
        first = np.zeros_like(first)
        prefix = None
    suffix = np.zeros(n_cond, dtype=bool) if prefix is None else prefix.conditions & (first < n_layers)
    branch = sorted((c for c in range(n_cond) if first[c] < n_layers), key=lambda c: (bool(suffix[c]), first[c], c))
    n_trunk = n_prompts if share_trunk else 0
    prompts = np.arange(n_prompts)
    row_prompt = np.concatenate([prompts[:n_trunk]] + [prompts for _ in branch]).astype(np.int64)
    row_cond = np.concatenate([np.full(n_trunk, -1)] + [np.full(n_prompts, c) for c in branch]).astype(np.int64)
    row_enter = np.concatenate([np.zeros(n_trunk, np.int64)] + [np.full(n_prompts, first[c]) for c in branch])
    row_ablates = np.zeros((len(row_prompt), n_layers), dtype=bool)
    row_ablates[n_trunk:] = heads[row_cond[n_trunk:]]
    row_neurons = np.zeros((len(row_prompt), n_layers), dtype=bool)
    row_neurons[n_trunk:] = masks.neuron_layers[row_cond[n_trunk:]]
    source = np.empty((n_prompts, n_cond), dtype=np.int64)
    source[:, first >= n_layers] = prompts[:, None]  # un-ablated conditions: the trunk's final state
    for j, c in enumerate(branch):
        source[:, c] = n_trunk + j * n_prompts + prompts
    same = np.zeros(n_prompts, dtype=bool) if prefix is None else prefix.same
    for c in np.flatnonzero(suffix):
        source[same, c] = prompts[same]  # nothing to patch in: the unablated forward, exactly
    trunk_needed = any(first[c] >= n_layers for c in range(n_cond)) or bool((same.any() and suffix.any()))
    trunk_end = n_layers if trunk_needed else max((int(first[c]) for c in branch), default=0)
    if suffix.any():  # the last layer's suffix rows read the trunk's input to it
        trunk_end = max(trunk_end, n_layers - 1)
    n_full = n_trunk + n_prompts * int((~suffix[branch]).sum()) if branch else n_trunk
    live, live_suffix = [], []
    for layer in range(n_layers):
        lo = 0 if layer < trunk_end else n_trunk
        hi = int(np.searchsorted(row_enter[n_trunk:n_full], layer, side="right")) + n_trunk
        live.append((lo, hi))
        live_suffix.append((n_full, int(np.searchsorted(row_enter[n_full:], layer, side="right")) + n_full))
    return RowPlan(row_prompt, row_cond, row_ablates, row_neurons, live, source, live_suffix,
                   0 if prefix is None else prefix.start)


class FastForward:
    """Runs a unit of work (prompts x conditions) through the fused decoder with branching.

    `max_rows` caps the rows of one decoder-block call; `last_position_only` runs the last block for
    the last position only (`last_position_layer`). Only for models without fast-path gaps
    (`verif.model.families.fast_path_gaps`); the engine checks that before building one. `placement` says
    where each layer lives (default: where its weights are); the hidden states follow the layers.
    """

    def __init__(
        self,
        model: nn.Module,
        arch: Arch,
        max_rows: int = 64,
        compile_layers: bool = False,
        last_position_only: bool = False,
        placement: Placement | None = None,
    ):
        self.model = model
        self.arch = arch
        self.max_rows = max_rows
        self.last_position_only = last_position_only
        self.weights = prepare_weights(model, arch)
        self.windows = {w.window for w in self.weights}
        self.final_norm = final_norm(model)
        self.act = activation(model.config.hidden_act)
        self.layer_fn = compiled_decoder_layer() if compile_layers else decoder_layer
        self.compile_error: str | None = None
        self.stats = ForwardStats()
        self.placement = placement or Placement.of_model(model)

    def _chunks(self, lo: int, hi: int, first: int = 0) -> list[tuple[int, int, int]]:
        """Near-equal chunks `(a, b, first)` of at most `max_rows` rows covering [lo, hi) (no tiny tail chunk),
        each computing positions >= `first`."""
        n = hi - lo
        if n <= 0:
            return []
        n_chunks = -(-n // self.max_rows)
        size = -(-n // n_chunks)
        return [(a, min(a + size, hi), first) for a in range(lo, hi, size)]

    def _layer(self, *args) -> torch.Tensor:
        """The decoder block, compiled if asked; a compile failure falls back to eager once, loudly."""
        if self.layer_fn is decoder_layer or (len(args) > 12 and args[12] is not None):
            return decoder_layer(*args)  # an edit is a Python object: eager, never a compiled graph
        h, _, cos, sin, attn_mask, head_mask = args[:6]
        neuron_mask = args[11] if len(args) > 11 else None
        marks = ((h, (0, 1)), (cos, (0, 1)), (sin, (0, 1)), (attn_mask, (0, 2, 3)), (head_mask, (0,)), (neuron_mask, (0,)))
        for t, dims in marks:
            for dim in dims if t is not None else ():
                torch._dynamo.maybe_mark_dynamic(t, dim)  # compile for any rows/length at once
        try:
            return self.layer_fn(*args)
        except Exception as e:  # torch.compile failures surface at the first call, with many types
            self.compile_error = f"{type(e).__name__}: {e}"[:500]
            warnings.warn(f"torch.compile of the decoder layer failed, running eagerly: {self.compile_error}")
            self.layer_fn = decoder_layer
            return decoder_layer(*args)

    @torch.inference_mode()
    def last_hidden(
        self,
        input_ids: torch.Tensor,
        attn: torch.Tensor | None,
        masks: AblationMasks,
        share_trunk: bool = True,
        edits: UnitEdits | Capture | None = None,
        prefix: SharedPrefix | None = None,
    ) -> torch.Tensor:
        """Final-normed last-position states `[P, C, hidden]` for P prompts under C conditions.

        `input_ids` `[P, T]` (left padded when `attn` is given), `masks` the conditions' ablations
        (on the CPU: the row plan is made there). With `share_trunk=False` every (prompt, condition)
        row runs all layers: the reference for sharing. `edits` gives each chunk's `Edit` per layer
        (the replacements of non-zero interventions, or a capture); None, as for zero-ablation, edits nothing.
        `prefix` (with the trunk shared): conditions whose rows compute positions >= `prefix.start` only.
        """
        arch, dev = self.arch, input_ids.device
        n_prompts, seq = input_ids.shape
        plan = plan_rows(masks, n_prompts, share_trunk, prefix)
        start = plan.start
        n_rows = len(plan.row_prompt)
        row_prompt = to_device(plan.row_prompt, dev)

        embed = self.model.get_input_embeddings()
        h = torch.empty(n_rows, seq, arch.hidden_size, dtype=embed.weight.dtype, device=dev)
        if attn is None:
            positions = torch.arange(seq, device=dev)[None]
            attn_mask = None
        else:
            positions = (attn.cumsum(-1) - 1).clamp(min=0)
            attn_mask = padded_attention_mask(attn)
        layer_masks = window_masks(attn_mask, self.windows, seq, dev)
        suffix_masks: dict[int | None, torch.Tensor | None] = {}
        if start:  # queries >= start against every key: causal needs a mask (SDPA aligns is_causal top-left)
            causal = torch.ones(seq, seq, dtype=torch.bool, device=dev).tril()[None, None]
            suffix_masks = {win: (causal if m is None else m)[:, :, start:] for win, m in layer_masks.items()}
        cos, sin = self.model.model.rotary_emb(h[:1], positions)
        per_prompt = attn is not None
        row_masks = torch.ones(n_rows, arch.n_layers, arch.n_heads, dtype=h.dtype)
        branch = plan.row_cond >= 0
        row_masks[torch.from_numpy(branch)] = masks.heads[torch.from_numpy(plan.row_cond[branch])].to(h.dtype)
        row_masks = to_device(row_masks, dev)

        compiled = self.layer_fn is not decoder_layer
        place = self.placement
        split, slot = place.split, place.embed
        filled = 0  # rows [0, filled) hold a state
        filled_suffix = plan.live_suffix[0][0]  # rows [live_suffix lo, filled_suffix) hold one at positions >= start
        for layer in range(arch.n_layers):
            lo, hi = plan.live[layer]
            slo, shi = plan.live_suffix[layer]
            if hi > filled:  # rows entering here start from their prompt's trunk state (or the embeddings)
                src = row_prompt[filled:hi]
                h[filled:hi] = embed(input_ids[src]) if layer == 0 else h[src]
                filled = hi
            if shi > filled_suffix:
                src = row_prompt[filled_suffix:shi]
                h[filled_suffix:shi, start:] = embed(input_ids[src, start:]) if layer == 0 else h[src, start:]
                filled_suffix = shi
            if split and (layer == 0 or place.layers[layer] != slot):  # the layer lives on another device
                self.stats.device_moves += place.layers[layer] != slot
                slot = place.layers[layer]
                h, row_prompt, cos, sin, layer_masks, suffix_masks, row_masks = place.to_all(
                    (h, row_prompt, cos, sin, layer_masks, suffix_masks, row_masks), slot)
                dev = place.device(slot)
            w = self.weights[layer]
            final = self.last_position_only and layer == arch.n_layers - 1
            kv = None
            if shi > slo:  # the trunk's keys and values below start, read before the trunk rows move on
                c, s = (cos[:, :start], sin[:, :start])
                kv = keys_values(h[:n_prompts, :start], w, c, s, arch.n_heads, arch.n_kv_heads, arch.head_dim)
            for a, b, first in self._chunks(lo, hi, 0) + self._chunks(slo, shi, start):
                idx = row_prompt[a:b]
                c, s = (cos[idx], sin[idx]) if per_prompt else (cos, sin)
                mask = (suffix_masks if first else layer_masks)[w.window]
                m = mask[idx] if mask is not None and mask.shape[0] > 1 else mask
                # Eager: skip the multiply where no row ablates. Compiled: always pass the mask (the
                # multiply fuses into a copy that runs anyway), so half as many graphs get compiled.
                ablates = compiled or plan.row_ablates[a:b, layer].any()
                hm = row_masks[a:b, layer] if ablates else None
                args = (h[a:b, first:], w, c[:, first:], s[:, first:], m, hm, arch.n_heads, arch.n_kv_heads,
                        arch.head_dim, self.act, m is None)  # grouped-query heads in place only without a mask
                neurons = plan.row_neurons[a:b, layer].any()
                edit = None if edits is None else edits.at(layer, plan.row_cond[a:b], plan.row_prompt[a:b])
                neuron_keep = (to_device(masks.neuron_keep(plan.row_cond[a:b], layer).to(h.dtype), dev) if neurons
                               else None)
                if first:  # a suffix chunk: eager, with the trunk's keys and values below start
                    prefix_kv = (kv[0][idx], kv[1][idx])
                    fn = last_position_layer if final else decoder_layer
                    out = fn(*args, neuron_keep, edit, prefix_kv)
                elif final:  # eager: 1/36 of the work, not worth a compiled graph of its own
                    out = last_position_layer(*args, neuron_keep, edit)
                else:
                    out = self._layer(*args, *((neuron_keep,) if neurons or edit is not None else ()),
                                      *((edit,) if edit is not None else ()))
                if final:
                    h[a:b, -1] = out
                else:
                    h[a:b, first:] = out
                self.stats.row_positions += (b - a) * (1 if final else seq - first)
            self.stats.row_layers += hi - lo + shi - slo

        if split:
            self.stats.device_moves += place.norm != slot
            h, dev = place.to(h[:, -1:], place.norm), place.device(place.norm)
        last = self.final_norm(h[:, -1])  # [rows, hidden]
        return last[to_device(plan.source, dev)]

    def logits(
        self, input_ids: torch.Tensor, attn: torch.Tensor | None, masks: AblationMasks, share_trunk: bool = True,
        edits: UnitEdits | None = None, prefix: SharedPrefix | None = None,
    ) -> Iterator[torch.Tensor]:
        """Last-position logits `[rows, vocab]` of a unit, `max_rows` rows at a time, prompt-major."""
        hidden = self.last_hidden(input_ids, attn, masks, share_trunk, edits, prefix)
        flat = hidden.reshape(-1, hidden.shape[-1])
        for a in range(0, flat.shape[0], self.max_rows):
            yield self.lm_head(flat[a:a + self.max_rows])

    @torch.inference_mode()
    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits for `[rows, hidden]` states: one position per row, never `[rows, T, vocab]`."""
        if self.placement.split:
            self.stats.device_moves += self.placement.head != self.placement.norm
            hidden = self.placement.to(hidden, self.placement.head)
        return self.model.get_output_embeddings()(hidden)
