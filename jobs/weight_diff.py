"""The weight-diff job: compare a fine-tune with its base and write the tables the study's claim is checked on.

Run alone (`launch.py --weight-diff`) or after a sweep whose config sets `weight_diff.base` and
`weight_diff.tuned`. The arithmetic lives in `verif.analysis.weightdiff`; this module plans, spreads
the per-layer work over Ray workers when asked, writes the outputs atomically and logs them. A Ray
worker is sent the checkpoint names (hub id or path) and the tensor names of its layer, never tensors
or the driver's file paths: it opens both checkpoints as its own node sees them (a hub id from that
node's Hugging Face cache, a local path that must exist on that node), so no shared disk is needed,
and a checkpoint a node cannot open is an error naming that node. Only result rows travel back:

  OUT/weight_diff.parquet                one row per head / kv head / neuron vector / whole tensor
  OUT/weight_diff_selection.parquet      one summary row per selection, with its one-line verdict
  OUT/weight_diff_selected_rows.parquet  the rows of the selected heads / value vectors / top-k neurons
  OUT/weight_diff_summary.json           inputs, dtypes, timings and the verdict lines
  OUT/weight_diff_rows.parquet           with `weight_diff.granularity: row`: one row per (layer, head, matrix,
  OUT/weight_diff_rows_summary.parquet   head_dim row) of the chosen heads, and per (layer, head, matrix)

Which heads are summarised as one group is `weight_diff.heads`, one rule for both entry points:
`target` (default) takes `ablation.target_heads` of the same config (no head group when it is unset),
`study` the study's 29 heads of Qwen2.5-3B, `all` every head, `none` no head group, anything else is a
head list. The value vectors summarised as one group are `ablation.target_neurons`, when set. A head
or neuron outside the checkpoint is an error before any tensor is read.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from jobs.config import Config
from jobs.errors import InputError
from jobs.inputs import check_out_dir
from jobs.runtime.executors import here, in_slots, init_ray
from jobs.runtime.resumable import finish, open_unsharded, recover, refuse_changed_config, running
from jobs.runtime.storage import OutDir, write_json_atomic, write_parquet_atomic
from jobs.tracking import log_weight_diff
from verif.analysis.weightdiff import (
    Checkpoint,
    DiffPlan,
    PairTask,
    check_selection,
    diff_checkpoints,
    diff_head_rows,
    diff_pairs,
    open_checkpoint,
    plan_diff,
    select_rows,
    summarise,
    summarise_rows,
)
from verif.design.heads import STUDY_HEADS_TEXT, Head, parse_heads
from verif.design.neurons import parse_neurons
from verif.model.arch import Arch

log = logging.getLogger(__name__)
# Config keys that change no number of a standalone weight diff: allowed to differ on --resume.
WEIGHT_DIFF_NEUTRAL = ("name", "out", "model", "prompts", "scoring", "engine", "shards", "ray", "stats", "wandb",
                       "discover", "generate", "compare")


@dataclass(frozen=True)
class WeightDiffResult:
    """The job's tables as written, the verdict lines and where everything went."""

    table: pl.DataFrame
    selection: pl.DataFrame
    selected_rows: pl.DataFrame
    verdicts: tuple[str, ...]
    files: dict[str, Path] = field(default_factory=dict)
    seconds: float = 0.0


def configured_heads(cfg: Config, arch: Arch) -> list[Head] | None:
    """The heads `weight_diff.heads` names (see the module docstring); None for no head group."""
    rule = cfg.weight_diff.heads
    if rule == "none":
        return None
    if rule == "study":
        return parse_heads(STUDY_HEADS_TEXT)
    if rule == "all":
        return [(layer, head) for layer in range(arch.n_layers) for head in range(arch.n_heads)]
    spec = cfg.ablation.target_heads if rule == "target" else rule
    try:
        heads = parse_heads(spec or [])
    except ValueError as e:
        key = "ablation.target_heads" if rule == "target" else "weight_diff.heads"
        raise ValueError(f"{key}: {e}") from e
    return heads or None


def configured_neurons(cfg: Config) -> list[tuple[int, int]] | None:
    """The value vectors summarised as one group: `ablation.target_neurons`, when set."""
    return parse_neurons(cfg.ablation.target_neurons or []) or None


