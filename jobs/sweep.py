"""The sweep driver: validate, plan shards, run them, write results, then hand over to finalize.

`prepare` does every check that can fail (config, model paths, head ranges, the number of distinct
control sets, Yes/No tokens, prompt file, prompt lengths: `jobs.prepare`, as every job) before any
weights are loaded. `run_sweep` checks OUT (`jobs.inputs`) and runs
`prepare` before it creates anything there, then takes OUT's lock (one driver per folder), cleans
up after a driver that was killed there (its local Ray's processes, temp files), cuts the (model x
prompts x conditions) work into shards and runs those the manifest does not hold as verified, writing
each as one parquet file (and its size, rows and SHA-256 into the manifest) the moment it returns, so
an interrupted sweep resumes where it stopped and never trusts a damaged file. SIGINT and SIGTERM stop
it cleanly (`jobs.runtime.resumable.JobInterrupted`). Once every shard is on disk and checked complete, `jobs.finalize`
computes statistics, figures and the W&B run.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
from tqdm.auto import tqdm

from jobs import config as config_mod
from jobs.config import Config
from jobs.cross import CrossPlan, check_cross_models, plan_cross, record_cache, runs_on, stored_cache
from jobs.errors import InputError
from jobs.finalize import Finalized, finalize
from jobs.fit import check_fit, on_gpu
from jobs.inputs import JOBS, check_out_dir
from jobs.partners import pair_partners
from jobs.prepare import PromptSource, prepare_models, prepare_prompts
from jobs.runtime.pool import run_recorded, worker_pool
from jobs.runtime.resumable import finish, recover, reset_untrusted, running
from jobs.runtime.storage import (
    RESULT_SCHEMA,
    OutDir,
    package_versions,
    read_manifest,
    write_json_atomic,
    write_parquet_atomic,
)
from jobs.runtime.worker import Shard, ShardScorer
from jobs.weight_diff import check_weight_diff
from jobs.reference import (
    ReferencePlan,
    check_positional_lengths,
    plan_reference,
    record_means,
    resume_problems,
    stored_means,
)
from verif.design.conditions import (
    CROSS_KINDS,
    PAIRED_KINDS,
    Ablation,
    Condition,
    build_conditions,
    circuit_conditions,
    with_interventions,
)
from verif.model.interventions import ActivationCache, ReferenceMeans
from verif.model.loading import Arch, ModelSource, resolve_dtype

class SweepError(InputError):
    """A sweep that cannot start or continue, with the reason in the message."""


@dataclass
class SweepPlan:
    cfg: Config
    sources: list[ModelSource]
    arch: Arch
    prompts: pl.DataFrame
    prompt_source: PromptSource
    conditions: list[Condition]
    shards: list[Shard]
    fit: list[str] = field(default_factory=list)  # each model's memory estimate (jobs.fit), for --check
    reference: ReferencePlan | None = None  # the mean kinds' first pass (jobs.reference)
    partners: list[int] | None = None  # each prompt's partner, when a condition resamples
    cross: CrossPlan | None = None  # cross-model patching's first pass (jobs.cross)

    @property
    def model_names(self) -> list[str]:
        return [s.name for s in self.sources]


@dataclass
class SweepReport:
    """What a finished sweep did and where everything is (printed at the end, logged to W&B)."""

    out: OutDir
    rows_written: int
    shards_run: int
    shards_skipped: int
    seconds: float
    startup_seconds: float = 0.0
    retried: list[dict] = field(default_factory=list)
    recomputed: dict[str, str] = field(default_factory=dict)
    finalized: Finalized | None = None
    prompt_source: PromptSource | None = None
    cross_cache: dict | None = None  # the manifest's record of the cross source's activation cache

    @property
    def cross_cache_bytes(self) -> int:
        return sum(e["bytes"] for e in (self.cross_cache or {}).values())

    def bookkeeping(self) -> dict[str, float]:
        """The job's own numbers, as W&B summary values."""
        skipped = len(self.prompt_source.too_long) if self.prompt_source else 0
        return {"rows_written": self.rows_written, "shards_run": self.shards_run,
                "shards_skipped": self.shards_skipped, "startup_seconds": self.startup_seconds,
                "n_retried": len(self.retried), "prompts_skipped_too_long": skipped,
                **({"cross_cache_bytes": self.cross_cache_bytes} if self.cross_cache else {})}

    def lines(self) -> list[str]:
        """The end-of-run report: what was written and where to look."""
        out = self.out
        lines = [
            f"rows written: {self.rows_written} in {self.shards_run} shards "
            f"({self.shards_skipped} already on disk), {self.seconds:.1f} s "
            f"(startup {self.startup_seconds:.1f} s)",
        ]
        for r in self.retried:
            lines.append(f"shard {r['shard']} retried: {r['cause']} (node {r['node_id']}, host {r['host']}, "
                         f"pid {r['pid']})")
        if self.recomputed:
            lines.append(f"shards recomputed because their files could not be trusted: {', '.join(self.recomputed)}")
        fin = self.finalized
        lines += self.prompt_source.lines() if self.prompt_source else []
        lines += [
            f"results:  {out.results}/ (one parquet per shard)",
            f"summary:  {out.summary}",
            f"stats:    {out.stats}/",
            f"figures:  {out.figures}/ ({len(fin.figures) if fin else 0} PNG)",
            *([f"means:    {out.root / 'reference'}/ (the mean kinds' reference means)"]
              if (out.root / "reference").is_dir() else []),
            *([f"cache:    {out.cross_cache}/ (the cross source's activations on every prompt: "
               f"{self.cross_cache_bytes / 2**20:.2f} MiB)"] if self.cross_cache else []),
            f"manifest: {out.manifest}",
            f"W&B run:  {(fin and fin.wandb_dir) or 'disabled'}",
        ]
        if fin is not None and fin.cross is not None:
            lines += fin.cross.lines(out)
        if fin is not None:
            lines.append(_headline(fin.summary))
        return lines


