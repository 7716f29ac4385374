"""The compare job: the mechanisms of two models on the same prompts (`python launch.py --compare`).

`model.path` lists the two models, a then b (typically the base, then R1). The sweep's prompts
(`jobs.prepare.build_prompts`: generated attempts or `prompts.file`, in the configured template) go
through both, and `verif.analysis.compare` compares them at the last position after every layer.
Writes OUT/compare/:

  prompts.parquet           the prompts compared (the sweep's prompts.parquet columns)
  residual.parquet          per prompt and layer: cos, 1 - cos, norms, norm ratio |b| / |a|, max |b - a|,
                            whether the two logit lenses agree on the top token
  lens.parquet              per model, prompt and layer: logit-lens P(Yes), P(No), normalised P(Yes),
                            log-odds, top tokens with their probabilities
  neurons.parquet           per prompt and selected neuron: activation in a, in b, b - a
  summary_*.parquet         means over prompts with bootstrap CIs (`stats.n_boot`, `stats.seed`), for all
                            attempts and for the correct and incorrect ones (column `attempts`)
  figures/compare_<attempts>.png  per-layer curves of both models (`plot_comparison`)
  compare.json              the models, counts, the first layer where they differ, timings
  manifest.json             job (compare), config; `finished` once everything above is written

and one W&B run (job_type compare). It runs in this process, not on Ray workers: every number pairs
the two models' activations on the same prompt, so both must meet in one place; the work is one
forward per prompt and model (no ablation conditions), small next to a sweep; and shipping residual
streams between workers would cost more than computing them. Both models are held at once (a path
given twice is loaded once).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import yaml

from jobs.config import Config
from jobs.errors import InputError
from jobs.inputs import JOBS, check_out_dir
from jobs.prepare import PromptSource, prepare_models, prepare_prompts
from jobs.runtime.resumable import finish, open_unsharded, recover, refuse_changed_config, running
from jobs.runtime.storage import OutDir, package_versions, write_json_atomic, write_parquet_atomic, writing
from jobs.tracking import log_compare
from verif.analysis.compare import SIDES, Comparison, compare_models, plot_comparison, summarize_comparison
from verif.design.neurons import Neuron, format_neurons, parse_neurons, validate_neurons
from verif.model.arch import Arch
from verif.model.loading import LoadedModel, ModelSource, load_model

# Prompt groups summarised separately: every attempt, then by our validator's label.
ATTEMPT_GROUPS = {"all": None, "correct": True, "incorrect": False}
SHAPE_FIELDS = ("n_layers", "hidden_size", "intermediate_size")
# Config keys that change no number of a compare: allowed to differ on --resume.
COMPARE_NEUTRAL = ("name", "out", "engine", "shards", "ray", "wandb", "ablation", "weight_diff", "discover",
                   "generate")


class CompareError(InputError):
    """A compare job that cannot start, with the key or file in the message."""


@dataclass
class ComparePlan:
    cfg: Config
    sources: tuple[ModelSource, ModelSource]
    arch: Arch
    prompts: pl.DataFrame
    prompt_source: PromptSource
    neurons: list[Neuron]
    neurons_from: str  # which key chose the neurons, for the report


def _neurons_in_file(path: str) -> str | list:
    """`ablation.target_neurons` of a YAML file (the target.yaml that --discover writes)."""
    where = f"compare.neurons_from {path!r}"
    if not Path(path).is_file():
        raise CompareError(f"{where}: no such file")
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (yaml.YAMLError, OSError, UnicodeDecodeError) as e:
        raise CompareError(f"{where}: cannot read it as YAML ({type(e).__name__}: {e})") from e
    ablation = data.get("ablation") if isinstance(data, dict) else None
    neurons = ablation.get("target_neurons") if isinstance(ablation, dict) else None
    if not neurons:
        raise CompareError(f"{where}: has no ablation.target_neurons (a --discover target.yaml has them when "
                           "discovery found a neuron set)")
    return neurons


def selected_neurons(cfg: Config, arch: Arch) -> tuple[list[Neuron], str]:
    """The neurons to compare (`compare.neurons` or `compare.neurons_from`), checked against the models."""
    c = cfg.compare
    if c.neurons and c.neurons_from:
        raise CompareError(f"compare.neurons and compare.neurons_from {c.neurons_from!r}: set one of them")
    if c.neurons_from:
        spec, what = _neurons_in_file(c.neurons_from), f"compare.neurons_from {c.neurons_from!r}"
    else:
        spec, what = c.neurons or [], "compare.neurons"
    try:
        return list(validate_neurons(parse_neurons(spec), arch.n_layers, arch.n_neurons, what=what)), what
    except ValueError as e:
        raise CompareError(f"{what}: {e}" if not str(e).startswith(what) else str(e)) from e


def prepare_compare(cfg: Config) -> ComparePlan:
    """Every check that can fail (two comparable models, neurons, prompts and their lengths, tokens:
    `jobs.prepare`) before any weights load."""
    paths, job = cfg.model.paths, JOBS["compare"]
    if len(paths) != 2:
        raise CompareError(f"model.path: --compare needs exactly two models (a, b), got {len(paths)} "
                           f"({', '.join(paths)}); e.g. --set 'model.path=[BASE, TUNED]'")
    models = prepare_models(cfg, job, distinct=False)  # a model against itself is a check
    archs = models.archs
    for f in SHAPE_FIELDS:
        if getattr(archs[0], f) != getattr(archs[1], f):
            raise CompareError(f"model.path: the models differ in {f} ({getattr(archs[0], f)} vs "
                               f"{getattr(archs[1], f)}); layers can only be compared between models of one shape")
    neurons, neurons_from = selected_neurons(cfg, archs[0])
    prepared = prepare_prompts(cfg, job, models)
    a, b = prepared.tokenizers
    if a is not b and a.get_vocab() != b.get_vocab():
        raise CompareError(f"model.path: {paths[0]!r} and {paths[1]!r} have different tokenizers; the same prompts "
                           "must be the same token ids in both")
    return ComparePlan(cfg, tuple(prepared.sources), archs[0], prepared.prompts, prepared.prompt_source, neurons,
                       neurons_from)


def _subset(c: Comparison, prompt_ids: list[int]) -> Comparison:
    keep = pl.col("prompt_id").is_in(prompt_ids)
    return Comparison(c.names, c.residual.filter(keep), c.lens.filter(keep), c.neurons.filter(keep))


def summarize_groups(c: Comparison, prompts: pl.DataFrame, cfg: Config, figures: Path
                     ) -> tuple[dict[str, pl.DataFrame], list[Path]]:
    """Summaries (column `attempts`) and one figure per attempt group that has prompts."""
    parts: dict[str, list[pl.DataFrame]] = {}
    pngs = []
    for group, label in ATTEMPT_GROUPS.items():
        ids = (prompts if label is None else prompts.filter(pl.col("label") == label))["prompt_id"].to_list()
        if not ids:
            continue
        summary = summarize_comparison(_subset(c, ids), cfg.stats.n_boot, cfg.stats.seed)
        for name, frame in summary.items():
            parts.setdefault(name, []).append(frame.select(pl.lit(group).alias("attempts"), pl.all()))
        pngs.append(plot_comparison(summary, c.names, len(ids), figures / f"compare_{group}.png"))
    return {name: pl.concat(frames) for name, frames in parts.items()}, pngs


def per_layer(summaries: dict[str, pl.DataFrame]) -> pl.DataFrame:
    """One row per layer over all attempts: the residual measures and both models' lens probabilities."""
    everything = pl.col("attempts") == "all"
    table = summaries["residual"].filter(everything).select("layer", "cos", "one_minus_cos", "norm_ratio", "top1_same")
    lens = summaries["lens"].filter(everything)
    for side in SIDES:
        table = table.join(lens.filter(pl.col("side") == side).select(
            "layer", *(pl.col(m).alias(f"{m}_{side}") for m in ("p_yes_norm", "p_yes", "p_no"))), on="layer")
    return table.sort("layer")


