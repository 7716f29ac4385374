"""One load of a slow model per test session, shared by the session's xdist workers.

Loading the packaged SmolLM2 through the real loader (`load_model("packaged:smollm2-135m")`, GGUF) costs
~17 s of CPU per process, almost all of it transformers parsing the GGUF file. Under xdist the first worker
that needs the model loads it that way, pickles the whole `LoadedModel` (`torch.save`: weights, tokenizer,
config, placement, source, everything the loader returned) into the folder the session's workers share,
checks that the copy read back is identical to what it loaded, and only then publishes it; the other workers
read the copy (~0.5 s) instead of parsing the GGUF again. A file lock orders them; the folder
(`tmp_path_factory.getbasetemp().parent`, pytest's per-run folder above the workers' own) is new every run,
so no copy outlives its session. Without xdist there is nothing to share: the model is loaded as it is.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

import torch
from filelock import FileLock

from verif.model.loading import LoadedModel


def _tokenizer_state(tok) -> dict:
    return {
        "class": type(tok),
        "backend": tok.backend_tokenizer.to_str(),
        "init_kwargs": repr(tok.init_kwargs),
        "special": tok.special_tokens_map,
        "added": repr(tok.added_tokens_decoder),
        **{a: getattr(tok, a) for a in ("padding_side", "truncation_side", "pad_token_id", "eos_token_id",
                                        "bos_token_id", "model_max_length", "chat_template")},
    }  # fmt: skip


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).contiguous().view(torch.uint8)  # bit for bit (NaN equal to itself, -0 != 0)


def _tensors(model) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (non-persistent ones too, e.g. rotary inv_freq), tied ones under each name."""
    return {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers(remove_duplicate=False))}


def _sharing(state: dict) -> list[list[str]]:
    """The names of the state_dict entries that share one storage (tied weights), groups of two or more."""
    groups: dict = {}
    for k, t in state.items():
        groups.setdefault((t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)), []).append(k)
    return sorted(g for g in groups.values() if len(g) > 1)


def identical_differences(a: LoadedModel, b: LoadedModel) -> list[str]:
    """What differs between two loaded models (empty: the same parameters and buffers to the bit, tensor
    sharing (tied embeddings), config, generation config, tokenizer, placement, name and source)."""
    diffs = []
    sa, sb = _tensors(a.model), _tensors(b.model)
    if list(sa) != list(sb):
        diffs.append(f"state_dict keys differ: {sorted(set(sa) ^ set(sb))[:5]}")
    for k in sa.keys() & sb.keys():
        x, y = sa[k], sb[k]
        if (x.dtype, x.shape, x.device, x.requires_grad) != (y.dtype, y.shape, y.device, y.requires_grad):
            diffs.append(f"{k}: {x.dtype} {tuple(x.shape)} {x.device} vs {y.dtype} {tuple(y.shape)} {y.device}")
        elif not torch.equal(_bits(x), _bits(y)):
            diffs.append(f"{k}: different bits")
    if _sharing(sa) != _sharing(sb):
        diffs.append(f"tensor sharing (tied weights) differs: {_sharing(sa)} vs {_sharing(sb)}")
    if type(a.model) is not type(b.model) or a.model.training != b.model.training:
        diffs.append(f"model class or mode: {type(a.model)} {a.model.training} vs {type(b.model)} {b.model.training}")
    if a.model.config.to_dict() != b.model.config.to_dict():
        diffs.append("config differs")
    if a.model.generation_config.to_dict() != b.model.generation_config.to_dict():
        diffs.append("generation config differs")
    if _tokenizer_state(a.tokenizer) != _tokenizer_state(b.tokenizer):
        diffs.append("tokenizer differs")
    for field in ("arch", "name", "source", "placement"):
        if getattr(a, field) != getattr(b, field):
            diffs.append(f"{field}: {getattr(a, field)!r} vs {getattr(b, field)!r}")
    return diffs


def shared_load(name: str, load: Callable[[], LoadedModel], tmp_path_factory, config) -> LoadedModel:
    """`load()` once per session: its result pickled for the session's other xdist workers (see the module)."""
    if not hasattr(config, "workerinput"):  # not an xdist worker: no one to share with
        return load()
    folder: Path = tmp_path_factory.getbasetemp().parent
    copy = folder / f"{name}.loaded.pt"
    with FileLock(str(folder / f"{name}.lock")):
        if copy.is_file():
            return torch.load(copy, weights_only=False)
        loaded = load()  # the real load, in this worker
        part = copy.with_name(copy.name + f".{os.getpid()}.part")
        torch.save(loaded, part)
        diffs = identical_differences(loaded, torch.load(part, weights_only=False))
        assert not diffs, f"the pickled copy of {name} is not what was loaded: {diffs}"
        os.replace(part, copy)  # published only once checked
        return loaded
