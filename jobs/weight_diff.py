"""The weight-diff job: compare a fine-tune with its base and write the tables the study's claim is checked on.

`run_weight_diff` is the entry point for `launch.py --weight-diff` and for a sweep config's `weight_diff:`
section. The arithmetic lives in `verif.analysis.weightdiff`; this module only plans, spreads the per-layer work
over Ray workers when asked (each worker opens the files itself: it is sent paths, never tensors) and
writes the outputs:

  OUT/weight_diff.parquet            one row per head / kv head / neuron vector / whole tensor
  OUT/weight_diff_selection.parquet  one summary row per selection, with its one-line verdict
  OUT/weight_diff_selected_rows.parquet  the rows of the target heads / value vectors / top-k neurons
  OUT/weight_diff_summary.json       inputs, dtypes, timings and the verdict lines
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from verif.analysis.weightdiff import (
    DiffPlan,
    PairTask,
    check_selection,
    diff_checkpoints,
    diff_pairs,
    open_checkpoint,
    plan_diff,
    select_rows,
    summarise,
)

log = logging.getLogger(__name__)

TABLE_FILE = "weight_diff.parquet"
SELECTION_FILE = "weight_diff_selection.parquet"
SELECTED_ROWS_FILE = "weight_diff_selected_rows.parquet"
SUMMARY_FILE = "weight_diff_summary.json"


@dataclass(frozen=True)
class WeightDiffResult:
    """The job's tables as written, the verdict lines and where everything went."""

    table: pl.DataFrame
    selection: pl.DataFrame
    selected_rows: pl.DataFrame
    verdicts: tuple[str, ...]
    files: dict[str, Path] = field(default_factory=dict)
    seconds: float = 0.0


def _unit_bytes(unit: tuple[PairTask, ...]) -> int:
    return sum(t.n_bytes for t in unit)


def _diff_ray(plan: DiffPlan, workers: int) -> pl.DataFrame:
    """One Ray task per layer (plus one for the non-layer tensors), at most `workers` in flight.

    Uses the running Ray if there is one (a sweep's cluster), else starts a local one and stops it after.
    Tasks get file paths, so on a multi-node cluster the checkpoints must lie on storage every node sees.
    Largest units go first so the embedding does not end up alone at the tail.
    """
    import ray

    started = not ray.is_initialized()
    if started:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # no auth token written to the home folder
        ray.init(num_cpus=workers, include_dashboard=False, logging_level=logging.WARNING)
    try:
        remote = ray.remote(num_cpus=1)(diff_pairs)
        queue = sorted(range(len(plan.units)), key=lambda i: -_unit_bytes(plan.units[i]))
        results: list[pl.DataFrame | None] = [None] * len(plan.units)
        pending: dict[ray.ObjectRef, int] = {}
        while queue or pending:
            while queue and len(pending) < workers:
                i = queue.pop(0)
                pending[remote.remote(plan.units[i])] = i
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                results[pending.pop(ref)] = ray.get(ref)
    finally:
        if started:
            ray.shutdown()
    return pl.concat(results)


def run_weight_diff(
    base: str,
    tuned: str,
    out: str | Path,
    target_heads: list[tuple[int, int]] | None = None,
    value_vectors: list[tuple[int, int]] | None = None,
    top_k: int = 50,
    ray_workers: int = 0,
) -> WeightDiffResult:
    """Compare `tuned` with `base` (hub ids or local safetensors folders) in float64 and write OUT/*.

    target_heads: (layer, head) pairs summarised as one group (q rows, q bias, o_proj columns and the
    shared k/v rows they read); value_vectors: (layer, neuron) pairs (down_proj column with up/gate rows);
    top_k: also summarise the k most-turned value vectors (0: skip). ray_workers > 0 spreads layers over
    that many Ray workers; the result is identical to the serial one. Every check (names, shapes, configs,
    selections) runs before any tensor data is read.
    """
    t0 = time.perf_counter()
    plan = plan_diff(base, tuned)
    check_selection(plan.arch, target_heads, value_vectors)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    log.info("weight diff %s vs %s: %d tensors", base, tuned, sum(len(u) for u in plan.units))
    table = _diff_ray(plan, ray_workers) if ray_workers > 0 else diff_checkpoints(plan)
    selected = select_rows(table, plan.arch, target_heads, value_vectors, top_k)
    selection = summarise(table, selected, plan.arch)
    verdicts = tuple(selection["verdict"].to_list())
    files = {
        "table": out / TABLE_FILE,
        "selection": out / SELECTION_FILE,
        "selected_rows": out / SELECTED_ROWS_FILE,
        "summary": out / SUMMARY_FILE,
    }
    table.write_parquet(files["table"])
    selection.write_parquet(files["selection"])
    selected.write_parquet(files["selected_rows"])
    seconds = time.perf_counter() - t0
    summary = {
        "base": {"spec": base, "folder": plan.base.folder, "dtypes": _dtypes(plan, "base")},
        "tuned": {"spec": tuned, "folder": plan.tuned.folder, "dtypes": _dtypes(plan, "tuned")},
        "arch": vars(plan.arch),
        "target_heads": [list(h) for h in target_heads or []],
        "value_vectors": [list(v) for v in value_vectors or []],
        "top_k": top_k,
        "ray_workers": ray_workers,
        "n_rows": table.height,
        "seconds": round(seconds, 3),
        "verdicts": list(verdicts),
        "files": {k: str(v) for k, v in files.items()},
    }
    files["summary"].write_text(json.dumps(summary, indent=2) + "\n")
    for line in verdicts:
        log.info("%s", line)
    return WeightDiffResult(table, selection, selected, verdicts, files, seconds)


def _dtypes(plan: DiffPlan, role: str) -> list[str]:
    checkpoint = plan.base if role == "base" else plan.tuned
    return sorted({t.dtype for t in checkpoint.tensors.values()})


def main_weight_diff(cfg: dict, target_heads: list[tuple[int, int]] | None = None) -> int:
    """`launch.py --weight-diff`: run, log to W&B, print the verdicts; exit status 2 on a refused input.

    Without explicit `target_heads`, the study's 29 heads are the target whenever the model has room
    for them (36 x 16 heads, as Qwen2.5-3B); otherwise only the whole-model groups and the top value
    vectors are summarised.
    """
    from jobs.storage import OutDir
    from jobs.tracking import log_weight_diff
    from verif.design.heads import STUDY_HEADS_TEXT, parse_heads

    wd, out = cfg["weight_diff"], cfg["out"]
    try:
        if target_heads is None:
            arch = open_checkpoint(wd["base"], "base").arch
            heads = parse_heads(STUDY_HEADS_TEXT)
            target_heads = heads if all(la < arch.n_layers and h < arch.n_heads for la, h in heads) else None
        result = run_weight_diff(wd["base"], wd["tuned"], out, target_heads=target_heads, top_k=wd["top_k"])
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(result.verdicts))
    print(f"wrote {', '.join(str(p) for p in result.files.values())} ({result.seconds:.1f} s)")
    run = log_weight_diff(cfg, OutDir(out), result.table, result.selection)
    print(f"W&B run: {run or 'disabled'}")
    return 0
