"""The discovery job (`python launch.py --discover`): score every head and MLP neuron, then test what
the top of each ranking buys against random sets.

Same config file, prompts, models, Yes/No variants and checks of them (`jobs.prepare`), Ray workers and
folder conventions as a sweep; its folder is OUT/discovery (so a sweep and a discovery with one config
can share OUT). The prompts are split first (`discover.holdout`, `verif.analysis.discovery.holdout`):
everything that ranks or chooses reads the selection half only, and the held-out half scores the sets
that were chosen. Per model, in four steps, each cut into shards of prompts that workers run and the
driver adds up (every score is a mean over prompts: shards return sums, `PromptSums`):

1. scan (the selection half): attribution-patching sums for every head and neuron and the attention
   to the target (over the prompts the objective M averages, `discover.prompts`), and the
   last-position residuals; the driver then fits the probes and picks the heads to score exactly;
2. neurons (one shard): the value vectors' Yes-minus-No logits and their cosine with the probes;
3. exact (the selection half's objective prompts): one condition per screened head, through the
   sweep's engine;
4. sets (the objective prompts of both halves): every ranking's top-k sets and the random sets of
   each size, judged on each half apart.

As in a sweep, each shard's file is written atomically as it lands and recorded in the manifest
(rows, bytes, SHA-256), OUT holds one driver at a time, SIGINT/SIGTERM stop cleanly, and `--resume`
reuses the files that verify. A shard file also keeps a digest of the inputs it was computed from
(its prompts, the probes, the ablation sets): a later step whose inputs moved (a recomputed scan that
changed the screen) is recomputed, and nothing else.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl
from tqdm.auto import tqdm

from jobs import config as config_mod
from jobs.config import Config
from jobs.discover.outputs import Findings, Written, follow_up_prompts, write_outputs
from jobs.discover.worker import DiscoveryShard, DiscoveryWorker, ScanPrompts
from jobs.errors import InputError
from jobs.inputs import JOBS, check_out_dir, read_reference_file
from jobs.partners import pair_partners
from jobs.runtime.pool import WorkerPool, run_recorded, worker_pool
from jobs.runtime.resumable import finish, recover, reset_untrusted, running
from jobs.runtime.storage import OutDir, package_versions, read_manifest, write_json_atomic, write_parquet_atomic
from jobs.prepare import PromptSource, prepare_models, prepare_prompts
from jobs.tracking import log_discovery
from verif.analysis.discovery.attention import target_spans
from verif.analysis.discovery.exact import heads_to_screen, single_head_sets
from verif.analysis.discovery.holdout import holdout_mask
from verif.analysis.discovery.metric import choose_prompts
from verif.analysis.discovery.probes import Probe, fit_probes
from verif.analysis.discovery.sets import check_controls, plan_sets, sets_table
from verif.analysis.discovery.sums import PromptSums, combine
from verif.analysis.discovery.tables import exact_map
from verif.design.conditions import Ablation
from verif.model.interventions import ReferenceMeans, all_components
from verif.model.loading import Arch, ModelSource

# Keys that change no number of a discovery: allowed to differ on --resume (the target set, the
# weight diff and the sweep's condition groups are no input of it).
DISCOVERY_NEUTRAL = ("name", "out", "engine", "shards.max_attempts", "shards.conditions_per_shard", "ray", "wandb",
                     "stats", "ablation", "weight_diff")
SHARD_SCHEMA = {
    "model": pl.Utf8, "key": pl.Utf8, "prompt_id": pl.Int64, "n_prompts": pl.Int64, "shape": pl.List(pl.Int64),
    "values": pl.List(pl.Float64), "inputs": pl.Utf8,
}  # fmt: skip


class DiscoveryError(InputError):
    """A discovery that cannot start or continue, with the reason in the message."""


# --------------------------------------------------------------------------------------------
# planning
# --------------------------------------------------------------------------------------------


@dataclass
class DiscoveryPlan:
    cfg: Config
    sources: list[ModelSource]
    archs: list[Arch]
    # the build_prompts frame + heldout (discover.holdout's split), in_objective (the selection half's
    # prompts M averages) and in_heldout_objective (the held-out half's)
    prompts: pl.DataFrame
    prompt_source: PromptSource
    shards: list[DiscoveryShard]
    tokenizers: dict  # model name -> its tokenizer (a follow-up's pairs must match lengths in each)
    reference: list[str] | None = None  # discover.intervention mean: the prompts its means average
    partners: list[int] | None = None  # discover.intervention resample: each prompt's partner (row)

    @property
    def model_names(self) -> list[str]:
        return [s.name for s in self.sources]

    def of(self, model: str, phase: str, step: str = "") -> list[DiscoveryShard]:
        return [s for s in self.shards if s.model == model and s.phase == phase and s.step == step]


def slices(ids: Sequence[int], per_shard: int) -> list[tuple[int, ...]]:
    """`ids` cut into consecutive slices of at most `per_shard`, as even as possible (so that workers
    finish together: 12 prompts at 8 per shard are 6 + 6, not 8 + 4)."""
    n = len(ids)
    count = -(-n // per_shard)
    out, start = [], 0
    for i in range(count):
        size = n // count + (i < n % count)
        out.append(tuple(ids[start:start + size]))
        start += size
    return out


def plan_shards(names: list[str], selection: list[int], objective: list[int], heldout_objective: list[int],
                per_shard: int, n_reference: int = 0, exact_prompts: list[int] | None = None) -> list[DiscoveryShard]:
    """Every shard of every model, with stable ids (named by their first prompt id).

    Scan shards are slices of `shards.prompts_per_shard` prompts of the selection half. Exact and
    sets shards hold one prompt each: one prompt already scores every screened head or every set (tens
    to hundreds of rows, a full batch), and single prompts let any number of workers share the
    costliest steps evenly. Exact shards score the selection half's objective prompts (with resample,
    `exact_prompts`: every prompt of the selection half's pairs, so that noising and denoising are both
    measured), sets shards those of both halves. With `discover.intervention: mean` the reference prompts
    (`n_reference`, indexed in their own list) come first, in slices.
    """
    shards = []
    for m, name in enumerate(names):
        shards += [DiscoveryShard(f"m{m}-reference-p{s[0]:06d}", name, "reference", s)
                   for s in (slices(list(range(n_reference)), per_shard) if n_reference else [])]
        shards += [DiscoveryShard(f"m{m}-scan-p{s[0]:06d}", name, "scan", s) for s in slices(selection, per_shard)]
        shards.append(DiscoveryShard(f"m{m}-neurons", name, "neurons"))
        exact = objective if exact_prompts is None else exact_prompts
        for step, ids in (("exact", exact), ("sets", sorted(objective + heldout_objective))):
            shards += [DiscoveryShard(f"m{m}-{step}-p{i:06d}", name, "deltas", (i,), step) for i in ids]
    return shards


def check_bounds(cfg: Config, sources: Sequence[ModelSource], archs: Sequence[Arch]) -> None:
    """Enough distinct random sets of every size for `discover.controls`, in each model (heads and neurons)."""
    d = cfg.discover
    for src, arch in zip(sources, archs):
        n_heads = arch.n_layers * arch.n_heads
        try:
            check_controls(d.controls, d.k, n_heads, "head", scored=() if d.exact == "all" else (d.exact,))
            check_controls(d.controls, d.k, arch.n_layers * arch.n_neurons, "neuron")
        except ValueError as e:
            raise DiscoveryError(f"{e} (model {src.spec})") from e


def prepare(cfg: Config) -> DiscoveryPlan:
    """Every check that can fail, before any weights load (`jobs.prepare`); returns the plan."""
    d, job = cfg.discover, JOBS["discover"]
    models = prepare_models(cfg, job)
    check_bounds(cfg, models.sources, models.archs)
    prepared = prepare_prompts(cfg, job, models)
    prompts, names = prepared.prompts, prepared.names
    labels = prompts["label"].to_list()
    try:
        held = holdout_mask(labels, d.holdout, d.seed, prompts["pair_id"].to_list())
        chosen = choose_prompts(labels, d.prompts)
    except ValueError as e:
        raise DiscoveryError(str(e)) from e
    objective = [i for i in chosen if not held[i]][:d.max_prompts]
    heldout_objective = [i for i in chosen if held[i]][:d.max_prompts]
    if not objective:
        raise DiscoveryError(f"discover.holdout: {d.holdout} holds out all {len(chosen)} {d.prompts} prompts of "
                             f"{len(labels)}, leaving the selection half none to rank on; lower it or add prompts")
    for row in prompts[objective].iter_rows(named=True):
        if not target_spans(row["prompt"], row["target"]):
            raise DiscoveryError(f"prompt {row['prompt_id']}: no copy of its target {row['target']} in the prompt, "
                                 "so attn_to_target has nothing to read; check prompts.template")
    ids = prompts["prompt_id"].to_list()
    prompts = prompts.with_columns(pl.Series("heldout", held), pl.Series("in_objective", [i in set(objective) for i in range(len(ids))]),
                                   pl.Series("in_heldout_objective", [i in set(heldout_objective) for i in range(len(ids))]))
    selection = [ids[i] for i in range(len(ids)) if not held[i]]
    reference = partners = None
    if d.intervention == "mean":  # as a sweep's: every prompt (the means read no label, so no half is chosen on)
        reference = prompts["prompt"].to_list() if cfg.ablation.reference == "prompts" else read_reference_file(cfg)
    if d.intervention == "resample":
        partners = pair_partners(prompts, [], paired=True, key="discover.intervention")
    shards = plan_shards(names, selection, [ids[i] for i in objective], [ids[i] for i in heldout_objective],
                         cfg.shards.prompts_per_shard, len(reference or ()), selection if partners is not None else None)
    tokenizers = dict(zip(names, prepared.tokenizers))
    return DiscoveryPlan(cfg, prepared.sources, prepared.archs, prompts, prepared.prompt_source, shards, tokenizers,
                         reference, partners)


# --------------------------------------------------------------------------------------------
# shard files: named float64 arrays with the digest of the inputs they came from
# --------------------------------------------------------------------------------------------


def digest(*parts: Any) -> str:
    """SHA-256 (first 16 hex digits) of JSON-able parts and arrays, in order."""
    h = hashlib.sha256()
    for part in parts:
        h.update(np.ascontiguousarray(part).tobytes() if isinstance(part, np.ndarray)
                 else json.dumps(part, sort_keys=True).encode())
    return h.hexdigest()[:16]


def shard_frame(result: dict, model: str, inputs: str) -> pl.DataFrame:
    """A worker's result as rows: one per summed array (prompt_id null), one per prompt's residuals."""
    rows = [(key, None, np.asarray(a, dtype=np.float64)) for key, a in result["arrays"].items()]
    rows += [("residuals", int(pid), np.asarray(a, dtype=np.float64)) for pid, a in result.get("residuals", {}).items()]
    return pl.DataFrame(
        {"model": [model] * len(rows), "key": [k for k, _, _ in rows], "prompt_id": [p for _, p, _ in rows],
         "n_prompts": [result["n_prompts"]] * len(rows), "shape": [list(a.shape) for _, _, a in rows],
         "values": [a.ravel() for _, _, a in rows], "inputs": [inputs] * len(rows)},
        schema=SHARD_SCHEMA,
    )


def frame_sums(frame: pl.DataFrame) -> PromptSums:
    """The summed arrays of a shard frame (rows without a prompt id)."""
    sums = frame.filter(pl.col("prompt_id").is_null())
    arrays = {r["key"]: np.asarray(r["values"], dtype=np.float64).reshape(r["shape"]) for r in sums.iter_rows(named=True)}
    return PromptSums(arrays, int(sums["n_prompts"][0]))


def frame_residuals(frames: Sequence[pl.DataFrame], prompt_ids: Sequence[int]) -> np.ndarray:
    """`[n_prompts, L, hidden]` residuals of these prompts, gathered from the scan shards."""
    rows = pl.concat([f.filter(pl.col("key") == "residuals") for f in frames])
    by_id = {r["prompt_id"]: np.asarray(r["values"]).reshape(r["shape"]) for r in rows.iter_rows(named=True)}
    return np.stack([by_id[p] for p in prompt_ids])


# --------------------------------------------------------------------------------------------
# running shards
# --------------------------------------------------------------------------------------------


class _OnePhase:
    """One step's view of a model's executor for `run_recorded`, which closes what it is given and reads
    its retries: the executor stays open for the next step, and only this step's retries are reported."""

    def __init__(self, executor):
        self._executor, self._seen = executor, len(executor.retried)

    def run(self, shards, payload):
        return self._executor.run(shards, payload)

    @property
    def retried(self) -> list[dict]:
        return self._executor.retried[self._seen:]

    def close(self) -> None:
        """The model's steps share the executor; `_ModelShards.close` closes it."""