def first_difference(residual: pl.DataFrame) -> int | None:
    """The first layer after which the residual streams differ on any prompt (None: identical throughout)."""
    return residual.filter(pl.col("max_abs_diff") > 0)["layer"].min()


@dataclass
class CompareReport:
    """What a compare job found and where everything is (printed at the end)."""

    plan: ComparePlan
    folder: Path
    names: tuple[str, str]
    numbers: dict
    summaries: dict[str, pl.DataFrame]
    figures: list[Path]
    seconds: float
    load_seconds: float
    wandb_dir: str | None = None

    def lines(self) -> list[str]:
        x, (a, b) = self.numbers, self.names
        last = x["n_layers"] - 1
        lines = [f"compared a = {a} and b = {b} on {x['n_prompts']} prompts (template {self.plan.prompt_source.template}), "
                 f"{x['n_layers']} layers, in this process: {self.seconds:.1f} s (loading {self.load_seconds:.1f} s)"]
        lines += self.plan.prompt_source.lines()[1:]
        first = x["first_differing_layer"]
        if first is None:
            lines.append("residual streams: identical after every layer (cos exactly 1, no coordinate differs)")
        else:
            same = f"identical up to layer {first - 1}, " if first else ""
            lines.append(f"residual streams: {same}differ from layer {first} on (mean 1 - cos there "
                         f"{x['one_minus_cos_first']:.3g}); after the last layer mean 1 - cos "
                         f"{x['one_minus_cos_last']:.3g}, norm ratio |b|/|a| {x['norm_ratio_last']:.4g}")
        lens = self.summaries["lens"]
        for group in ATTEMPT_GROUPS:
            rows = {r["side"]: r for r in lens.filter((pl.col("attempts") == group) & (pl.col("layer") == last))
                    .iter_rows(named=True)}
            if rows:
                ci = "; ".join(f"{s} {r['p_yes_norm']:.3f} [{r['p_yes_norm_lo']:.3f}, {r['p_yes_norm_hi']:.3f}]"
                               for s, r in rows.items())
                lines.append(f"logit lens after layer {last}, P(Yes) / (P(Yes) + P(No)), {group} attempts: {ci}")
        if self.plan.neurons:
            top = self.summaries["neurons"].filter(pl.col("attempts") == "all").sort(
                pl.col("diff").abs(), descending=True).row(0, named=True)
            lines.append(f"neurons ({self.plan.neurons_from}): {len(self.plan.neurons)} compared; largest mean b - a: "
                         f"L{top['layer']} N{top['neuron']} {top['diff']:+.4g} [{top['diff_lo']:+.4g}, {top['diff_hi']:+.4g}]")
        else:
            lines.append("neurons: none selected (compare.neurons or compare.neurons_from)")
        lines += [f"tables:   {self.folder}/ (residual, lens, neurons, summary_*.parquet; compare.json)",
                  f"figures:  {', '.join(str(p) for p in self.figures)}",
                  f"W&B run:  {self.wandb_dir or 'disabled'}"]
        return lines


