"""OLMo 2: no pre-norms; RMSNorm on the attention and MLP outputs, and on the whole q and k projections.

transformers: models/olmo2/modeling_olmo2.py. Its RMSNorm multiplies the weight in float32 before the
cast back (Llama's casts first): the same in float32, a different rounding in bf16.
"""

from __future__ import annotations

from verif.model.families.base import LLAMA_CHECKPOINT, LLAMA_KEYS, BlockSpec, Family, FastPath, LayerModules


def olmo2_modules(layer) -> LayerModules:
    attn, mlp = layer.self_attn, layer.mlp
    return LayerModules(
        (attn.q_proj, attn.k_proj, attn.v_proj), attn.o_proj, (mlp.gate_proj, mlp.up_proj), mlp.down_proj,
        layer.post_attention_layernorm, layer.post_feedforward_layernorm, attn.q_norm, attn.k_norm,
    )  # fmt: skip


OLMO2 = Family(
    model_type="olmo2",
    layers="model.layers",
    o_proj="self_attn.o_proj",
    down_proj="mlp.down_proj",
    final_norm="model.norm",
    checkpoint=LLAMA_CHECKPOINT,
    fast=FastPath(
        layer_class="Olmo2DecoderLayer",
        norm_classes=frozenset({"Olmo2RMSNorm"}),
        config_keys={**LLAMA_KEYS, "attention_bias": "q/k/v and o_proj biases, added where the model adds them"},
        block=lambda config: BlockSpec(
            qk_norm="proj", post_norm=True, norm_weight_f32=True, windows=(None,) * config.num_hidden_layers
        ),
        modules=olmo2_modules,
    ),
    about="fast path; post-norms and q/k norms implemented",
)