def plan_shards(cfg: Config, names: list[str], n_prompts: int, conditions: list[Condition],
                cross: CrossPlan | None = None) -> list[Shard]:
    """Cut (model x prompts x conditions) into shards with stable ids (the cross source scores no cross
    condition)."""
    per_p = cfg.shards.prompts_per_shard
    shards = []
    for m, name in enumerate(names):
        ids = [c.id for c in conditions if runs_on(cross, name, c)]
        per_c = cfg.shards.conditions_per_shard or len(ids)
        for a in range(0, n_prompts, per_p):
            for g, b in enumerate(range(0, len(ids), per_c)):
                shards.append(
                    Shard(f"m{m}-p{a:06d}-c{g:03d}", name, tuple(range(a, min(a + per_p, n_prompts))), tuple(ids[b:b + per_c]))
                )
    return shards


def prepare(cfg: Config) -> SweepPlan:
    """Every check that can fail, before any weights load (`jobs.prepare`); returns the full plan."""
    job = JOBS["sweep"]
    models = prepare_models(cfg, job)
    ab, archs = cfg.ablation, models.archs
    source = check_cross_models(cfg, models.sources, archs)
    shapes = {(a.n_layers, a.n_heads) + ((a.n_neurons,) if ab.target_neurons else ()) for a in archs}
    if len(shapes) > 1:
        what = "layers x heads x neurons" if ab.target_neurons else "layers x heads"
        raise SweepError(f"model.path: models differ in {what} {sorted(shapes)}; one target cannot fit all")
    arch = archs[0]
    try:
        base = build_conditions(arch.n_layers, arch.n_heads, Ablation(models.heads, models.neurons),
                                ab.random_controls, ab.seed, ab.exclude_target, ab.match_layers, ab.sweeps,
                                n_neurons=arch.n_neurons)
    except ValueError as e:
        raise SweepError(f"ablation.random_controls: {e} (ablation.match_layers: {str(ab.match_layers).lower()}, "
                         f"ablation.exclude_target: {str(ab.exclude_target).lower()})") from e
    conditions = with_interventions(base, ab.kinds)
    if ab.circuit_kinds:
        try:
            conditions += circuit_conditions(base, ab.circuit_kinds, arch.n_layers, arch.n_heads, arch.n_neurons)
        except ValueError as e:
            raise SweepError(str(e)) from e
    prepared = prepare_prompts(cfg, job, models)
    prompts = prepared.prompts
    reference = plan_reference(cfg, prompts, conditions)
    check_positional_lengths(reference, prompts["prompt"].to_list(), dict(zip(prepared.names, prepared.tokenizers)))
    partners = pair_partners(prompts, conditions)
    dtype = resolve_dtype(cfg.model.dtype, "cuda" if on_gpu(cfg) else "cpu")
    cross = plan_cross(cfg, source, prepared.names, prepared.tokenizers, prompts,
                       [f"prompt {i}" for i in prompts["prompt_id"]], conditions, arch.head_dim, dtype)
    check_weight_diff(cfg)
    fit = check_fit(cfg, prepared.sources)
    if cross is not None:
        fit.append(cross.line(prompts.height))
    shards = plan_shards(cfg, prepared.names, prompts.height, conditions, cross)
    return SweepPlan(cfg, prepared.sources, arch, prompts, prepared.prompt_source, conditions, shards, fit, reference,
                     partners, cross)


