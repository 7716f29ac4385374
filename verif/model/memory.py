"""What a model needs in GPU memory, from its config alone: what `--check` prints per worker and what a
worker's device map leaves room for.

Scoring keeps no KV cache (one forward per unit, the last position read), so a worker's peak follows
from the model and the engine's token budgets (`EngineOptions`), whatever the prompts. Counted:

* parameters: every tensor of the model built on the meta device from its config (no memory; exact
  for any family), in the dtype it is scored in, tied weights once;
* one unit's hidden states, twice: the fast path's buffer (`max_unit_tokens` tokens x hidden) and the
  copy made when branch rows enter from the trunk (`verif.model.forward`);
* one forward chunk: `activation_bytes_per_token` x `max_chunk_tokens`, and a padded chunk's boolean
  attention mask (`max_chunk_tokens` x the longest prompt);
* the LM head's logits of one chunk and their float64 log-softmax (rows x vocab x (dtype + 16 bytes)).

A worker split over N GPUs keeps its share of the weights on each GPU (`verif.model.devicemap`) and
needs all the rest on every one (the hidden states move with the layers). CUDA's own context (~0.5 GB)
is outside torch's count: a worker compares with its GPUs' free memory once its context exists.
Not counted: `--generate`'s KV cache, and the self-check's float32 copy (skipped with a warning where
it does not fit, `verif.model.selfcheck`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from accelerate import init_empty_weights
from accelerate.utils import compute_module_sizes
from transformers import AutoModelForCausalLM, PretrainedConfig

from verif.model.arch import Arch
from verif.model.devicemap import GB, DoesNotFitError, balanced_map, min_room
from verif.model.families import family_of
from verif.model.options import EngineOptions

# `max_rows: auto` aims at this many tokens per decoder-block call (verif.model.engine.auto_max_rows): GEMMs at
# the 3B model's shapes reach their full rate well below it (the anchor: bs 64 x 170 tokens already within 4% of
# bs 256), while larger calls only add memory. `EngineOptions.max_chunk_tokens` caps every chunk, "auto" or not.
AUTO_TOKENS_PER_CALL = 32768
# ray.gpus_per_worker values tried when a model does not fit: the largest node in common use has 8 GPUs,
# a 16-GPU node (HGX-2 class) exists.
MAX_GPUS_PER_WORKER = 16


def activation_bytes_per_token(arch: Arch, dtype: torch.dtype) -> int:
    """Peak temporary memory of one decoder-block call per token (upper estimate).

    Counts the fused q/k/v output with its rotary temporaries and repeated k/v, the hidden-size
    temporaries (norms in float32, residuals), and the gate/up output with the activation product.
    """
    elt = torch.finfo(dtype).bits // 8
    qkv = (arch.n_heads + 2 * arch.n_kv_heads) * arch.head_dim
    return elt * (6 * arch.hidden_size + 4 * qkv + 4 * arch.intermediate_size) + 8 * arch.hidden_size


@dataclass(frozen=True)
class PartSizes:
    """A model's parts in forward order with their bytes (`units`), which parts share a tensor (`tied`:
    the LM head and the embeddings of a tied model) and the parameters' bytes (tied ones once)."""

    units: dict[str, int]
    tied: tuple[tuple[str, ...], ...]
    param_bytes: int


def meta_model(config: PretrainedConfig, dtype: torch.dtype) -> torch.nn.Module:
    """The model of `config` on the meta device (shapes and dtypes, no memory), its weights tied as loaded."""
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()
    return model


