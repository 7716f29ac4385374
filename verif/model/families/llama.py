"""Llama and Mistral: pre-norm RMSNorm blocks, rotary attention, SwiGLU MLP.

transformers: models/llama/modeling_llama.py, models/mistral/modeling_mistral.py. Llama may carry
q/k/v/o biases (`attention_bias`) and gate/up/down biases (`mlp_bias`); Mistral may attend within a
sliding window in every layer. The fast path implements all three.
"""

from __future__ import annotations

from verif.model.families.base import INERT, LLAMA_CHECKPOINT, LLAMA_KEYS, BlockSpec, Family, FastPath, LayerModules

RMS_NORMS = frozenset({"LlamaRMSNorm", "MistralRMSNorm"})


def llama_modules(layer) -> LayerModules:
    """Separate q/k/v and gate/up projections, pre-attention and pre-MLP norms, optional q/k norms."""
    attn, mlp = layer.self_attn, layer.mlp
    return LayerModules(
        (attn.q_proj, attn.k_proj, attn.v_proj), attn.o_proj, (mlp.gate_proj, mlp.up_proj), mlp.down_proj,
        layer.input_layernorm, layer.post_attention_layernorm,
        getattr(attn, "q_norm", None), getattr(attn, "k_norm", None),
    )  # fmt: skip


def full_attention(config) -> BlockSpec:
    return BlockSpec(windows=(None,) * config.num_hidden_layers)


def window_everywhere(config) -> BlockSpec:
    """`sliding_window` (None: off) applies to every layer, as Mistral and Phi-3 read it."""
    return BlockSpec(windows=(getattr(config, "sliding_window", None),) * config.num_hidden_layers)


LLAMA = Family(
    model_type="llama",
    layers="model.layers",
    o_proj="self_attn.o_proj",
    down_proj="mlp.down_proj",
    final_norm="model.norm",
    checkpoint=LLAMA_CHECKPOINT,
    fast=FastPath(
        layer_class="LlamaDecoderLayer",
        norm_classes=RMS_NORMS,
        config_keys={
            **LLAMA_KEYS,
            "attention_bias": "q/k/v and o_proj biases, added where the model adds them",
            "mlp_bias": "gate/up/down biases, added where the model adds them",
            "pretraining_tp": INERT,  # tensor parallelism of pretraining: transformers' Llama forward does not read it
        },
        block=full_attention,
        modules=llama_modules,
    ),
    about="fast path; attention and MLP biases implemented",
)

MISTRAL = Family(
    model_type="mistral",
    layers="model.layers",
    o_proj="self_attn.o_proj",
    down_proj="mlp.down_proj",
    final_norm="model.norm",
    checkpoint=LLAMA_CHECKPOINT,
    fast=FastPath(
        layer_class="MistralDecoderLayer",
        norm_classes=RMS_NORMS,
        config_keys={**LLAMA_KEYS, "sliding_window": "sliding-window attention in every layer (an explicit mask)"},
        block=window_everywhere,
        modules=llama_modules,
    ),
    about="fast path; sliding window implemented",
)