def _conditions_frame(conditions: list[Condition]) -> pl.DataFrame:
    return pl.DataFrame(
        [c.row() for c in conditions],
        schema={"condition": pl.Utf8, "kind": pl.Utf8, "intervention": pl.Utf8, "heads": pl.Utf8, "n_heads": pl.Int64,
                "neurons": pl.Utf8, "n_neurons": pl.Int64, "layer": pl.Int64, "head": pl.Int64, "kept": pl.Utf8},
    )


def _open_out(plan: SweepPlan, out: OutDir) -> tuple[dict, dict[str, str]]:
    """Create the folder, or on --resume check its config and which shard files can be trusted.

    Returns the manifest (shards whose files fail verification set back to pending) and {shard: problem}.
    """
    cfg = plan.cfg
    if out.manifest.exists():
        old = read_manifest(out)
        diffs = config_mod.config_differences(old["config"], cfg)
        old_digest = old.get("prompts", {}).get("template_digest")
        if old_digest != plan.prompt_source.template_digest:
            diffs.append(f"prompts.template: the template text changed ({old_digest} -> "
                         f"{plan.prompt_source.template_digest})")
        diffs += resume_problems(old, plan.reference)
        if diffs:
            raise SweepError(f"--resume: the config differs from the one {out.root} was started with: " + "; ".join(diffs))
        return old, reset_untrusted(out, old, ("model", "prompts", "conditions"))
    out.root.mkdir(parents=True, exist_ok=True)
    write_parquet_atomic(plan.prompts, out.prompts)
    write_parquet_atomic(_conditions_frame(plan.conditions), out.conditions)
    manifest = {
        "job": "sweep",
        "config": cfg.to_dict(),
        "config_hash": config_mod.config_hash(cfg),
        "versions": package_versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "prompts": dataclasses.asdict(plan.prompt_source),
        "shards": {s.id: {"status": "pending", "model": s.model, "prompts": len(s.prompt_ids),
                          "conditions": len(s.conditions)} for s in plan.shards},
    }
    write_json_atomic(manifest, out.manifest)
    return manifest, {}


@dataclass
class ShardsRun:
    """What `run_shards` did."""

    rows: int = 0
    shards: int = 0
    startup_seconds: float = 0.0
    retried: list[dict] = field(default_factory=list)