def _load_both(plan: ComparePlan) -> tuple[LoadedModel, LoadedModel]:
    m = plan.cfg.model
    a = load_model(plan.sources[0].spec, m.dtype, m.device)
    b = a if plan.sources[1].spec == plan.sources[0].spec else load_model(plan.sources[1].spec, m.dtype, m.device)
    return a, b


def run_compare(cfg: Config, resume: bool = False, config_file: str | None = None) -> CompareReport:
    """Check, load both models, compare them on the sweep's prompts, write OUT/compare/ and log it
    (`config_file`: the --config, an input of the W&B run when it is a discovery's target.yaml).

    OUT/compare is new, or on `resume` a compare's with the same config (it is computed again: a compare
    has no shards to keep); its lock is held throughout, and a stopped or failed run says how to continue
    (`jobs.runtime.resumable.running`), as every job's.
    """
    start = time.perf_counter()
    out = OutDir(cfg.out)
    folder = JOBS["compare"].folder(cfg)
    check_out_dir(folder, resume, "compare")
    refuse_changed_config(folder, cfg, COMPARE_NEUTRAL)
    plan = prepare_compare(cfg)
    with running(folder, "compare", resume_out=out.root) as job:
        recover(folder, job.lock)
        job.manifest = open_unsharded(folder, "compare", cfg)
        a, b = _load_both(plan)
        load_seconds = time.perf_counter() - start
        c = cfg.compare
        try:
            comparison = compare_models(a, b, plan.prompts["prompt"].to_list(), plan.neurons, cfg.scoring.yes,
                                        cfg.scoring.no, c.top_k, c.batch_size)
        except ValueError as e:
            raise CompareError(str(e)) from e
        tables = {"prompts": plan.prompts, "residual": comparison.residual, "lens": comparison.lens}
        if plan.neurons:
            tables["neurons"] = comparison.neurons
        with writing(folder.figures):
            summaries, figures = summarize_groups(comparison, plan.prompts, cfg, folder.figures)
        for name, frame in tables.items():
            write_parquet_atomic(frame, folder.root / f"{name}.parquet")
        for name, frame in summaries.items():
            write_parquet_atomic(frame, folder.root / f"summary_{name}.parquet")
        layers = per_layer(summaries)
        first = first_difference(comparison.residual)
        last = layers.row(-1, named=True)
        numbers = {
            "n_prompts": plan.prompts.height, "n_layers": layers.height, "n_neurons": len(plan.neurons),
            "first_differing_layer": first,
            "one_minus_cos_first": None if first is None else layers.row(first, named=True)["one_minus_cos"],
            "one_minus_cos_last": last["one_minus_cos"], "norm_ratio_last": last["norm_ratio"],
            "p_yes_norm_a_last": last["p_yes_norm_a"], "p_yes_norm_b_last": last["p_yes_norm_b"],
        }
        report = CompareReport(plan, folder.root, comparison.names, numbers, summaries, figures,
                               time.perf_counter() - start, load_seconds)
        write_json_atomic({
            "models": {"a": {"spec": plan.sources[0].spec, "name": a.name}, "b": {"spec": plan.sources[1].spec, "name": b.name}},
            "prompts": {"n": plan.prompts.height, "template": plan.prompt_source.template, "file": plan.prompt_source.file,
                        "too_long": list(plan.prompt_source.too_long)},
            "neurons": {"from": plan.neurons_from, "neurons": format_neurons(plan.neurons)},
            **numbers, "seconds": report.seconds, "load_seconds": load_seconds, "versions": package_versions(),
            "config": cfg.to_dict(),
        }, folder.root / "compare.json")
        report.wandb_dir = log_compare(cfg, out, layers, {**summaries, "per_layer": layers}, figures, numbers,
                                       config_file)
        finish(folder, job.manifest, seconds=time.perf_counter() - start, load_seconds=load_seconds)
        return report
