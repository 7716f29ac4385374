"""The numbers of a decoder that ablation needs, read from its config (no weights)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Arch:
    """Numbers of a decoder that head and neuron ablation need (`family` is the config's model_type)."""

    family: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool

    @property
    def n_neurons(self) -> int:
        """MLP neurons per layer: the width of the down projection's input."""
        return self.intermediate_size
