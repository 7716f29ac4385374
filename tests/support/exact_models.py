"""Small seed-shaped models in float64 with float64 norms, for exactness tests of the discovery code.

transformers' RMSNorm rounds its input through float32 even in a float64 model, so two float64
computations that reach the same norm input by different summation orders can differ by a float32
ulp (~6e-8) after it. The engine keeps norms in float64; giving the model float64 norms too makes
the model's own forward, hooks on it and the engine agree to float64 precision, so tests can ask
for 1e-9 instead of float32 tolerances.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import Qwen2ForCausalLM

from verif.model.loading import LoadedModel, ModelSource, arch_from_config
from tests.support.models import seed_shaped_config


class Float64RMSNorm(nn.Module):
    """RMSNorm in the input's own dtype (same weight and eps attribute as the module it replaces)."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.weight = norm.weight
        self.variance_epsilon = norm.variance_epsilon

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def float64_norms(model: nn.Module) -> nn.Module:
    """Replace every RMSNorm of a Qwen2/Llama model by `Float64RMSNorm` (in place)."""
    for block in model.model.layers:
        block.input_layernorm = Float64RMSNorm(block.input_layernorm)
        block.post_attention_layernorm = Float64RMSNorm(block.post_attention_layernorm)
    model.model.norm = Float64RMSNorm(model.model.norm)
    return model


def small_seed_model(tokenizer, seed: int = 0, dtype: torch.dtype = torch.float64, **shape: int) -> LoadedModel:
    """A random Qwen2 model of the seed's layout (GQA, q/k/v biases, tied embeddings, the Qwen2.5
    vocabulary) built in memory: 4 layers x 4 heads of width 8 unless `shape` says otherwise.

    Weights are drawn with the seed models' larger spread (0.2), so heads visibly move the verdict.
    In float64 the norms are float64 too (`float64_norms`).
    """
    shape = {"n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "head_dim": 8, **shape}
    config = seed_shaped_config(**shape)
    config.initializer_range = 0.2
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).eval().to(dtype)
    if dtype == torch.float64:
        float64_norms(model)
    model.requires_grad_(False)
    return LoadedModel(model, tokenizer, arch_from_config(config), "small-seed", ModelSource("small-seed", "dir", "(in memory)"))