def run_shards(plan: SweepPlan, out: OutDir, manifest: dict) -> ShardsRun:
    """Run every shard the manifest does not hold as done; each is written and recorded as it returns. With
    cross the source model goes first: its workers write the activation cache the others' shards read."""
    cfg = plan.cfg
    pending = [s for s in plan.shards if manifest["shards"][s.id]["status"] != "done"]
    done = ShardsRun()
    if not pending:
        return done
    prompts_text = plan.prompts["prompt"].to_list()
    ablation_of = {c.id: c.ablation for c in plan.conditions}
    paired = {c.id for c in plan.conditions if c.intervention in PAIRED_KINDS}
    crossed = {c.id for c in plan.conditions if c.intervention in CROSS_KINDS}
    needs_cache = any(crossed & set(s.conditions) for s in pending)
    order = plan.model_names if plan.cross is None else \
        [plan.cross.source] + [m for m in plan.model_names if m != plan.cross.source]
    cache: ActivationCache | None = None
    bar = tqdm(total=len(pending), desc="shards", unit="shard", dynamic_ncols=True)
    try:
        with worker_pool(cfg.ray, out) as pool:
            for model in order:
                todo = [s for s in pending if s.model == model]
                source_pass = needs_cache and model == plan.cross.source
                if source_pass:
                    cache = stored_cache(plan.cross, out, manifest, plan.prompts.height)
                    source_pass = cache is None
                if not todo and not source_pass:
                    continue
                source = plan.sources[plan.model_names.index(model)]
                bar.set_description(f"loading {model}")
                spec = pool.spec(model=source.spec, dtype=cfg.model.dtype, device=cfg.model.device,
                                 yes=tuple(cfg.scoring.yes), no=tuple(cfg.scoring.no), engine=cfg.engine,
                                 check_prompt=prompts_text[0], max_prompt_tokens=cfg.prompts.max_tokens)
                executor = pool.executor(ShardScorer, "score", spec, cfg.shards.max_attempts)
                manifest.setdefault("workers", []).extend({"model": model, **w} for w in executor.workers)
                if source_pass:
                    bar.set_description(f"cross source {model}")
                    cache = source_cache(plan, out, manifest, executor)
                means = None
                if plan.reference is not None and todo:
                    bar.set_description(f"reference means {model}")
                    means = pool.share(reference_means(plan, out, manifest, executor, model))
                bar.set_description(f"scoring {model}")
                t_rows, rows_before = time.perf_counter(), done.rows

                def payload(s: Shard, name=model, means=means):
                    partners = crossing = None
                    if paired & set(s.conditions):
                        partners = [prompts_text[plan.partners[i]] for i in s.prompt_ids]
                    if crossed & set(s.conditions):
                        crossing = cache.select(s.prompt_ids)
                    return ([prompts_text[i] for i in s.prompt_ids], [ablation_of[c] for c in s.conditions], name,
                            means, partners, crossing)

                def progress(frame: pl.DataFrame, t0=t_rows, before=rows_before) -> None:
                    done.rows += frame.height
                    bar.update(1)
                    bar.set_postfix(rows_per_s=f"{(done.rows - before) / max(time.perf_counter() - t0, 1e-9):.1f}")

                ran = run_recorded(executor, todo, payload, out, manifest,
                                   lambda cols: pl.DataFrame(cols, schema=RESULT_SCHEMA), progress)
                done.shards += ran.shards
                done.retried += ran.retried
            done.startup_seconds = pool.startup_seconds
    finally:
        bar.close()
    return done


def source_cache(plan: SweepPlan, out: OutDir, manifest: dict, executor) -> ActivationCache:
    """The cross source's activations on every prompt, from a first pass of source shards on its workers
    (entries put in prompt order here), written and recorded in OUT."""
    cross = plan.cross
    texts = plan.prompts["prompt"].to_list()
    entries: list[dict] = [{} for _ in texts]
    shards = cross.shards(plan.model_names.index(cross.source), len(texts))
    for shard, part, _ in executor.run(shards, lambda s: ([texts[i] for i in s.prompt_ids], cross.sites)):
        for i, entry in zip(shard.prompt_ids, part.entries):
            entries[i] = entry
    cache = ActivationCache(cross.sites, entries)
    record_cache(cache, cross, out, manifest)
    write_json_atomic(manifest, out.manifest)
    return cache


