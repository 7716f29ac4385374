"""Seed-shaped test models: the study's architecture with random weights and a tiny hidden size.

The study's head list (L3 H13 ... L25 H11) is only valid on a 36-layer x 16-head model. These models
keep that shape and the real Qwen2.5 vocabulary but shrink every width, so every code path (loading
from a folder, ablation, scoring, weight diffs) runs on a CPU in seconds. They are written as ordinary
model folders (config.json + safetensors + tokenizer) so the real loaders are exercised.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
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


def copy_with_scaled_queries(src: str | Path, out_dir: str | Path, heads: list[tuple[int, int]], factor: float) -> Path:
    """A copy of a model folder whose `heads` have their rows of W_Q (q_proj.weight) multiplied by `factor`.

    Only those query heads compute differently: under grouped-query attention a key/value head serves
    several query heads, so scaling W_K or W_V would change its partners too.
    """
    src, out = Path(src), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for path in src.iterdir():
        if path.name != "model.safetensors":
            shutil.copy(path, out / path.name)
    tensors = load_file(src / "model.safetensors")
    config = json.loads((src / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    for layer, head in heads:
        key = f"model.layers.{layer}.self_attn.q_proj.weight"
        tensors[key] = tensors[key].clone()
        tensors[key][head * head_dim:(head + 1) * head_dim] *= factor
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})


def build_tiny_model(out_dir: str | Path, seed: int = 0, words: tuple[str, ...] = (), intermediate_size: int = 64
                     ) -> Path:
    """A random-weight Qwen2 folder of 4 layers x 4 heads (hidden 32) with `yes_no_byte_tokenizer` (`words`: more
    single-token words, so prompts tokenize differently): for plumbing (checks, folders, faults) that needs a real
    model folder but none of its numbers; its tokenizer loads in milliseconds and a whole job runs on it in
    seconds. Context length 4096."""
    from tests.support.tokenizer import yes_no_byte_tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = yes_no_byte_tokenizer(words)
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=intermediate_size, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    Qwen2ForCausalLM(config).eval().save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out
