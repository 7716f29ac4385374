"""GPT-NeoX / Pythia: LayerNorm with biases, attention and MLP in parallel off one residual, hook path only.

transformers: models/gpt_neox/modeling_gpt_neox.py. The attention output projection is
`attention.dense` (with a bias, which belongs to no head: zeroing a head's input slice removes exactly
that head); the MLP is `dense_h_to_4h` -> GELU -> `dense_4h_to_h`, so a neuron is a coordinate of
`dense_4h_to_h`'s input. `query_key_value` stores q, k, v interleaved per head: rows
[q_h0 | k_h0 | v_h0 | q_h1 | ...], head_dim each. Rotary embeddings cover the first
`partial_rotary_factor` of each head.
"""

from __future__ import annotations

from verif.model.families.base import Arch, CheckpointLayout, Family, Split


def neox_splits(suffix: str, arch: Arch) -> tuple[Split, tuple[int, ...]] | None:
    hd, h, hid, inter = arch.head_dim, arch.n_heads, arch.hidden_size, arch.intermediate_size
    qkv = (("q_proj", h), ("k_proj", h), ("v_proj", h))
    bias = (("q_bias", h), ("k_bias", h), ("v_bias", h))
    table = {
        "attention.query_key_value.weight": (Split("query_key_value", "rows", hd, qkv, True), (3 * h * hd, hid)),
        "attention.query_key_value.bias": (Split("query_key_value", "rows", hd, bias, True), (3 * h * hd,)),
        "attention.dense.weight": (Split("o_proj", "cols", hd), (hid, h * hd)),
        "mlp.dense_4h_to_h.weight": (Split("mlp_value", "cols", 1), (hid, inter)),
        "mlp.dense_h_to_4h.weight": (Split("mlp_up", "rows", 1), (inter, hid)),
        "mlp.dense_h_to_4h.bias": (Split("mlp_up_bias", "rows", 1), (inter,)),
    }
    return table.get(suffix)


GPT_NEOX = Family(
    model_type="gpt_neox",
    layers="gpt_neox.layers",
    o_proj="attention.dense",
    down_proj="mlp.dense_4h_to_h",
    final_norm="gpt_neox.final_layer_norm",
    checkpoint=CheckpointLayout("gpt_neox.layers.", "gpt_neox.embed_in.weight", "embed_out.weight", neox_splits),
    about="hook path (no fast path: parallel attention + MLP, LayerNorm, interleaved fused q/k/v)",
)