@dataclass
class ShardCounts:
    """Shards run and reused, retried after a lost worker, recomputed; seconds per model and step."""

    run: int = 0
    reused: int = 0
    retried: list[dict] = field(default_factory=list)
    recomputed: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, dict[str, float]] = field(default_factory=dict)


class _ModelShards:
    """One model's shards, step after step, on one set of workers (started when a shard first needs them)."""

    def __init__(self, plan: DiscoveryPlan, m: int, pool: WorkerPool, out: OutDir, manifest: dict, bar: tqdm,
                 counts: ShardCounts):
        self.plan, self.m, self.pool, self.out, self.manifest, self.bar, self.counts = plan, m, pool, out, manifest, bar, counts
        self.name = plan.model_names[m]
        self.executor = None

    def _executor(self):
        if self.executor is None:
            cfg = self.plan.cfg
            self.bar.set_description(f"loading {self.name}")
            spec = self.pool.spec(model=self.plan.sources[self.m].spec, dtype=cfg.model.dtype, device=cfg.model.device,
                                  yes=tuple(cfg.scoring.yes), no=tuple(cfg.scoring.no), engine=cfg.engine,
                                  check_prompt=self.plan.prompts["prompt"][0], max_prompt_tokens=cfg.prompts.max_tokens)
            self.executor = self.pool.executor(DiscoveryWorker, "run", spec, cfg.shards.max_attempts)
            self.manifest.setdefault("workers", []).extend({"model": self.name, **w} for w in self.executor.workers)
        return self.executor

    def _needs_run(self, shard: DiscoveryShard, inputs: str) -> bool:
        entry = self.manifest["shards"][shard.id]
        if entry["status"] != "done":
            return True
        stored = pl.read_parquet(self.out.shard(shard.id), columns=["inputs"])["inputs"][0]
        if stored == inputs:
            return False
        problem = "computed from other inputs than the plan now holds (an earlier step was recomputed)"
        print(f"shard {shard.id}: {problem}; it will be recomputed", file=sys.stderr)
        self.counts.recomputed[shard.id] = problem
        entry["status"] = "pending"
        self.bar.total += 1
        return True

    def run(self, shards: list[DiscoveryShard], inputs: Callable[[DiscoveryShard], Any],
            inputs_digest: Callable[[DiscoveryShard], str], step: str) -> list[pl.DataFrame]:
        """Run the shards whose files are missing or were computed from other inputs; return every
        shard's frame, read back from disk (a resumed and an uninterrupted run read the same bytes)."""
        digests = {s.id: inputs_digest(s) for s in shards}
        todo = [s for s in shards if self._needs_run(s, digests[s.id])]
        self.counts.reused += len(shards) - len(todo)
        if todo:
            executor = self._executor()
            self.bar.set_description(f"{step} {self.name}")
            t = time.perf_counter()
            ran = run_recorded(_OnePhase(executor), todo, lambda s: (inputs(s),), self.out, self.manifest,
                               lambda r: shard_frame(r, self.name, digests[r["shard"]]), lambda _: self.bar.update(1))
            self.counts.seconds.setdefault(self.name, {})[step] = time.perf_counter() - t
            self.counts.run += ran.shards
            self.counts.retried += ran.retried
        return [pl.read_parquet(self.out.shard(s.id)) for s in shards]

    def close(self) -> None:
        if self.executor is not None:
            self.executor.close()
            self.executor = None


