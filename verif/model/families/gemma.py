"""Gemma 2 and Gemma 3 (text): hook path only.

transformers: models/gemma2/modeling_gemma2.py, models/gemma3/modeling_gemma3.py. Their blocks scale
the embeddings by sqrt(hidden), use (1 + w) RMSNorms computed in float32, norm before and after both
attention and MLP ("sandwich"), scale queries by `query_pre_attn_scalar`, alternate sliding-window and
global layers (Gemma 3 with a rotary base per layer type and per-head q/k norms), soft-cap attention
logits and final logits (Gemma 2; Gemma 3 optionally). Ablation points are Llama's: `self_attn.o_proj`
and `mlp.down_proj` inputs. No fast path: scoring runs the model's own forward with ablation hooks.
Soft-capped attention cannot run in SDPA, so those models load with eager attention.
"""

from __future__ import annotations

from verif.model.families.base import LLAMA_CHECKPOINT, Family


def eager_if_softcapped(config) -> str:
    """transformers refuses SDPA with attention soft-capping (it would silently drop it otherwise)."""
    return "eager" if getattr(config, "attn_logit_softcapping", None) is not None else "sdpa"


GEMMA2 = Family(
    model_type="gemma2",
    layers="model.layers",
    o_proj="self_attn.o_proj",
    down_proj="mlp.down_proj",
    final_norm="model.norm",
    checkpoint=LLAMA_CHECKPOINT,
    attn_implementation=lambda config: "eager",  # Gemma2PreTrainedModel._supports_sdpa is False
    about="hook path (no fast path: sandwich norms, soft-capping, query_pre_attn_scalar); eager attention",
)

GEMMA3_TEXT = Family(
    model_type="gemma3_text",
    layers="model.layers",
    o_proj="self_attn.o_proj",
    down_proj="mlp.down_proj",
    final_norm="model.norm",
    checkpoint=LLAMA_CHECKPOINT,
    attn_implementation=eager_if_softcapped,
    about="hook path (no fast path: sandwich norms, q/k norms, rotary base per layer type); eager attention "
    "when soft-capped",
)
