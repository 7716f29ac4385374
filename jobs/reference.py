"""The mean kinds' first pass: the reference prompts' mean activations, computed once, kept in OUT.

`mean` and `mean_positional` replace a component's activation by its mean over the reference prompts
(`ablation.reference`: the sweep's own prompts, correct and incorrect, or a file in the prompts.file
formats, rendered with the sweep's template). Before the scoring shards of a model, its workers read
those prompts in shards (`ReferenceShard`, float64 sums of the touched components only: `Sites`) and the
driver adds the sums, divides once and writes `OUT/reference/<model>.npz`. The manifest records, per model,
the file's SHA-256, a digest of the means and one of the reference prompts (their texts and the template):
`--resume` refuses a folder whose reference prompts changed (an edited reference file), reuses a means file
that verifies and recomputes one that does not.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from jobs.config import Config
from jobs.inputs import ReferenceError, read_reference_file
from jobs.runtime.storage import OutDir, file_digest
from verif.design.conditions import REFERENCE_KINDS, Condition
from verif.model.interventions import ReferenceMeans, ReferenceSums, Sites


@dataclass(frozen=True)
class ReferenceShard:
    """A slice of the reference prompts whose activation sums one worker returns."""

    id: str
    model: str
    prompt_ids: tuple[int, ...]


@dataclass(frozen=True)
class ReferencePlan:
    """What the first pass reads (`texts`), at which components (`sites`), with positional means or not."""

    source: str  # "prompts" or the file
    texts: tuple[str, ...]
    sites: Sites
    positional: bool
    per_shard: int

    @property
    def digest(self) -> str:
        """The reference prompts as they are read (a changed file or template changes it)."""
        h = hashlib.sha256()
        for t in self.texts:
            h.update(t.encode())
            h.update(b"\0")
        return h.hexdigest()[:16]

    def shards(self, m: int, model: str) -> list[ReferenceShard]:
        n = len(self.texts)
        return [ReferenceShard(f"m{m}-reference-p{a:06d}", model, tuple(range(a, min(a + self.per_shard, n))))
                for a in range(0, n, self.per_shard)]


def plan_reference(cfg: Config, prompts: pl.DataFrame, conditions: Sequence[Condition]) -> ReferencePlan | None:
    """The first pass of a sweep whose conditions include a mean kind (None otherwise)."""
    ablations = [c.ablation for c in conditions]
    sites = Sites.of(ablations, REFERENCE_KINDS)
    if not sites:
        return None
    source = cfg.ablation.reference
    texts = prompts["prompt"].to_list() if source == "prompts" else read_reference_file(cfg)
    positional = any(a.kind == "mean_positional" for a in ablations)
    return ReferencePlan(source, tuple(texts), sites, positional, cfg.shards.prompts_per_shard)


def check_positional_lengths(plan: ReferencePlan | None, prompts: Sequence[str], tokenizers: dict) -> None:
    """With mean_positional, every scored prompt is at most as long as the longest reference prompt in each
    model's tokens (a position no reference prompt has has no mean)."""
    if plan is None or not plan.positional or plan.source == "prompts":
        return
    for model, tok in tokenizers.items():
        ref = max(len(t) for t in tok(list(plan.texts), add_special_tokens=False)["input_ids"])
        lengths = [len(t) for t in tok(list(prompts), add_special_tokens=False)["input_ids"]]
        i = int(np.argmax(lengths))
        if lengths[i] > ref:
            raise ReferenceError(
                f"ablation.reference {plan.source!r}: prompt {i} has {lengths[i]} tokens ({model}), more than the "
                f"longest reference prompt ({ref}); mean_positional has no mean for its first positions: add longer "
                "reference attempts or use ablation.reference: prompts")


def means_path(out: OutDir, model: str) -> Path:
    return out.root / "reference" / f"{re.sub(r'[^A-Za-z0-9._-]+', '_', model)}.npz"


def _write_npz(arrays: dict[str, np.ndarray], path: Path) -> None:
    """Atomically, as every file of OUT: a temp file, fsync, rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def resume_problems(old: dict, plan: ReferencePlan | None) -> list[str]:
    """What makes a folder's recorded reference unusable for this plan (empty: nothing)."""
    if plan is None:
        return []
    recorded = {e.get("prompts_digest") for e in old.get("reference", {}).values()}
    if recorded and recorded != {plan.digest}:
        return [f"ablation.reference: the reference prompts changed ({', '.join(sorted(map(str, recorded)))} -> "
                f"{plan.digest})"]
    return []


def stored_means(plan: ReferencePlan, out: OutDir, manifest: dict, model: str) -> ReferenceMeans | None:
    """The model's means from OUT when the manifest records them for this plan and the file verifies."""
    entry = manifest.get("reference", {}).get(model)
    path = means_path(out, model)
    if not entry or entry.get("prompts_digest") != plan.digest or entry.get("sites") != plan.sites.to_dict() \
            or entry.get("positional") != plan.positional or not path.is_file() or file_digest(path) != entry["sha256"]:
        return None
    with np.load(path) as arrays:
        means = ReferenceMeans.from_arrays(plan.sites, dict(arrays))
    return means if means.digest() == entry["digest"] else None


def record_means(sums: ReferenceSums, plan: ReferencePlan, out: OutDir, manifest: dict, model: str) -> ReferenceMeans:
    """Divide the added sums once, write the means file and record it in the manifest."""
    means = sums.means()
    path = means_path(out, model)
    _write_npz(means.arrays(), path)
    manifest.setdefault("reference", {})[model] = {
        "file": str(path.relative_to(out.root)), "sha256": file_digest(path), "digest": means.digest(),
        "prompts_digest": plan.digest, "source": plan.source, "n_prompts": means.n_prompts,
        "n_tokens": means.n_tokens, "sites": plan.sites.to_dict(), "positional": plan.positional,
    }
    return means