def reference_means(sums: PromptSums, arch: Arch) -> ReferenceMeans:
    """The reference step's added sums divided once: every head's and neuron's mean activation."""
    sites = all_components(arch.n_layers, arch.n_heads, arch.n_neurons)
    n_tokens = int(sums.sums["n_tokens"])
    mean = {(site, int(layer)): v / n_tokens for key, v in sums.sums.items() if key != "n_tokens"
            for site, layer in [key.split("/")]}
    return ReferenceMeans(sites, mean, None, None, sums.n_prompts, n_tokens)


def _fit(residuals: np.ndarray, labels: list[bool], seed: int) -> tuple[list[Probe], str | None]:
    """The probes, or none and why (fewer than 2 correct and 2 incorrect attempts)."""
    try:
        return fit_probes(residuals, labels, seed=seed), None
    except ValueError as e:
        return [], f"no probes fitted: {e}"


def discover_model(plan: DiscoveryPlan, shards: _ModelShards) -> Findings:
    """The four steps for one model (module docstring); returns its tables."""
    d = plan.cfg.discover
    name = shards.name
    prompt_ids_all = plan.prompts["prompt_id"].to_list()
    texts = dict(zip(plan.prompts["prompt_id"].to_list(), plan.prompts["prompt"].to_list()))
    targets = dict(zip(plan.prompts["prompt_id"].to_list(), plan.prompts["target"].to_list()))
    in_objective = dict(zip(plan.prompts["prompt_id"].to_list(), plan.prompts["in_objective"].to_list()))
    in_heldout_objective = dict(zip(prompt_ids_all, plan.prompts["in_heldout_objective"].to_list()))

    kind = d.intervention
    means = None
    if plan.reference is not None:
        ref = plan.reference
        frames = shards.run(plan.of(name, "reference"), lambda s: ([ref[i] for i in s.prompt_ids],),
                            lambda s: digest([ref[i] for i in s.prompt_ids]), "reference")
        means = reference_means(combine(frame_sums(f) for f in frames), plan.archs[shards.m])
    partner_text = None if plan.partners is None else {pid: texts[prompt_ids_all[p]] for pid, p in
                                                        zip(prompt_ids_all, plan.partners)}

    def scan_inputs(s: DiscoveryShard) -> ScanPrompts:
        p = s.prompt_ids
        partners = None if partner_text is None else tuple(partner_text[i] for i in p)
        return ScanPrompts(tuple(texts[i] for i in p), tuple(targets[i] for i in p), tuple(in_objective[i] for i in p),
                           d.batch_size, partners, means)

    scan_frames = shards.run(plan.of(name, "scan"), scan_inputs, lambda s: digest(scan_inputs(s).key()), "scan")
    scan = combine(frame_sums(f) for f in scan_frames)
    selection = plan.prompts.filter(~pl.col("heldout"))
    probes, probe_note = _fit(frame_residuals(scan_frames, selection["prompt_id"].to_list()),
                              selection["label"].to_list(), d.seed)

    probes_digest = digest([[p.layer, p.separates] for p in probes], *[p.weight for p in probes])
    (neuron_frame,) = shards.run(plan.of(name, "neurons"), lambda s: probes, lambda s: probes_digest, "neurons")
    neuron_scores = frame_sums(neuron_frame).sums

    means_digest = None if means is None else means.digest()

    def deltas(step: str, sets: list[Ablation]) -> dict[int, PromptSums]:
        """Each prompt's sums of the step (one prompt per shard), by prompt id."""
        described = [a.describe() for a in sets]
        todo = plan.of(name, "deltas", step)

        def inputs(s: DiscoveryShard):
            partners = None if partner_text is None else [partner_text[i] for i in s.prompt_ids]
            return [texts[i] for i in s.prompt_ids], sets, means, partners

        frames = shards.run(todo, inputs, lambda s: digest(described, means_digest), step)
        return {s.prompt_ids[0]: frame_sums(f) for s, f in zip(todo, frames)}

    objective_ids = [i for i in prompt_ids_all if in_objective[i]]
    atp_heads = scan.mean("atp_heads")
    screen = heads_to_screen(atp_heads, d.exact)
    per_prompt = deltas("exact", single_head_sets(screen, kind))
    exact = exact_map(atp_heads.shape, screen, combine(per_prompt[i] for i in objective_ids).mean("delta"))
    head_scores = {"atp": atp_heads, "exact": exact, "attn_to_target": scan.mean("attn_to_target")}
    patching = {}
    if plan.partners is not None:  # exact resample effects on the selection half: noising (correct), denoising
        labels = dict(zip(prompt_ids_all, plan.prompts["label"].to_list()))
        for column, label in (("patch_noising", True), ("patch_denoising", False)):
            part = [per_prompt[i] for i in per_prompt if labels[i] == label]
            patching[column] = exact_map(atp_heads.shape, screen, combine(part).mean("delta"))
    neuron_maps = {"atp": scan.mean("atp_neurons"), "logit_yes_no": neuron_scores["logit_yes_no"],
                   "probe_cos": neuron_scores["probe_cos"]}
    head_plan = plan_sets(head_scores, "head", d.k, d.controls, d.seed)
    neuron_plan = plan_sets(neuron_maps, "neuron", d.k, d.controls, d.seed)
    set_deltas = deltas("sets", [dataclasses.replace(a, kind=kind) for a in head_plan.conditions + neuron_plan.conditions])
    set_sums = combine(set_deltas[i] for i in objective_ids)
    heldout_ids = [i for i in prompt_ids_all if in_heldout_objective[i]]
    heldout_sums = combine(set_deltas[i] for i in heldout_ids) if heldout_ids else None
    effects = set_sums.mean("delta")
    heldout = heldout_sums.mean("delta") if heldout_sums else np.full(effects.shape, np.nan)
    n_head_sets = len(head_plan.conditions)
    sets = pl.concat([sets_table(head_plan, effects[:n_head_sets], heldout[:n_head_sets]),
                      sets_table(neuron_plan, effects[n_head_sets:], heldout[n_head_sets:])])
    return Findings(
        model=name, spec=plan.sources[shards.m].spec, n_objective=scan.n_prompts, which=d.prompts,
        head_maps=head_scores | patching, neuron_maps=neuron_maps, probes=probes,
        sets=sets.select(pl.lit(name).alias("model"), pl.all()),
        objective_attribution=float(scan.mean("log_odds")), objective_engine=float(set_sums.mean("log_odds")),
        n_controls=d.controls, probe_note=probe_note, n_heldout=heldout_sums.n_prompts if heldout_sums else 0,
    )


