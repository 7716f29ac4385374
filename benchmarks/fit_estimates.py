"""What the models researchers study need per GPU for scoring, from their configs alone (the README's table
in "Models bigger than one GPU"): `verif.model.memory.estimate` in bf16 for prompts of up to 1024 tokens,
with the engine's default token budgets and with smaller ones. No weights, no hub: the architecture numbers
are those of the published configs.

    PYTHONPATH=. python benchmarks/fit_estimates.py
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, Qwen2Config

from verif.model.memory import estimate
from verif.model.options import EngineOptions

GB = 1e9
SPLITS = (1, 2, 4, 8)
MODELS = {
    "Qwen2.5-3B (TinyZero R1)": Qwen2Config(
        vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
        num_key_value_heads=2, tie_word_embeddings=True),
    "Qwen2.5-32B, QwQ-32B, R1-Distill-Qwen-32B": Qwen2Config(
        vocab_size=152064, hidden_size=5120, intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40,
        num_key_value_heads=8, tie_word_embeddings=False),
    "Llama-3.3-70B, R1-Distill-Llama-70B": LlamaConfig(
        vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
        num_key_value_heads=8, tie_word_embeddings=False),
}  # fmt: skip
BUDGETS = {"defaults": EngineOptions(), "max_chunk_tokens 16384, max_unit_tokens 131072":
           EngineOptions(max_chunk_tokens=16384, max_unit_tokens=131072)}


def main() -> None:
    print("| model | engine budgets | parameters GB | reserve per GPU GB | " +
          " | ".join(f"per GPU, {n} GPU{'s' if n > 1 else ''}" for n in SPLITS) + " | 80 GB GPUs needed |")
    print("|---" * (5 + len(SPLITS)) + "|")
    for name, config in MODELS.items():
        for budget, opts in BUDGETS.items():
            est = estimate(config, torch.bfloat16, opts, 1024)
            need = est.gpus_needed(79 * 10**9)  # an 80 GB GPU less ~1 GB of CUDA context
            print(f"| {name} | {budget} | {est.param_bytes / GB:.1f} | {est.reserve_bytes / GB:.1f} | " +
                  " | ".join(f"{est.per_gpu(n) / GB:.1f}" for n in SPLITS) + f" | {need or '> 16'} |")


if __name__ == "__main__":
    main()
