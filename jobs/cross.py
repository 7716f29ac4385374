"""Cross-model activation patching's first pass: the source model's activations on the sweep's prompts, in OUT.

`ablation.kind: cross` replaces a condition's components (head slices of the o_proj input, neurons' down_proj
inputs, every position) in each model but `ablation.source_model` by the source's activations on the same
prompt, from its unablated forward. The two models never share a worker, so the source's activations are a
cache: before any receiver's shards, the source model's workers read the sweep's prompts in shards
(`SourceShard`, the activations at the components some cross condition touches: `Sites`) and the driver
writes them to `OUT/cross/<source>.safetensors`, in the model's dtype (a copy is exact), and records the
file's SHA-256 and a digest of what it was computed from (the source, the prompts, the components, the
dtype) in the manifest. `--resume` reuses a cache whose record matches and whose file verifies, and
recomputes any other. Each receiver's shard gets its prompts' entries with its payload.

Memory: the cache holds, per prompt, positions x (head_dim per touched head + one per touched neuron, over
the touched layers) x the dtype's bytes, on the driver's disk and memory and, per shard, on its worker
(`CrossPlan.line` says how much before any weights load; the report and the manifest, what was written).

Before any weights load (`check_cross_models`): the source is one of model.path, every model has the
source's architecture (`verif.model.compatible.architecture_difference`) and every prompt is the same
token sequence in each (`tokenization_difference`), each refused in one line naming what differs.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import torch
from safetensors.torch import load, save

from jobs.config import Config
from jobs.errors import InputError
from jobs.inputs import check_cross
from jobs.runtime.storage import OutDir, file_digest, write_bytes_atomic
from verif.design.conditions import CROSS_KINDS, Condition
from verif.model.arch import Arch
from verif.model.compatible import architecture_difference, tokenization_difference
from verif.model.interventions import ActivationCache, Sites
from verif.model.loading import ModelSource


class CrossError(InputError):
    """`ablation.kind: cross` between models that cannot exchange activations, or without a known source."""


@dataclass(frozen=True)
class SourceShard:
    """A slice of the sweep's prompts whose activations the source model's worker returns."""

    id: str
    model: str
    prompt_ids: tuple[int, ...]


@dataclass(frozen=True)
class CrossPlan:
    """Which model is the source, which receive, at which components, and what the cache takes."""

    source: str
    receivers: tuple[str, ...]
    sites: Sites
    digest: str  # of the source, the prompts' tokens, the components and the dtype
    per_shard: int
    n_tokens: int  # positions over all prompts (the source's tokens, which are every model's)
    columns: int  # touched columns over all layers (head_dim per head, one per neuron)
    dtype_bytes: int

    @property
    def nbytes(self) -> int:
        return self.n_tokens * self.columns * self.dtype_bytes

    def line(self, n_prompts: int) -> str:
        """What the cache will hold, for --check and the report."""
        return (f"cross: {self.source}'s activations patched into {', '.join(self.receivers)}; cache "
                f"{_mb(self.nbytes)} = {self.n_tokens} positions over {n_prompts} prompts x {self.columns} columns "
                f"(head_dim per touched head + 1 per touched neuron, all layers) x {self.dtype_bytes} bytes")

    def shards(self, m: int, n_prompts: int) -> list[SourceShard]:
        return [SourceShard(f"m{m}-cross-p{a:06d}", self.source, tuple(range(a, min(a + self.per_shard, n_prompts))))
                for a in range(0, n_prompts, self.per_shard)]


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def source_name(cfg: Config, sources: Sequence[ModelSource]) -> str:
    """The model `ablation.source_model` names (by name or by its model.path entry), or a one-line error."""
    wanted = cfg.ablation.source_model
    for s in sources:
        if wanted in (s.name, s.spec):
            return s.name
    raise CrossError(f"ablation.source_model {wanted!r}: not one of the models in model.path; valid: "
                     f"{', '.join(repr(s.name) for s in sources)}")


def check_cross_models(cfg: Config, sources: Sequence[ModelSource], archs: Sequence[Arch]) -> str | None:
    """With cross: the source's name, after checking it is known and every model has its architecture
    (from configs); None without cross."""
    if "cross" not in cfg.ablation.kinds:
        return None
    check_cross(cfg)
    source = source_name(cfg, sources)
    differ = architecture_difference({s.name: a for s, a in zip(sources, archs)})
    if differ:
        raise CrossError(f"ablation.kind cross: {differ}; activations patch only between models of one "
                         "architecture")
    return source


def plan_cross(cfg: Config, source: str | None, names: Sequence[str], tokenizers: Sequence, prompts: pl.DataFrame,
               where: Sequence[str], conditions: Sequence[Condition], head_dim: int, dtype: torch.dtype
               ) -> CrossPlan | None:
    """The first pass of a sweep with cross conditions (None without), after checking that every prompt is
    the same tokens in every model (the source's positions are the receiver's)."""
    if source is None:
        return None
    texts = prompts["prompt"].to_list()
    tokens = {name: tok(texts, add_special_tokens=False)["input_ids"] for name, tok in zip(names, tokenizers)}
    ordered = {source: tokens[source], **{n: t for n, t in tokens.items() if n != source}}
    differ = tokenization_difference(ordered, where)
    if differ:
        raise CrossError(f"ablation.kind cross: {differ}; a patched activation must land on the same token")
    sites = Sites.of([c.ablation for c in conditions], CROSS_KINDS)
    columns = sum(len(sites.columns(k, head_dim)) for k in sites.keys())
    h = hashlib.sha256(f"{source}\0{sites.to_dict()}\0{dtype}\0".encode())
    for ids in tokens[source]:
        h.update(",".join(map(str, ids)).encode() + b"\n")
    return CrossPlan(source, tuple(n for n in names if n != source), sites, h.hexdigest()[:16],
                     cfg.shards.prompts_per_shard, sum(len(t) for t in tokens[source]), columns,
                     torch.empty((), dtype=dtype).element_size())


def runs_on(plan: CrossPlan | None, model: str, condition: Condition) -> bool:
    """Whether `model` scores `condition`: the source scores no cross condition (it would patch itself)."""
    return plan is None or model != plan.source or condition.intervention not in CROSS_KINDS


def cache_path(out: OutDir, model: str) -> Path:
    return out.cross_cache / f"{re.sub(r'[^A-Za-z0-9._-]+', '_', model)}.safetensors"


def _tensors(cache: ActivationCache) -> dict[str, torch.Tensor]:
    return {f"{i}/{site}/{layer}": t.contiguous() for i, e in enumerate(cache.entries) for (site, layer), t in e.items()}


def stored_cache(plan: CrossPlan, out: OutDir, manifest: dict, n_prompts: int) -> ActivationCache | None:
    """The source's cache from OUT when the manifest records it for this plan and the file verifies."""
    entry = manifest.get("cross", {}).get(plan.source)
    path = cache_path(out, plan.source)
    if not entry or entry.get("digest") != plan.digest or not path.is_file() or file_digest(path) != entry["sha256"]:
        return None
    tensors = load(path.read_bytes())
    entries: list[dict] = [{} for _ in range(n_prompts)]
    for name, t in tensors.items():
        i, site, layer = name.split("/")
        entries[int(i)][(site, int(layer))] = t
    return ActivationCache(plan.sites, entries)


def record_cache(cache: ActivationCache, plan: CrossPlan, out: OutDir, manifest: dict) -> None:
    """Write the cache file and record it (file, SHA-256, the plan's digest, its size) in the manifest."""
    path = cache_path(out, plan.source)
    write_bytes_atomic(save(_tensors(cache)), path)
    manifest.setdefault("cross", {})[plan.source] = {
        "file": str(path.relative_to(out.root)), "sha256": file_digest(path), "digest": plan.digest,
        "receivers": list(plan.receivers), "sites": plan.sites.to_dict(), "n_prompts": len(cache.entries),
        "bytes": cache.nbytes(),
    }
