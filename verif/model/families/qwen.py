"""Qwen2 and Qwen3: Llama's block; Qwen2 has q/k/v biases, Qwen3 RMSNorms q and k per head.

transformers: models/qwen2/modeling_qwen2.py, models/qwen3/modeling_qwen3.py. Both may run some
layers with a sliding window (`layer_types`, from `use_sliding_window` and `max_window_layers`).
"""

from __future__ import annotations

from dataclasses import replace

from verif.model.families.base import LLAMA_CHECKPOINT, LLAMA_KEYS, BlockSpec, Family, FastPath
from verif.model.families.llama import llama_modules

QWEN_KEYS = {
    **LLAMA_KEYS,
    "layer_types": "per layer: full attention, or a sliding window (an explicit mask)",
    "sliding_window": "the window of the layers `layer_types` marks sliding_attention",
    "use_sliding_window": "read through `layer_types` and `sliding_window` (set from it by the config)",
    "max_window_layers": "read through `layer_types` (set from it by the config)",
}


def layer_windows(config) -> BlockSpec:
    window = getattr(config, "sliding_window", None)
    return BlockSpec(windows=tuple(window if t == "sliding_attention" else None for t in config.layer_types))


QWEN2 = Family(
    model_type="qwen2",
    layers="model.layers",
    o_proj="self_attn.o_proj",
    down_proj="mlp.down_proj",
    final_norm="model.norm",
    checkpoint=LLAMA_CHECKPOINT,
    fast=FastPath(
        layer_class="Qwen2DecoderLayer",
        norm_classes=frozenset({"Qwen2RMSNorm"}),
        config_keys=QWEN_KEYS,
        block=layer_windows,
        modules=llama_modules,
    ),
    about="fast path (q/k/v biases); sliding-window layers implemented",
)

QWEN3 = Family(
    model_type="qwen3",
    layers="model.layers",
    o_proj="self_attn.o_proj",
    down_proj="mlp.down_proj",
    final_norm="model.norm",
    checkpoint=LLAMA_CHECKPOINT,
    fast=FastPath(
        layer_class="Qwen3DecoderLayer",
        norm_classes=frozenset({"Qwen3RMSNorm"}),
        config_keys={**QWEN_KEYS, "attention_bias": "q/k/v and o_proj biases, added where the model adds them"},
        block=lambda config: replace(layer_windows(config), qk_norm="head"),
        modules=llama_modules,
    ),
    about="fast path; q/k RMSNorm per head, sliding-window layers and attention biases implemented",
)
