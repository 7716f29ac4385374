"""The fast forward pass: per-row head masks, shared layers across conditions, last-token logits only.

A sweep scores every prompt under many conditions. Two facts make that cheaper than one forward per
(prompt, condition):

* Layers below a condition's first ablated layer compute exactly what the baseline computes, so a
  prompt's un-ablated "trunk" is run once and each condition branches off it at its first ablated
  layer. Rows are kept ordered by branch layer, so at layer l the live rows are a prefix of one
  preallocated buffer and no tensor is ever concatenated.
* Only the last position's logits are needed, so the LM head runs on one position per row.

The arithmetic mirrors the transformers implementation of the Qwen2 / Llama decoder (RMSNorm in
float32, rotary embeddings from the model's own `rotary_emb`, SDPA with grouped-query attention) and
is tested against the model's own forward with hook ablation (`verif.score.score_plain`).
q/k/v and gate/up projections run as one matmul each: the fused weights are built once and the
model's own parameters become views into them, so no memory is duplicated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from verif.ablate import apply_head_mask
from verif.model import Arch, decoder_layers


@dataclass
class LayerWeights:
    """One decoder layer's tensors in the layout the fast path uses."""

    ln1: torch.Tensor
    ln1_eps: float
    qkv_w: torch.Tensor
    qkv_b: torch.Tensor | None
    o_w: torch.Tensor
    ln2: torch.Tensor
    ln2_eps: float
    gate_up_w: torch.Tensor
    down_w: torch.Tensor


def _fuse(linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenate the weights (and biases) of linears sharing an input; re-point them at views."""
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


def prepare_weights(model: nn.Module, arch: Arch) -> list[LayerWeights]:
    """Fuse q/k/v and gate/up per layer (in place, as views) and collect the layer tensors."""
    out = []
    for layer in decoder_layers(model):
        attn, mlp = layer.self_attn, layer.mlp
        if attn.o_proj.bias is not None:
            raise ValueError("o_proj has a bias: zeroing its input would not remove a head exactly")
        qkv_w, qkv_b = _fuse([attn.q_proj, attn.k_proj, attn.v_proj])
        gate_up_w, _ = _fuse([mlp.gate_proj, mlp.up_proj])
        out.append(
            LayerWeights(
                layer.input_layernorm.weight, _eps(layer.input_layernorm), qkv_w, qkv_b,
                attn.o_proj.weight, layer.post_attention_layernorm.weight, _eps(layer.post_attention_layernorm),
                gate_up_w, mlp.down_proj.weight,
            )
        )
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm exactly as transformers computes it (float32 statistics, weight applied after the cast)."""
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def decoder_layer(
    h: torch.Tensor,
    w: LayerWeights,
    cos: torch.Tensor,
    sin: torch.Tensor,
    attn_mask: torch.Tensor | None,
    head_mask: torch.Tensor | None,
    arch: Arch,
    act,
) -> torch.Tensor:
    """One pre-norm decoder block on `[rows, T, hidden]`; `head_mask` `[rows, H]` ablates heads."""
    rows, seq, _ = h.shape
    nh, nkv, d = arch.n_heads, arch.n_kv_heads, arch.head_dim
    x = rms_norm(h, w.ln1, w.ln1_eps)
    qkv = F.linear(x, w.qkv_w, w.qkv_b)
    q, k, v = qkv.split([nh * d, nkv * d, nkv * d], dim=-1)
    q = q.view(rows, seq, nh, d).transpose(1, 2)
    k = k.view(rows, seq, nkv, d).transpose(1, 2)
    v = v.view(rows, seq, nkv, d).transpose(1, 2)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    a = F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None, scale=d**-0.5, enable_gqa=nh != nkv
    )
    a = a.transpose(1, 2).reshape(rows, seq, nh * d)
    if head_mask is not None:
        a = apply_head_mask(a, head_mask, d)
    h = h + F.linear(a, w.o_w)
    x = rms_norm(h, w.ln2, w.ln2_eps)
    gate, up = F.linear(x, w.gate_up_w).chunk(2, dim=-1)
    return h + F.linear(act(gate) * up, w.down_w)


def padded_attention_mask(attn: torch.Tensor) -> torch.Tensor:
    """Boolean `[P, 1, T, T]` mask: causal, real keys only; a pad query sees itself (never NaN)."""
    seq = attn.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=attn.device).tril()
    keys = attn.bool()[:, None, None, :]
    diag = torch.eye(seq, dtype=torch.bool, device=attn.device)
    return (causal & keys) | diag


@dataclass
class ForwardStats:
    """Work done, in (row x layer) evaluations: what sharing the trunk saves is visible here."""

    row_layers: int = 0
    rows_out: int = 0


