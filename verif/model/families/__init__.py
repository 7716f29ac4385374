"""The model families the project runs, and the questions asked of a loaded model through them.

One file per family (or group of near-identical families) describes it (`base.Family`). This module
is the registry: which model_types are supported, where a loaded model's decoder blocks, attention
output projections and MLP down projections are, and whether the fast path may run it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from verif.model.families.base import BASE_KEYS, INERT, LLAMA_KEYS, SHAPE, Family, get_path
from verif.model.families.gemma import GEMMA2, GEMMA3_TEXT
from verif.model.families.gpt_neox import GPT_NEOX
from verif.model.families.llama import LLAMA, MISTRAL
from verif.model.families.olmo2 import OLMO2
from verif.model.families.phi3 import PHI3
from verif.model.families.qwen import QWEN2, QWEN3

if TYPE_CHECKING:
    from torch import nn
    from transformers import PretrainedConfig

FAMILIES: dict[str, Family] = {
    f.model_type: f for f in (QWEN2, LLAMA, MISTRAL, QWEN3, OLMO2, PHI3, GEMMA2, GEMMA3_TEXT, GPT_NEOX)
}
SUPPORTED_FAMILIES = tuple(FAMILIES)

# Keys a checkpoint's config.json may carry that no transformers forward reads for these families
# (remote-code pointers are never executed: models load without trust_remote_code). Keys starting
# with "_" are transformers' bookkeeping, keys ending in "_token_id" name tokens.
UNREAD_KEYS = frozenset({"auto_map", "torch_dtype", "use_return_dict"})


def is_unread_key(key: str) -> bool:
    return key in BASE_KEYS or key in UNREAD_KEYS or key.startswith("_") or key.endswith("_token_id")
_REFUSED = {
    "gemma3": "a multimodal Gemma 3 checkpoint; use a text-only one (model_type gemma3_text, e.g. gemma-3-1b)",
}


def family_of(model_type: str) -> Family:
    """The family of a config's `model_type`; anything else is refused with the supported list."""
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    why = f" ({_REFUSED[model_type]})" if model_type in _REFUSED else ""
    raise ValueError(
        f"model family {model_type!r} is not supported{why}; supported: {', '.join(SUPPORTED_FAMILIES)}"
    )


def model_family(model: nn.Module) -> Family:
    return family_of(model.config.model_type)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a causal LM of a supported family."""
    return get_path(model, model_family(model).layers)


def o_projs(model: nn.Module) -> list[nn.Module]:
    """Each layer's attention output projection, whose input holds the heads side by side."""
    fam = model_family(model)
    return [get_path(layer, fam.o_proj) for layer in get_path(model, fam.layers)]


def down_projs(model: nn.Module) -> list[nn.Module]:
    """Each layer's MLP down projection, whose input holds the neurons side by side."""
    fam = model_family(model)
    return [get_path(layer, fam.down_proj) for layer in get_path(model, fam.layers)]


def final_norm(model: nn.Module) -> nn.Module:
    return get_path(model, model_family(model).final_norm)


def config_gaps(config: PretrainedConfig) -> list[str]:
    """Config features the fast path does not implement for this config (empty: it may run).

    Every key of the config (but transformers' bookkeeping) must be one the family's fast path has
    reviewed, unless it is unset (None or False): a key nobody reviewed, e.g. one a future
    transformers adds to a block, sends the model to the hook path instead of being ignored.
    """
    fam = family_of(config.model_type)
    if fam.fast is None:
        return [f"{fam.model_type} has no fast path"]
    gaps = []
    quant = getattr(config, "quantization_config", None)
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    if quant and str(getattr(method, "value", method)) != "gguf":  # GGUF is dequantized while loading
        gaps.append(f"quantized weights ({method}): the fast path reads plain weight matrices")
    unreviewed = sorted(
        key for key, value in config.to_dict().items()
        if not is_unread_key(key) and key != "quantization_config" and key not in fam.fast.config_keys
        and value is not None and value is not False
    )  # fmt: skip
    if unreviewed:
        gaps.append(f"config keys the fast path was not checked against: {', '.join(unreviewed)}")
    return gaps


def module_gaps(model: nn.Module) -> list[str]:
    """Modules that are not the transformers classes the fast path's arithmetic mirrors (a patched
    or quantized layer, a remote-code model with a familiar model_type): those run on the hook path.
    Embeddings, final norm and LM head are the model's own modules, called as they are."""
    from torch import nn

    fam = model_family(model)
    if fam.fast is None:
        return []
    gaps: set[str] = set()
    for layer in get_path(model, fam.layers):
        if type(layer).__name__ != fam.fast.layer_class:
            gaps.add(f"decoder layer {type(layer).__name__}, the fast path mirrors {fam.fast.layer_class}")
            continue
        mods = fam.fast.modules(layer)
        for lin in (*mods.qkv, mods.o, *mods.gate_up, mods.down):
            if type(lin) is not nn.Linear:
                gaps.add(f"projection of type {type(lin).__name__}, not nn.Linear")
        for norm in (mods.norm_attn, mods.norm_mlp, mods.q_norm, mods.k_norm):
            if norm is not None and type(norm).__name__ not in fam.fast.norm_classes:
                gaps.add(f"norm {type(norm).__name__}, the fast path mirrors {', '.join(sorted(fam.fast.norm_classes))}")
    return sorted(gaps)


def fast_path_gaps(model: nn.Module) -> list[str]:
    """Why this loaded model cannot run on the fast path (empty: it can)."""
    return config_gaps(model.config) + module_gaps(model)


def family_table() -> str:
    """The families as a Markdown table (for the README): model type, the path it takes, and the
    config features the fast path implements beyond the Llama block's (grouped-query heads, the
    activation, any rope type, tied embeddings); every other reviewed key is inert or a shape."""
    rows = ["| model_type | path | config features the fast path implements | notes |", "|---|---|---|---|"]
    for fam in FAMILIES.values():
        keys = fam.fast.config_keys.items() if fam.fast else ()
        features = ", ".join(f"`{k}`" for k, how in keys if how not in (INERT, SHAPE) and k not in LLAMA_KEYS)
        rows.append(f"| {fam.model_type} | {'fast' if fam.fast else 'hook'} | {features or '-'} | {fam.about} |")
    return "\n".join(rows)


__all__ = [
    "FAMILIES", "SUPPORTED_FAMILIES", "Family", "config_gaps", "decoder_layers", "down_projs", "family_of",
    "family_table", "fast_path_gaps", "final_norm", "is_unread_key", "model_family", "module_gaps", "o_projs",
]  # fmt: skip
