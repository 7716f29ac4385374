"""What describes a model family: where its heads and neurons are, how its checkpoint is laid out,
and what the fast path needs to run it.

A family file (one per model, or per group of near-identical models, as transformers keeps them)
builds one `Family`. Everything ablation touches is named there as a module path, so the hook path
(`verif.model.ablation.HookedAblation`) works on any family without code of its own. The fast path
(`verif.model.forward`) runs only the families that describe a `FastPath`, and only for configs
whose every feature it implements: `FastPath.config_keys` lists each key of the family's config
class with how the fast path treats it, and a key it does not list sends the model to the hook path.

No transformers import at module level: the weight diff's Ray workers import `Split` from here and
should not pay for transformers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import reduce
from typing import TYPE_CHECKING

from verif.model.arch import Arch

if TYPE_CHECKING:
    from torch import nn
    from transformers import PretrainedConfig


# ----------------------------------------------------------------------------------------------------------
# Checkpoint layout (for the weight diff)


@dataclass(frozen=True)
class Split:
    """How a tensor is cut into vectors: `rows` or `cols` groups of `group`, or `whole`.

    A fused tensor holds several components: `parts` lists (component, vectors) in storage order,
    as consecutive blocks (Phi-3's qkv_proj: all q heads, then k, then v), or, with `interleaved`,
    cycling per index (GPT-NeoX's query_key_value: q, k, v of head 0, then of head 1, ...).
    """

    component: str
    axis: str
    group: int = 1
    parts: tuple[tuple[str, int], ...] = ()
    interleaved: bool = False

    def labels(self, n: int) -> tuple[list[str], list[int]]:
        """(component, index) of each of the `n` vectors, in storage order."""
        if not self.parts:
            return [self.component] * n, list(range(n))
        if self.interleaved:
            names = [c for c, _ in self.parts]
            return [names[j % len(names)] for j in range(n)], [j // len(names) for j in range(n)]
        comps, index = [], []
        for name, k in self.parts:
            comps += [name] * k
            index += list(range(k))
        if len(comps) != n:
            raise ValueError(f"fused tensor {self.component}: parts hold {len(comps)} vectors, the tensor {n}")
        return comps, index


@dataclass(frozen=True)
class CheckpointLayout:
    """Tensor names of a family's checkpoints and how each per-layer tensor splits into heads / neurons.

    `splits(suffix, arch)` gives, for the name after `layer_prefix` + `N.`, the split and the shape the
    config implies; None means the tensor is compared whole (norms, an output bias: they belong to no
    head or neuron).
    """

    layer_prefix: str
    embed: str
    unembed: str
    splits: Callable[[str, Arch], tuple[Split, tuple[int, ...]] | None]


def llama_splits(suffix: str, arch: Arch) -> tuple[Split, tuple[int, ...]] | None:
    """Separate q/k/v/o and gate/up/down projections (`self_attn.*_proj`, `mlp.*_proj`), biases optional."""
    hd, h, kv, hid, inter = arch.head_dim, arch.n_heads, arch.n_kv_heads, arch.hidden_size, arch.intermediate_size
    table = {
        "self_attn.q_proj.weight": (Split("q_proj", "rows", hd), (h * hd, hid)),
        "self_attn.q_proj.bias": (Split("q_bias", "rows", hd), (h * hd,)),
        "self_attn.k_proj.weight": (Split("k_proj", "rows", hd), (kv * hd, hid)),
        "self_attn.k_proj.bias": (Split("k_bias", "rows", hd), (kv * hd,)),
        "self_attn.v_proj.weight": (Split("v_proj", "rows", hd), (kv * hd, hid)),
        "self_attn.v_proj.bias": (Split("v_bias", "rows", hd), (kv * hd,)),
        "self_attn.o_proj.weight": (Split("o_proj", "cols", hd), (hid, h * hd)),
        "mlp.down_proj.weight": (Split("mlp_value", "cols", 1), (hid, inter)),
        "mlp.up_proj.weight": (Split("mlp_up", "rows", 1), (inter, hid)),
        "mlp.up_proj.bias": (Split("mlp_up_bias", "rows", 1), (inter,)),
        "mlp.gate_proj.weight": (Split("mlp_gate", "rows", 1), (inter, hid)),
        "mlp.gate_proj.bias": (Split("mlp_gate_bias", "rows", 1), (inter,)),
    }
    return table.get(suffix)


LLAMA_CHECKPOINT = CheckpointLayout("model.layers.", "model.embed_tokens.weight", "lm_head.weight", llama_splits)


# ----------------------------------------------------------------------------------------------------------
# The fast path's view of a family


@dataclass(frozen=True)
class BlockSpec:
    """What the fast path's decoder block computes for one model (static, read from its config).

    The block is Llama's (pre-norm RMSNorm, rotary attention, gated MLP) with these variations.
    """

    qk_norm: str | None = None  # "head": RMSNorm over head_dim per head (Qwen3); "proj": over the whole q / k projection (OLMo 2)
    post_norm: bool = False  # norms on the attention and MLP outputs instead of their inputs (OLMo 2)
    norm_weight_f32: bool = False  # the norm weight multiplies in float32 before the cast back (OLMo 2)
    windows: tuple[int | None, ...] = ()  # per layer: sliding-window size, None for full causal attention


@dataclass(frozen=True)
class LayerModules:
    """One decoder block's modules as the fast path reads them."""

    qkv: tuple[nn.Module, ...]  # q, k, v projections, or one fused projection with rows q | k | v
    o: nn.Module
    gate_up: tuple[nn.Module, ...]  # gate and up projections, or one fused projection with rows gate | up
    down: nn.Module
    norm_attn: nn.Module  # the norm before attention (post_norm: of the attention output)
    norm_mlp: nn.Module  # the norm before the MLP (post_norm: of the MLP output)
    q_norm: nn.Module | None = None
    k_norm: nn.Module | None = None


# Config keys no forward pass reads (training, generation, token ids): reviewed once for all families.
INERT = "not read by the forward pass (training, generation or token ids)"
SHAPE = "a shape: read from the weights' own shapes"
# Keys of transformers' base PretrainedConfig (bookkeeping, output flags): none changes the arithmetic.
BASE_KEYS = frozenset({
    "_name_or_path", "architectures", "chunk_size_feed_forward", "dtype", "id2label", "is_encoder_decoder",
    "label2id", "model_type", "output_attentions", "output_hidden_states", "problem_type", "return_dict",
    "transformers_version",
})  # fmt: skip

# The keys every Llama-like config shares, and how the fast path treats each.
LLAMA_KEYS: Mapping[str, str] = {
    "vocab_size": SHAPE,
    "hidden_size": SHAPE,
    "intermediate_size": SHAPE,
    "num_hidden_layers": SHAPE,
    "num_attention_heads": SHAPE,
    "num_key_value_heads": "grouped-query attention: k/v heads shared by consecutive query heads",
    "head_dim": SHAPE,
    "hidden_act": "the MLP activation, transformers' ACT2FN",
    "rms_norm_eps": "read from each norm module",
    "rope_parameters": "cos/sin from the model's own rotary module (any rope type); a partial rotary factor "
    "rotates the first dimensions only",
    "max_position_embeddings": "read by the model's own rotary module only",
    "tie_word_embeddings": "logits from the model's own output embeddings",
    "attention_dropout": INERT,
    "initializer_range": INERT,
    "use_cache": INERT,
    "bos_token_id": INERT,
    "eos_token_id": INERT,
    "pad_token_id": INERT,
}


@dataclass(frozen=True)
class FastPath:
    """The fast path's contract with a family: the transformers classes its arithmetic mirrors, every
    reviewed config key, the block variations a config selects, and where the block's modules are."""

    layer_class: str
    norm_classes: frozenset[str]
    config_keys: Mapping[str, str]
    block: Callable[[PretrainedConfig], BlockSpec]
    modules: Callable[[nn.Module], LayerModules]


# ----------------------------------------------------------------------------------------------------------
# The family


def standard_arch(config: PretrainedConfig) -> Arch:
    """The Arch from the config keys most decoders use (`num_key_value_heads` absent: no grouping)."""
    n_heads = config.num_attention_heads
    return Arch(
        family=config.model_type,
        n_layers=config.num_hidden_layers,
        n_heads=n_heads,
        n_kv_heads=getattr(config, "num_key_value_heads", None) or n_heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // n_heads,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        vocab_size=config.vocab_size,
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
    )


def sdpa(config: PretrainedConfig) -> str:
    return "sdpa"


@dataclass(frozen=True)
class Family:
    """A model family: module paths (dotted, from the causal LM; `o_proj` and `down_proj` from a
    decoder block), checkpoint layout, and the fast path if it has one."""

    model_type: str
    layers: str
    o_proj: str
    down_proj: str
    final_norm: str
    checkpoint: CheckpointLayout
    arch: Callable[[PretrainedConfig], Arch] = standard_arch
    attn_implementation: Callable[[PretrainedConfig], str] = sdpa
    fast: FastPath | None = None
    about: str = ""  # why it takes the path it takes: one line for the README's family table


def get_path(obj: object, dotted: str) -> object:
    """`get_path(model, "model.layers")` is `model.model.layers`."""
    return reduce(getattr, dotted.split("."), obj)