class FastForward:
    """Runs a unit of work (prompts x head masks) through the fused decoder with branching."""

    def __init__(self, model: nn.Module, arch: Arch, max_rows: int = 64, compile_layers: bool = False):
        self.model = model
        self.arch = arch
        self.max_rows = max_rows
        self.weights = prepare_weights(model, arch)
        self.act = ACT2FN[model.config.hidden_act]
        self.layer_fn = torch.compile(decoder_layer, dynamic=True) if compile_layers else decoder_layer
        self.stats = ForwardStats()

    def _chunks(self, n: int):
        """Near-equal chunks of at most max_rows rows (no tiny tail chunk)."""
        n_chunks = -(-n // self.max_rows)
        size = -(-n // n_chunks) if n_chunks else 0
        return [(a, min(a + size, n)) for a in range(0, n, size)] if n else []

    @torch.inference_mode()
    def last_hidden(
        self,
        input_ids: torch.Tensor,
        attn: torch.Tensor | None,
        masks: torch.Tensor,
        share_trunk: bool = True,
    ) -> torch.Tensor:
        """Final-normed last-position states `[P, C, hidden]` for P prompts under C head masks.

        `input_ids` `[P, T]` (left padded when `attn` is given), `masks` `[C, L, H]`. With
        `share_trunk=False` every (prompt, condition) row runs all layers: the reference for sharing.
        """
        arch, dev = self.arch, input_ids.device
        n_prompts, seq = input_ids.shape
        n_cond = masks.shape[0]
        masks = masks.to(dev)
        ablated = masks != 1  # [C, L, H]
        any_layer = ablated.any(-1)  # [C, L]
        first = torch.where(any_layer.any(-1), any_layer.float().argmax(-1), torch.full((n_cond,), arch.n_layers, device=dev))
        if not share_trunk:
            first = torch.zeros_like(first)
        # Row layout: P trunk rows, then (condition, prompt) rows ordered by branch layer.
        branch_conds = [c for c in sorted(range(n_cond), key=lambda c: int(first[c])) if int(first[c]) < arch.n_layers]
        row_cond = torch.tensor([-1] * n_prompts + [c for c in branch_conds for _ in range(n_prompts)], device=dev)
        row_prompt = torch.arange(n_prompts, device=dev).repeat(1 + len(branch_conds))
        row_first = torch.cat([torch.full((n_prompts,), -1, device=dev), first[row_cond[n_prompts:]]])
        n_rows = row_cond.numel()
        enter = [int((row_first <= layer).sum()) for layer in range(arch.n_layers)]  # live rows at layer l

        embed = self.model.get_input_embeddings()
        h = torch.empty(n_rows, seq, arch.hidden_size, dtype=embed.weight.dtype, device=dev)
        h[:n_prompts] = embed(input_ids)
        if attn is None:
            positions = torch.arange(seq, device=dev)[None]
            attn_mask = None
        else:
            positions = (attn.cumsum(-1) - 1).clamp(min=0)
            attn_mask = padded_attention_mask(attn)
        cos, sin = self.model.model.rotary_emb(h[:1], positions)
        per_prompt = attn is not None
        row_masks = torch.ones(n_rows, arch.n_layers, arch.n_heads, dtype=h.dtype, device=dev)
        row_masks[n_prompts:] = masks[row_cond[n_prompts:]].to(h.dtype)
        row_ablates = torch.zeros(n_rows, arch.n_layers, dtype=torch.bool, device=dev)
        row_ablates[n_prompts:] = any_layer[row_cond[n_prompts:]]

        live = n_prompts
        for layer in range(arch.n_layers):
            if enter[layer] > live:  # conditions branching here copy their prompt's trunk state
                h[live:enter[layer]] = h[row_prompt[live:enter[layer]]]
                live = enter[layer]
            w = self.weights[layer]
            for a, b in self._chunks(live):
                idx = row_prompt[a:b]
                c, s = (cos[idx], sin[idx]) if per_prompt else (cos, sin)
                m = attn_mask[idx] if attn_mask is not None else None
                hm = row_masks[a:b, layer] if bool(row_ablates[a:b, layer].any()) else None
                h[a:b] = self.layer_fn(h[a:b], w, c, s, m, hm, arch, self.act)
            self.stats.row_layers += live

        last = self.model.model.norm(h[:, -1])  # [rows, hidden]
        out = last[:n_prompts].unsqueeze(1).repeat(1, n_cond, 1)  # trunk = un-ablated result
        if n_rows > n_prompts:
            out[row_prompt[n_prompts:], row_cond[n_prompts:]] = last[n_prompts:]
        self.stats.rows_out += n_prompts * n_cond
        return out

    @torch.inference_mode()
    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits for `[rows, hidden]` states: one position per row, never `[rows, T, vocab]`."""
        return self.model.get_output_embeddings()(hidden)