# --------------------------------------------------------------------------------------------
# the folder and the job
# --------------------------------------------------------------------------------------------


def discovery_differences(old: dict, cfg: Config) -> list[str]:
    """What differs between a folder's saved config and `cfg` in the keys that change a discovery's numbers."""
    return config_mod.config_differences(old, cfg, DISCOVERY_NEUTRAL)


def _open_out(plan: DiscoveryPlan, out: OutDir) -> tuple[dict, dict[str, str]]:
    """Create the folder, or on --resume check its config and which shard files can be trusted.

    Returns the manifest (shards whose files fail verification set back to pending) and {shard: problem}.
    """
    cfg = plan.cfg
    if out.manifest.exists():
        old = read_manifest(out)
        diffs = discovery_differences(old["config"], cfg)
        old_digest = old.get("prompts", {}).get("template_digest")
        if old_digest != plan.prompt_source.template_digest:
            diffs.append(f"prompts.template: the template text changed ({old_digest} -> "
                         f"{plan.prompt_source.template_digest})")
        if diffs:
            raise DiscoveryError(f"--resume: the config differs from the one {out.root} was started with: "
                                 + "; ".join(diffs))
        return old, reset_untrusted(out, old, ("model", "phase", "prompts"))
    out.root.mkdir(parents=True, exist_ok=True)
    write_parquet_atomic(plan.prompts, out.prompts)
    manifest = {
        "job": "discover",
        "config": cfg.to_dict(),
        "config_hash": config_mod.config_hash(cfg, DISCOVERY_NEUTRAL),
        "versions": package_versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "prompts": {**dataclasses.asdict(plan.prompt_source), "n_objective": int(plan.prompts["in_objective"].sum()),
                    "n_heldout": int(plan.prompts["heldout"].sum()),
                    "n_heldout_objective": int(plan.prompts["in_heldout_objective"].sum())},
        "shards": {s.id: {"status": "pending", "model": s.model, "phase": s.step or s.phase, "prompts": len(s.prompt_ids)}
                   for s in plan.shards},
    }
    write_json_atomic(manifest, out.manifest)
    return manifest, {}