def check_weight_diff(cfg: Config) -> None:
    """A configured weight diff is checked up front (names, shapes, architectures, heads: headers only)."""
    wd = cfg.weight_diff
    if bool(wd.base) != bool(wd.tuned):
        raise InputError("weight_diff: set both base and tuned, or neither")
    if wd.base:
        try:
            plan = plan_diff(wd.base, wd.tuned)
            heads = configured_heads(cfg, plan.arch)
            check_selection(plan.arch, heads, configured_neurons(cfg))
        except (OSError, ValueError) as e:
            raise InputError(f"weight_diff: {e} (heads from weight_diff.heads={wd.heads!r})") from e
        if wd.granularity == "row" and not heads:
            raise InputError(f"weight_diff.granularity: row compares the rows of chosen heads, and "
                             f"weight_diff.heads={wd.heads!r} chooses none (use target with ablation.target_heads, "
                             "study, all or a head list)")


def _unit_bytes(unit: tuple[PairTask, ...]) -> int:
    return sum(t.n_bytes for t in unit)


class CheckpointNotOnNode(InputError):
    """A Ray worker's node cannot open a checkpoint the driver could (or holds a different one)."""


_OPENED: dict[tuple[str, str], Checkpoint] = {}  # per worker process: headers are read once


def _on_this_node(unit: tuple[PairTask, ...], base: str, tuned: str) -> tuple[PairTask, ...]:
    """The unit's tasks pointed at the files of this node's copies of `base` and `tuned`."""
    for spec, role in ((base, "base"), (tuned, "tuned")):
        if (spec, role) not in _OPENED:
            try:
                _OPENED[spec, role] = open_checkpoint(spec, role)
            except (OSError, ValueError) as e:
                where = here()
                raise CheckpointNotOnNode(
                    f"weight diff: node {where['node_id']} (host {where['host']}) cannot open the {role} "
                    f"checkpoint {spec!r}: {e}. Every Ray node opens the checkpoints itself: a local path must "
                    "exist on every node, a hub id must be reachable from (or cached on) every node"
                ) from None
    b, t = _OPENED[base, "base"].tensors, _OPENED[tuned, "tuned"].tensors
    moved = []
    for task in unit:
        mine = (b.get(task.base_name), t.get(task.tuned_name))
        if any(info is None or info.shape != task.shape for info in mine):
            where = here()
            raise CheckpointNotOnNode(
                f"weight diff: on node {where['node_id']} (host {where['host']}) {task.tensor} is missing or has "
                f"another shape than on the driver: the node holds a different copy of {base!r} or {tuned!r}"
            )
        moved.append(dataclasses.replace(task, base_file=mine[0].file, tuned_file=mine[1].file))
    return tuple(moved)


def _diff_unit_here(unit: tuple[PairTask, ...], base: str, tuned: str) -> tuple[pl.DataFrame, str | None]:
    """Ray task: one unit's rows, read from this node's files, and the node id that computed them."""
    return diff_pairs(_on_this_node(unit, base, tuned)), here()["node_id"]


def _diff_ray(plan: DiffPlan, workers: int) -> tuple[pl.DataFrame, dict[str, int]]:
    """One Ray task per layer (plus one for the non-layer tensors), at most `workers` in flight.

    Uses the running Ray if there is one (a sweep's cluster), else joins RAY_ADDRESS or starts a local one
    and stops it after. Largest units go first so the embedding does not end up alone at the tail.
    Returns the table and how many units each node computed.
    """
    import ray
    from ray.exceptions import RayTaskError

    started = init_ray("", {}, workers)
    try:
        remote = ray.remote(num_cpus=1)(_diff_unit_here)
        order = sorted(range(len(plan.units)), key=lambda i: -_unit_bytes(plan.units[i]))
        results: list[pl.DataFrame | None] = [None] * len(plan.units)
        nodes: Counter = Counter()
        specs = (plan.base.spec, plan.tuned.spec)
        for i, _, ref in in_slots(order, range(workers), lambda i, _slot: remote.remote(plan.units[i], *specs)):
            try:
                results[i], node = ray.get(ref)
            except RayTaskError as e:
                if isinstance(e.cause, CheckpointNotOnNode):
                    raise CheckpointNotOnNode(str(e.cause)) from None
                raise
            nodes[node] += 1
    finally:
        if started:
            ray.shutdown()
    return pl.concat(results), dict(nodes)


