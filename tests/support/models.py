"""Seed-shaped test models: the study's architecture with random weights and a tiny hidden size.

The study's head list (L3 H13 ... L25 H11) is only valid on a 36-layer x 16-head model. These models
keep that shape and the real Qwen2.5 vocabulary but shrink every width, so every code path (loading
from a folder, ablation, scoring, weight diffs) runs on a CPU in seconds. They are written as ordinary
model folders (config.json + safetensors + tokenizer) so the real loaders are exercised.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from tests.support.tokenizer import QWEN_SPECIAL_TOKENS, qwen25_tokenizer

QWEN25_VOCAB = 151936


def seed_shaped_config(
    n_layers: int = 36, n_heads: int = 16, n_kv_heads: int = 2, head_dim: int = 8, vocab_size: int = QWEN25_VOCAB
) -> Qwen2Config:
    """Qwen2.5-3B's layout (36 x 16 heads, GQA, q/k/v biases, tied embeddings), tiny widths; `vocab_size`
    below Qwen2.5's for a tokenizer of its first ranks (`<|endoftext|>` then follows the last rank)."""
    hidden = n_heads * head_dim
    eos = 151643 if vocab_size == QWEN25_VOCAB else vocab_size - len(QWEN_SPECIAL_TOKENS)
    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        max_position_embeddings=4096,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
    )


def build_seed_shaped_model(out_dir: str | Path, seed: int = 0, n_ranks: int | None = None, **shape: int) -> Path:
    """Write a random-weight Qwen2 model folder with the real Qwen2.5 tokenizer (its first `n_ranks` BPE ranks
    with `n_ranks`, tests.support.tokenizer); returns the folder.

    Weights are drawn with a larger spread than the default init so that ablating a head visibly
    moves the Yes/No probabilities (a model whose heads do nothing would make every test vacuous).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tokenizer = qwen25_tokenizer(n_ranks)
    config = seed_shaped_config(**shape, vocab_size=QWEN25_VOCAB if n_ranks is None else len(tokenizer))
    config.initializer_range = 0.2
    model = Qwen2ForCausalLM(config).eval()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