def part_sizes(model: torch.nn.Module, dtype: torch.dtype) -> PartSizes:
    """The parts a device map places, from a (meta) model: each child of the decoder stack's parent with
    the stack cut into its layers, then the causal LM's other children (the LM head)."""
    layers_path = family_of(model.config.model_type).layers
    base_path, stack = layers_path.rsplit(".", 1)
    sizes = compute_module_sizes(model, dtype=dtype)
    base = model.get_submodule(base_path)
    units: dict[str, int] = {}
    for name, _ in base.named_children():
        if name == stack:
            units.update({f"{layers_path}.{i}": sizes[f"{layers_path}.{i}"] for i in range(len(base.get_submodule(stack)))})
        else:
            units[f"{base_path}.{name}"] = sizes[f"{base_path}.{name}"]
    units.update({name: sizes[name] for name, _ in model.named_children() if name != base_path})
    names = {id(m): n for n, m in model.named_modules()}
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = ()
    if head is not None and head.weight is embed.weight:
        tied = ((names[id(embed)], names[id(head)]),)
    param_bytes = sum(p.numel() for p in model.parameters()) * (torch.finfo(dtype).bits // 8)
    return PartSizes(units, tied, param_bytes)


@dataclass(frozen=True)
class Estimate:
    """Bytes a scoring worker needs on its GPUs (see the module docstring for what each part counts)."""

    sizes: PartSizes
    dtype: torch.dtype
    chunk_tokens: int
    hidden_bytes: int  # one unit's hidden states, twice
    chunk_bytes: int  # one forward chunk's temporaries
    mask_bytes: int  # a padded chunk's attention mask
    logits_bytes: int  # one chunk of LM-head logits with their float64 log-softmax

    def weights_only(self) -> Estimate:
        """The same model with nothing reserved for scoring (a model that only has to be held)."""
        return dataclasses.replace(self, hidden_bytes=0, chunk_bytes=0, mask_bytes=0, logits_bytes=0)

    @property
    def param_bytes(self) -> int:
        return self.sizes.param_bytes

    @property
    def reserve_bytes(self) -> int:
        """What every GPU of a worker needs besides its weights."""
        return self.hidden_bytes + self.chunk_bytes + self.mask_bytes + self.logits_bytes

    def per_gpu(self, n_gpus: int) -> int:
        """The KV-free peak on each of `n_gpus` equal GPUs: the fullest GPU's weights plus the reserve."""
        return min_room(self.sizes.units, n_gpus, self.sizes.tied) + self.reserve_bytes

    def gpus_needed(self, free_per_gpu: int, most: int = MAX_GPUS_PER_WORKER) -> int | None:
        """The fewest GPUs of `free_per_gpu` bytes each that hold a worker, None if not even `most`."""
        return next((n for n in range(1, most + 1) if self.per_gpu(n) <= free_per_gpu), None)

    def describe(self) -> str:
        """What the estimate counts, for `--check` and for a refusal."""
        return (f"parameters {self.param_bytes / GB:.2f} GB ({str(self.dtype).removeprefix('torch.')}), one forward "
                f"chunk {self.chunk_bytes / GB:.2f} GB ({self.chunk_tokens} tokens), hidden states "
                f"{self.hidden_bytes / GB:.2f} GB, logits {self.logits_bytes / GB:.2f} GB, attention mask "
                f"{self.mask_bytes / GB:.2f} GB; KV-free peak {self.per_gpu(1) / GB:.2f} GB on one device")

    def device_map(self, free: Sequence[int], what: str) -> dict[str, int]:
        """The balanced map over GPUs with `free` bytes each, or `DoesNotFitError` naming `what`, the numbers and
        the `ray.gpus_per_worker` that would fit GPUs like the smallest of these."""
        rooms = [f - self.reserve_bytes for f in free]
        try:
            return balanced_map(self.sizes.units, rooms, self.sizes.tied)
        except DoesNotFitError as e:
            n = self.gpus_needed(min(free))
            fix = (f"ray.gpus_per_worker: {n} would fit ({self.per_gpu(n) / GB:.2f} GB per GPU)" if n else
                   f"not even {MAX_GPUS_PER_WORKER} such GPUs would")
            raise DoesNotFitError(
                f"{what} does not fit {len(free)} GPU(s) with {', '.join(f'{f / GB:.2f}' for f in free)} GB free: "
                f"it needs {self.per_gpu(len(free)) / GB:.2f} GB on each ({self.describe()}); {fix}, or lower "
                "engine.max_chunk_tokens / engine.max_unit_tokens"
            ) from e


def estimate(
    config: PretrainedConfig, dtype: torch.dtype, opts: EngineOptions, max_prompt_tokens: int,
    model: torch.nn.Module | None = None,
) -> Estimate:
    """The memory a worker scoring `config`'s model in `dtype` needs, from the config alone (a meta
    model; pass `model` to size an existing one). `max_prompt_tokens`: the longest prompt it may see."""
    arch = family_of(config.model_type).arch(config)
    elt = torch.finfo(dtype).bits // 8
    sizes = part_sizes(model if model is not None else meta_model(config, dtype), dtype)
    longest = min(max_prompt_tokens, opts.max_prompt_tokens)
    unit_tokens = min(opts.max_unit_tokens, opts.max_unit_rows * longest)
    chunk_tokens = opts.max_chunk_tokens
    rows = opts.max_rows if isinstance(opts.max_rows, int) else AUTO_TOKENS_PER_CALL
    logit_rows = min(rows, opts.max_chunk_tokens, opts.max_unit_rows)
    return Estimate(
        sizes, dtype, chunk_tokens,
        hidden_bytes=2 * unit_tokens * arch.hidden_size * elt,
        chunk_bytes=chunk_tokens * activation_bytes_per_token(arch, dtype),
        mask_bytes=chunk_tokens * longest,
        logits_bytes=logit_rows * arch.vocab_size * (elt + 16),
    )  # fmt: skip