@dataclass
class DiscoveryReport:
    """What a finished discovery did and where everything is (printed at the end)."""

    out: OutDir
    findings: list[Findings]
    written: Written
    counts: ShardCounts
    seconds: float
    startup_seconds: float
    wandb: str | None = None

    def bookkeeping(self) -> dict[str, float]:
        return {"shards_run": self.counts.run, "shards_skipped": self.counts.reused, "seconds": self.seconds,
                "startup_seconds": self.startup_seconds, "n_retried": len(self.counts.retried)}

    def lines(self) -> list[str]:
        lines = []
        for f in self.findings:
            lines += f.lines()
        c = self.counts
        lines.append(f"shards: {c.run} run ({c.reused} already on disk), {self.seconds:.1f} s "
                     f"(startup {self.startup_seconds:.1f} s)")
        for model, steps in c.seconds.items():
            lines.append(f"  {model}: " + ", ".join(f"{what} {t:.1f} s" for what, t in steps.items()))
        for r in c.retried:
            lines.append(f"shard {r['shard']} retried: {r['cause']} (node {r['node_id']}, host {r['host']}, pid {r['pid']})")
        if c.recomputed:
            lines.append(f"shards recomputed: {', '.join(c.recomputed)}")
        lines += self.written.lines()
        lines.append(f"manifest: {self.out.manifest}")
        lines.append(f"W&B run:  {self.wandb or 'disabled'}")
        return lines