def run_weight_diff(
    base: str,
    tuned: str,
    out: str | Path,
    target_heads: list[Head] | None = None,
    value_vectors: list[tuple[int, int]] | None = None,
    top_k: int = 50,
    ray_workers: int = 0,
    rows: bool = False,
) -> WeightDiffResult:
    """Compare `tuned` with `base` (hub ids or local safetensors folders) in float64 and write OUT/*.

    target_heads: (layer, head) pairs summarised as one group (q rows, q bias, o_proj columns and the
    shared k/v rows they read); value_vectors: (layer, neuron) pairs (down_proj column with up/gate rows);
    top_k: also summarise the k most-turned value vectors (0: skip). ray_workers > 0 spreads layers over
    that many Ray workers; the result is identical to the serial one. rows: also the study's per-row view
    of `target_heads`' W_Q, W_K, W_V and W_O (`weight_diff_rows*.parquet`, computed here serially). Every
    check (names, shapes, configs, selections) runs before any tensor data is read.
    """
    t0 = time.perf_counter()
    plan = plan_diff(base, tuned)
    check_selection(plan.arch, target_heads, value_vectors)
    dirs = OutDir(out)
    log.info("weight diff %s vs %s: %d tensors", base, tuned, sum(len(u) for u in plan.units))
    table, nodes = _diff_ray(plan, ray_workers) if ray_workers > 0 else (diff_checkpoints(plan), {})
    selected = select_rows(table, plan.arch, target_heads, value_vectors, top_k)
    selection = summarise(table, selected, plan.arch)
    verdicts = tuple(selection["verdict"].to_list())
    files = {"table": dirs.weight_diff, "selection": dirs.weight_diff_selection,
             "selected_rows": dirs.weight_diff_selected_rows, "summary": dirs.weight_diff_summary}
    write_parquet_atomic(table, files["table"])
    write_parquet_atomic(selection, files["selection"])
    write_parquet_atomic(selected, files["selected_rows"])
    if rows and target_heads:
        per_row = diff_head_rows(plan, target_heads)
        files |= {"rows": dirs.weight_diff_rows, "rows_summary": dirs.weight_diff_rows_summary}
        write_parquet_atomic(per_row, files["rows"])
        write_parquet_atomic(summarise_rows(per_row), files["rows_summary"])
    seconds = time.perf_counter() - t0
    summary = {
        "base": {"spec": base, "folder": plan.base.folder, "dtypes": _dtypes(plan.base)},
        "tuned": {"spec": tuned, "folder": plan.tuned.folder, "dtypes": _dtypes(plan.tuned)},
        "arch": vars(plan.arch),
        "target_heads": [list(h) for h in target_heads or []],
        "value_vectors": [list(v) for v in value_vectors or []],
        "top_k": top_k,
        "ray_workers": ray_workers,
        "units_per_node": nodes,
        "n_rows": table.height,
        "seconds": round(seconds, 3),
        "verdicts": list(verdicts),
        "files": {k: str(v) for k, v in files.items()},
    }
    write_json_atomic(summary, files["summary"])
    for line in verdicts:
        log.info("%s", line)
    return WeightDiffResult(table, selection, selected, verdicts, files, seconds)


def _dtypes(checkpoint) -> list[str]:
    return sorted({t.dtype for t in checkpoint.tensors.values()})


def run_configured_weight_diff(cfg: Config, out: OutDir) -> WeightDiffResult | None:
    """The weight diff a config asks for (`weight_diff.base` and `.tuned`), or None when it asks for none."""
    wd = cfg.weight_diff
    if not (wd.base and wd.tuned):
        return None
    arch = open_checkpoint(wd.base, "base").arch
    return run_weight_diff(wd.base, wd.tuned, out.root, target_heads=configured_heads(cfg, arch),
                           value_vectors=configured_neurons(cfg), top_k=wd.top_k, rows=wd.granularity == "row")


def weight_diff_job(cfg: Config, resume: bool = False, config_file: str | None = None
                    ) -> tuple[WeightDiffResult, str | None]:
    """`launch.py --weight-diff`: check, compare, write and log; returns the result and the W&B run
    (`config_file`: the --config, an input of the run when it is a discovery's target.yaml).

    OUT is new, or on `resume` a weight diff's with the same configuration (computed again: it has no
    shards to keep), as for every job (`jobs.runtime.resumable`)."""
    out = OutDir(cfg.out)
    check_out_dir(out, resume, "weight-diff")
    refuse_changed_config(out, cfg, WEIGHT_DIFF_NEUTRAL)
    check_weight_diff(cfg)
    with running(out, "weight-diff") as job:
        recover(out, job.lock)
        job.manifest = open_unsharded(out, "weight-diff", cfg)
        result = run_configured_weight_diff(cfg, out)
        run = log_weight_diff(cfg, out, result.table, result.selection, config_file)
        finish(out, job.manifest, seconds=result.seconds)
    return result, run