def reference_means(plan: SweepPlan, out: OutDir, manifest: dict, executor, model: str) -> ReferenceMeans:
    """The model's reference means: from OUT when recorded and verified, else from a first pass of
    reference shards on the model's workers (sums added here, divided once, written and recorded)."""
    ref = plan.reference
    stored = stored_means(ref, out, manifest, model)
    if stored is not None:
        return stored
    shards = ref.shards(plan.model_names.index(model), model)
    texts = list(ref.texts)
    total = None
    for _, sums, _ in executor.run(shards, lambda s: ([texts[i] for i in s.prompt_ids], ref.sites, ref.positional)):
        total = sums if total is None else total + sums
    means = record_means(total, ref, out, manifest, model)
    write_json_atomic(manifest, out.manifest)
    return means


def check_complete(results: pl.DataFrame, plan: SweepPlan) -> None:
    """Every (model, prompt, condition) exactly once, or the sweep is not done."""
    expected = plan.prompts.height * sum(runs_on(plan.cross, m, c) for m in plan.model_names for c in plan.conditions)
    dupes = results.group_by(["model", "prompt_id", "condition"]).len().filter(pl.col("len") > 1).height
    if results.height != expected or dupes:
        raise SweepError(f"results hold {results.height} rows ({dupes} duplicated keys); expected {expected}")


def run_sweep(cfg: Config, resume: bool = False, config_file: str | None = None) -> SweepReport:
    """The whole job: plan, score, check completeness, then finalize. Returns where everything is.

    `config_file` is the --config the config came from: kept in the manifest (as `config_file`) so the
    W&B run, and a later --relog, name the discovery behind a target.yaml as its input (`jobs.lineage`).

    OUT and every input are checked before anything is created there (`jobs.inputs.check_out_dir`,
    `prepare`; a second driver into the same folder is refused at once); then OUT's lock is held
    throughout. SIGINT and SIGTERM stop it cleanly, and shards that fail past their retries end it with one line
    (`jobs.runtime.resumable.running`).
    """
    start = time.perf_counter()
    out = OutDir(cfg.out)
    check_out_dir(out, resume, "sweep")
    plan = prepare(cfg)
    with running(out, "sweep") as job:
        job.total = len(plan.shards)
        recover(out, job.lock)
        job.manifest, recomputed = _open_out(plan, out)
        manifest = job.manifest
        if config_file:
            manifest["config_file"] = str(Path(config_file).resolve())
        skipped = job.total - sum(e["status"] != "done" for e in manifest["shards"].values())
        ran = run_shards(plan, out, manifest)
        results = out.read_results([s.id for s in plan.shards])
        check_complete(results, plan)
        report = SweepReport(out, ran.rows, ran.shards, skipped, time.perf_counter() - start,
                             ran.startup_seconds, ran.retried, recomputed, prompt_source=plan.prompt_source,
                             cross_cache=manifest.get("cross"))
        report.finalized = finalize(cfg, out, results, plan.arch, report.bookkeeping(), manifest.get("config_file"),
                                    plan.model_names, plan.cross and plan.cross.source)
        report.seconds = time.perf_counter() - start
        finish(out, manifest, seconds=report.seconds, startup_seconds=ran.startup_seconds, rows_written=ran.rows)
        return report


def _pair(row: dict) -> str:
    def fmt(v):
        return "n/a" if v is None else f"{v:.3f}"

    return f"correct {fmt(row['mean_p_yes_norm_correct'])} / incorrect {fmt(row['mean_p_yes_norm_incorrect'])}"


def _headline(summary: pl.DataFrame) -> str:
    """One line per model: baseline vs target mean p_yes_norm on correct / incorrect attempts."""
    parts = []
    for model in summary["model"].unique(maintain_order=True).to_list():
        rows = {r["condition"]: r for r in summary.filter(pl.col("model") == model).iter_rows(named=True)}
        base, tgt = rows.get("baseline"), rows.get("target")
        text = f"{model}: mean P(yes) baseline {_pair(base)}"
        if tgt:
            text += f"; target {_pair(tgt)}"
        parts.append(text)
    return "\n".join(parts)
