"""Phi-3: Llama's block with fused `qkv_proj` (rows q | k | v) and `gate_up_proj` (rows gate | up).

transformers: models/phi3/modeling_phi3.py. Its MLP computes `up * act(gate)` (the same product), may
rotate only the first dimensions of each head (`partial_rotary_factor`, e.g. Phi-4-mini) and may use a
sliding window in every layer. The fast path implements all of these.
"""

from __future__ import annotations

from verif.model.families.base import (
    INERT, LLAMA_CHECKPOINT, LLAMA_KEYS, Arch, CheckpointLayout, Family, FastPath, LayerModules, Split, llama_splits,
)  # fmt: skip
from verif.model.families.llama import window_everywhere


def phi3_modules(layer) -> LayerModules:
    attn, mlp = layer.self_attn, layer.mlp
    return LayerModules(
        (attn.qkv_proj,), attn.o_proj, (mlp.gate_up_proj,), mlp.down_proj,
        layer.input_layernorm, layer.post_attention_layernorm,
    )  # fmt: skip


def phi3_splits(suffix: str, arch: Arch) -> tuple[Split, tuple[int, ...]] | None:
    hd, h, kv, hid, inter = arch.head_dim, arch.n_heads, arch.n_kv_heads, arch.hidden_size, arch.intermediate_size
    if suffix == "self_attn.qkv_proj.weight":
        parts = (("q_proj", h), ("k_proj", kv), ("v_proj", kv))
        return Split("qkv_proj", "rows", hd, parts), ((h + 2 * kv) * hd, hid)
    if suffix == "mlp.gate_up_proj.weight":
        return Split("gate_up_proj", "rows", 1, (("mlp_gate", inter), ("mlp_up", inter))), (2 * inter, hid)
    return llama_splits(suffix, arch)


PHI3 = Family(
    model_type="phi3",
    layers="model.layers",
    o_proj="self_attn.o_proj",
    down_proj="mlp.down_proj",
    final_norm="model.norm",
    checkpoint=CheckpointLayout(LLAMA_CHECKPOINT.layer_prefix, LLAMA_CHECKPOINT.embed, LLAMA_CHECKPOINT.unembed, phi3_splits),
    fast=FastPath(
        layer_class="Phi3DecoderLayer",
        norm_classes=frozenset({"Phi3RMSNorm"}),
        config_keys={
            **LLAMA_KEYS,
            "sliding_window": "sliding-window attention in every layer (an explicit mask)",
            "original_max_position_embeddings": "read by the model's own rotary module only (long rope)",
            "embd_pdrop": INERT,
            "resid_pdrop": INERT,
        },
        block=window_everywhere,
        modules=phi3_modules,
    ),
    about="fast path; fused projections used as stored, partial rotary and sliding window implemented",
)
