"""Tiny random checkpoints of every supported family, written as model folders.

Each model has 4 layers of 4 query heads (2 key/value heads where the family groups them), head_dim 8,
hidden 32, MLP width 64, and the first 10,000 ranks of the real Qwen2.5 tokenizer (a real BPE tokenizer
with the study's Yes/No ids, so prompts, Yes/No ids and `load_model` run as for a real checkpoint; the
full 151,643-token vocabulary would only make every model 15x larger and its tokenizer 40x slower to load). Weights are drawn wider than the default init, and every
norm weight and bias is randomised too (transformers initialises them to 1 and 0, which would hide
a dropped bias or a q/k norm applied to the wrong tensor).
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    Olmo2Config,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

from tests.support.tokenizer import PLUMBING_RANKS, QWEN_SPECIAL_TOKENS, qwen25_tokenizer
from verif.model.loading import LoadedModel, load_model

EOS = PLUMBING_RANKS  # <|endoftext|>, the first special token after the kept ranks
VOCAB = PLUMBING_RANKS + len(QWEN_SPECIAL_TOKENS)
N_LAYERS, N_HEADS, N_KV, HEAD_DIM, HIDDEN, INTER = 4, 4, 2, 8, 32, 64
WINDOW = 8  # sliding window, shorter than the test prompts so that it matters

_COMMON = dict(
    vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=N_LAYERS,
    num_attention_heads=N_HEADS, max_position_embeddings=512, bos_token_id=EOS, eos_token_id=EOS, pad_token_id=EOS,
)  # fmt: skip
_GQA = dict(num_key_value_heads=N_KV, head_dim=HEAD_DIM)


def family_config(family: str, **overrides):
    """The tiny config of `family` (a model_type), `overrides` passed to the config's constructor."""
    rope_half = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    tied = dict(tie_word_embeddings=True)
    makers = {
        "llama": (LlamaConfig, dict(**_GQA, **tied)),
        "mistral": (MistralConfig, dict(**_GQA, **tied, sliding_window=WINDOW)),
        "qwen2": (Qwen2Config, dict(num_key_value_heads=N_KV, **tied)),
        "qwen3": (Qwen3Config, dict(**_GQA, **tied)),
        "olmo2": (Olmo2Config, dict(num_key_value_heads=N_KV, **tied)),
        "phi3": (Phi3Config, dict(num_key_value_heads=N_KV, **tied, sliding_window=WINDOW, rope_parameters=rope_half)),
        "gemma2": (Gemma2Config, dict(**_GQA, sliding_window=WINDOW, query_pre_attn_scalar=12,
                                      attn_logit_softcapping=5.0, final_logit_softcapping=8.0)),
        "gemma3_text": (Gemma3TextConfig, dict(**_GQA, sliding_window=WINDOW, query_pre_attn_scalar=12,
                                               layer_types=["sliding_attention", "full_attention"] * (N_LAYERS // 2))),
        "gpt_neox": (GPTNeoXConfig, dict(rope_parameters=rope_half)),
    }  # fmt: skip
    cls, kwargs = makers[family]
    return cls(**{**_COMMON, **kwargs, **overrides})


FAMILY_NAMES = ("llama", "mistral", "qwen2", "qwen3", "olmo2", "phi3", "gemma2", "gemma3_text", "gpt_neox")


def build_family_model(out_dir: str | Path, config, tokenizer, seed: int = 0) -> Path:
    """Write a random model of `config` and `tokenizer` as a model folder; returns the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config.initializer_range = 0.2
    model = AutoModelForCausalLM.from_config(config).eval()
    gemma = config.model_type.startswith("gemma")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                # Gemma's norms multiply by (1 + w): centre those weights on 0 instead of 1.
                p.copy_((0.0 if gemma else 1.0) + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn_like(p))
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


# ----------------------------------------------------------------------------------------------------------
# Built and loaded once per test session (shared by every test module that asks)

_TMP = tempfile.TemporaryDirectory(prefix="verif-families-")  # removed when the interpreter exits


@functools.cache
def family_tokenizer():
    """The tokenizer every family model is written with (encode the tests' prompts with it)."""
    return qwen25_tokenizer(PLUMBING_RANKS)


@functools.cache
def family_dir(family: str, overrides: tuple[tuple[str, object], ...] = ()) -> Path:
    """The folder of the tiny `family` model with config `overrides` ((key, value) pairs), built once."""
    name = family + "".join(f"-{k}={v}" for k, v in overrides)
    return build_family_model(Path(_TMP.name) / name, family_config(family, **dict(overrides)), family_tokenizer())


@functools.cache
def load_family(family: str, overrides: tuple[tuple[str, object], ...] = ()) -> LoadedModel:
    """The tiny `family` model loaded through `load_model` (float32, CPU), once per session; read-only."""
    return load_model(str(family_dir(family, overrides)), dtype="float32", device="cpu")


U32 = 2.0**-24  # float32 unit roundoff


def score_tolerance(n_layers: int, hidden: int, log_odds):
    """Allowed |difference| in log-odds between two float32 forwards of one model that round in
    different orders (fast vs hook path, batched vs alone): each block's dot products over `hidden`
    terms carry ~sqrt(hidden) u relative error, L blocks add up like a random walk (sqrt(L)), and the
    logits scale it by their magnitude (O(10)); 16 is that factor with margin. For the tiny models
    ~1e-5 x (1 + |log-odds|), for SmolLM2 ~1.3e-4 x (1 + |log-odds|): 25-50x the differences seen,
    while the ablations tested move log-odds by 1e-3 or more and a dropped bias by ~0.1."""
    import numpy as np

    return 16 * U32 * (n_layers * hidden) ** 0.5 * (1 + np.abs(log_odds))