def run_discovery(cfg: Config, resume: bool = False) -> DiscoveryReport:
    """The whole job: plan, the four steps per model, tables, target, figures, W&B.

    Holds OUT/discovery's lock throughout; SIGINT, SIGTERM and shards that fail past their retries stop
    it with one line saying how many shards are on disk and how to continue (`jobs.runtime.resumable.running`).
    """
    start = time.perf_counter()
    out = OutDir(cfg.out).discovery
    check_out_dir(out, resume, "discover")
    plan = prepare(cfg)
    with running(out, "discover", resume_out=out.root.parent) as job:
        job.total = len(plan.shards)
        recover(out, job.lock)
        job.manifest, recomputed = _open_out(plan, out)
        manifest = job.manifest
        counts = ShardCounts(recomputed=dict(recomputed))
        pending = sum(e["status"] != "done" for e in manifest["shards"].values())
        findings = []
        bar = tqdm(total=pending, desc="shards", unit="shard", dynamic_ncols=True)
        try:
            with worker_pool(cfg.ray, out) as pool:
                for m in range(len(plan.sources)):
                    shards = _ModelShards(plan, m, pool, out, manifest, bar, counts)
                    try:
                        findings.append(discover_model(plan, shards))
                    finally:
                        shards.close()
                startup = pool.startup_seconds
        finally:
            bar.close()
        written = write_outputs(out, findings, follow_up_prompts(cfg, plan.prompts, out, plan.tokenizers))
        report = DiscoveryReport(out, findings, written, counts, time.perf_counter() - start, startup)
        report.wandb = log_discovery(cfg, out, written.tables, written.figures, written.files,
                                     written.metrics | {f"discover/{k}": v for k, v in report.bookkeeping().items()})
        report.seconds = time.perf_counter() - start
        finish(out, manifest, seconds=report.seconds, startup_seconds=startup, steps=counts.seconds)
        return report
