"""`python launch.py --discover` end to end on a 4-layer x 4-head seed-shaped model (with the first 10,000
Qwen2.5 BPE ranks: tests.support.tokenizer.PLUMBING_RANKS), in this process.

One discovery (8 prompts, a quarter of each label held out: the 6 of the selection half in scan shards of 3; M over
its 3 correct ones, the held-out M over the 1 held-out correct one) is run through the command line once per module; the tests read its folder: the files and columns, its exact effects against a
sweep's single-head conditions, its combined attribution sums against one pass over all prompts, a
resume after a shard file is deleted, its target config run as a sweep, and its W&B run.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

import launch
from jobs import config as config_mod
from jobs.config import ConfigError, load_config
from jobs.discover.job import DiscoveryError, discovery_differences, run_discovery, slices
from jobs.discover.worker import DiscoveryShard, DiscoveryWorker, ScanPrompts
from jobs.runtime.storage import write_shard
from jobs.sweep import run_sweep
from jobs.lineage import find_inputs
from jobs.tracking import DISCOVERY_ARTIFACT_TYPE
from jobs.runtime.worker import WorkerSpec
from verif.analysis.discovery.metric import PROMPT_CHOICES
from verif.analysis.discovery.ranking import spearman
from verif.analysis.discovery.sets import best_set
from verif.design.heads import parse_heads
from verif.design.neurons import parse_neurons
from tests.support.models import build_seed_shaped_model
from tests.support.tokenizer import PLUMBING_RANKS
from tests.support.wandb_records import read_run

N_LAYERS, N_HEADS, HEAD_DIM = 4, 4, 8
N_NEURONS = 2 * N_HEADS * HEAD_DIM  # the seed shape's MLP width is twice its hidden size
SETTINGS = (
    "model.device=cpu", "model.dtype=float32", "prompts.n=8", "shards.prompts_per_shard=3", "ray.workers=0",
    "discover.max_prompts=3", "discover.exact=6", "discover.k=[1, 2, 4]", "discover.controls=3", "discover.holdout=0.25",
    "ablation.target_heads=null",  # the default config's demonstration heads are SmolLM2's, not this model's
    # One prompt per forward: each prompt's sums are then the same bits in any shard layout.
    "discover.batch_size=1",
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return build_seed_shaped_model(tmp_path_factory.mktemp("tiny"), n_ranks=PLUMBING_RANKS, n_layers=N_LAYERS,
                                   n_heads=N_HEADS, n_kv_heads=2, head_dim=HEAD_DIM)


def overrides(model_dir: Path, *extra: str) -> list[str]:
    return [f"model.path={model_dir}", *SETTINGS, *extra]


def argv(model_dir: Path, out: Path, *extra: str) -> list[str]:
    args = ["--discover", "--out", str(out)]
    for item in overrides(model_dir, *extra):
        args += ["--set", item]
    return args


@pytest.fixture(scope="module")
def finished(tiny_dir, tmp_path_factory) -> tuple[Path, str]:
    """A discovery run by `launch.main` (W&B offline): (OUT, what it printed)."""
    out = tmp_path_factory.mktemp("discover") / "OUT"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert launch.main(argv(tiny_dir, out, "wandb.mode=offline")) == 0
    return out, printed.getvalue()


def read(out: Path, name: str) -> pl.DataFrame:
    return pl.read_parquet(out / "discovery" / f"{name}.parquet")


def test_files_columns_and_printed_report(finished):
    out, printed = finished
    heads, neurons, probes, sets = (read(out, n) for n in ("heads", "neurons", "probes", "sets"))
    assert heads.columns == ["model", "layer", "head", "atp", "exact", "attn_to_target"]
    assert neurons.columns == ["model", "layer", "neuron", "atp", "logit_yes_no", "probe_cos"]
    assert sets.columns == ["model", "ranking", "kind", "k", "components", "delta", "null_mean", "null_std", "p_empirical",
                            "heldout_delta", "heldout_null_mean", "heldout_null_std", "heldout_p_empirical"]
    assert {"model", "layer", "heldout_acc", "separates"} <= set(probes.columns) and probes.height == N_LAYERS
    assert heads.height == N_LAYERS * N_HEADS and neurons.height == N_LAYERS * N_NEURONS
    assert heads["exact"].is_not_null().sum() == 6  # discover.exact: the top 6 by |atp|
    assert heads["atp"].is_not_null().all() and heads["attn_to_target"].is_not_null().all()
    # Attention to the target is a sum of probabilities over some keys: within [0, 1].
    assert heads["attn_to_target"].min() >= 0 and heads["attn_to_target"].max() <= 1
    # Every (ranking, k) of both kinds: k in 1, 2, 4 (4 <= every ranking's length here), probe_cos
    # only where some probe separated.
    scored = {"head": 3, "neuron": 2 + int(neurons["probe_cos"].is_not_null().any())}
    assert sets.height == 3 * sum(scored.values()) and set(sets["k"]) == {1, 2, 4}
    atp_top = sets.filter((pl.col("kind") == "head") & (pl.col("ranking") == "atp") & (pl.col("k") == 1))["components"][0]
    best = heads.sort(pl.col("atp").abs(), descending=True).row(0, named=True)
    assert atp_top == f"L{best['layer']} H{best['head']}"
    figures = sorted(p.name for p in (out / "discovery" / "figures").glob("*.png"))
    model = heads["model"][0]
    assert figures == sorted([f"{model}__heads_{s}.png" for s in ("atp", "exact", "attn_to_target")]
                             + [f"{model}__neurons_{s}.png" for s in ("atp", "logit_yes_no", "probe_cos")]
                             + [f"{model}__atp_vs_exact.png", f"{model}__effect_vs_k_head.png",
                                f"{model}__effect_vs_k_neuron.png"])
    assert "top heads by |exact|" in printed and "top neurons by |atp|" in printed
    # discover.controls=3: each best set's p-value is read against 3 random sets, so it is at least 1/4
    assert printed.count("(3 random sets ") == 2 and printed.count("(the least possible: 0.250)") == 2
    assert str(out / "discovery" / "heads.parquet") in printed and "target.yaml" in printed


def test_exact_equals_a_sweeps_single_head_effects(finished, tiny_dir, tmp_path):
    """On the selection half the screened heads' exact effects, on the held-out half the single-head sets'
    held-out deltas, each against a sweep's single-head conditions on the same prompts."""
    out, _ = finished
    cfg = load_config(None, overrides(tiny_dir, "ablation.target_heads=null", "ablation.random_controls=0", "ablation.sweeps=[single_head]",
                                      "wandb.mode=disabled", "stats.n_boot=10"), str(tmp_path / "sweep"))
    run_sweep(cfg)
    results = pl.read_parquet(tmp_path / "sweep" / "results" / "*.parquet")
    prompts = read(out, "prompts")
    objective, heldout = (prompts.filter(c)["prompt_id"] for c in ("in_objective", "in_heldout_objective"))
    assert objective.len() == 3 and heldout.len() == 1  # discover.max_prompts; a quarter of the 4 correct ones

    def effect(ids: pl.Series, layer: int, head: int) -> float:
        lo = results.filter(pl.col("prompt_id").is_in(ids.implode())).pivot("condition", index="prompt_id",
                                                                          values="log_odds")
        return (lo[f"head-L{layer:02d}H{head:02d}"] - lo["baseline"]).mean()

    # Both are float32 forwards of 4 layers (width 32) batched differently: a logit rounds by
    # ~|logit| * 4 * sqrt(32) * 6e-8 ~ 1.4e-5 for |logit| ~ 10, a difference of two log-odds by
    # twice that. 1e-4 keeps a 1e-3 change of a probability (>= 4e-3 in log-odds) a failure.
    screened = read(out, "heads").filter(pl.col("exact").is_not_null())
    for row in screened.iter_rows(named=True):
        assert row["exact"] == pytest.approx(effect(objective, row["layer"], row["head"]), abs=1e-4)
    singles = read(out, "sets").filter((pl.col("kind") == "head") & (pl.col("k") == 1))
    assert singles.height == 3  # one per head ranking
    for row in singles.iter_rows(named=True):
        ((layer, head),) = parse_heads(row["components"])
        assert row["heldout_delta"] == pytest.approx(effect(heldout, layer, head), abs=1e-4)
        assert row["delta"] == pytest.approx(effect(objective, layer, head), abs=1e-4)


def test_mean_discovery_equals_a_mean_sweeps_single_head_effects(finished, tiny_dir, tmp_path):
    """discover.intervention: mean reads the reference means in a first step (shards of reference prompts,
    added), screens heads under mean-ablation and differences AtP against the means; its exact effects are a
    mean-ablation sweep's single-head effects (the same default reference: all 8 prompts)."""
    out = tmp_path / "OUT"
    run_discovery(load_config(None, overrides(tiny_dir, "discover.intervention=mean", "wandb.mode=disabled"), str(out)))
    shards = json.loads((out / "discovery" / "manifest.json").read_text())["shards"]
    assert sorted(k for k in shards if "reference" in k) == ["m0-reference-p000000", "m0-reference-p000003",
                                                             "m0-reference-p000006"]
    cfg = load_config(None, overrides(tiny_dir, "ablation.target_heads=null", "ablation.random_controls=0",
                                      "ablation.sweeps=[single_head]", "ablation.kind=mean", "wandb.mode=disabled",
                                      "stats.n_boot=10"), str(tmp_path / "sweep"))
    run_sweep(cfg)
    results = pl.read_parquet(tmp_path / "sweep" / "results" / "*.parquet")
    objective = read(out, "prompts").filter("in_objective")["prompt_id"]
    lo = results.filter(pl.col("prompt_id").is_in(objective.implode())).pivot("condition", index="prompt_id",
                                                                            values="log_odds")
    heads = read(out, "heads")
    screened = heads.filter(pl.col("exact").is_not_null())
    assert screened.height == 6
    for row in screened.iter_rows(named=True):
        sweep_effect = (lo[f"head-L{row['layer']:02d}H{row['head']:02d}@mean"] - lo["baseline"]).mean()
        assert row["exact"] == pytest.approx(sweep_effect, abs=1e-4)  # as for zero (the test above)
    zero = read(finished[0], "heads")  # the zero discovery: AtP against 0, not against the means
    assert np.abs(heads["atp"].to_numpy() - zero["atp"].to_numpy()).max() > 1e-3 * np.abs(zero["atp"].to_numpy()).max()


def test_combined_sums_equal_one_pass_over_all_prompts(finished, tiny_dir):
    """The job cut the selection half's prompts into 2 scan shards and added their sums; one worker pass
    over all of them must give the same means up to float64 summation order: each prompt's own sums are
    the same bits in any layout (one prompt per forward, one thread)."""
    out, _ = finished
    cfg = load_config(None, overrides(tiny_dir), str(out))
    prompts = read(out, "prompts").filter(~pl.col("heldout"))
    assert sum(k.startswith("m0-scan") for k in json.loads((out / "discovery" / "manifest.json").read_text())["shards"]) == 2
    spec = WorkerSpec(model=str(tiny_dir), dtype="float32", device="cpu", yes=tuple(cfg.scoring.yes),
                      no=tuple(cfg.scoring.no), engine=cfg.engine)
    worker = DiscoveryWorker(spec)

    def scan(rows: pl.DataFrame) -> dict:
        return worker.scan(tuple(rows["prompt_id"]), ScanPrompts(tuple(rows["prompt"]), tuple(rows["target"]),
                                                                 tuple(rows["in_objective"]), 1))

    one = scan(prompts)
    singles = [scan(prompts[i:i + 1]) for i in range(prompts.height) if prompts["in_objective"][i]]
    n = one["n_prompts"]
    assert n == len(singles) == 3  # discover.max_prompts
    heads, neurons = read(out, "heads"), read(out, "neurons")
    for got, key in ((heads["atp"], "atp_heads"), (heads["attn_to_target"], "attn_to_target"), (neurons["atp"], "atp_neurons")):
        want = np.asarray(one["arrays"][key]).ravel() / n
        # n float64 additions in another order differ by at most ~(n - 1) ulps of the sum of the
        # terms' magnitudes: 4 * 2.2e-16 * sum |term| per entry, divided by n like the mean.
        bound = 4 * np.finfo(np.float64).eps * sum(np.abs(np.asarray(s["arrays"][key]).ravel()) for s in singles) / n
        assert np.all(np.abs(got.to_numpy() - want) <= bound), key


def test_a_bf16_model_gets_float32_gradients(finished, tiny_dir):
    """A worker scoring in bf16 differentiates a float32 copy (bf16 gradients have 3 significant
    digits), scores exact effects in bf16 like a sweep, and drops the copy once the scans are done."""
    out, _ = finished
    cfg = load_config(None, overrides(tiny_dir))
    prompts = read(out, "prompts")
    spec = WorkerSpec(model=str(tiny_dir), dtype="bfloat16", device="cpu", yes=tuple(cfg.scoring.yes),
                      no=tuple(cfg.scoring.no), engine=cfg.engine)
    worker = DiscoveryWorker(spec)
    shard = DiscoveryShard("s", "m", "scan", tuple(prompts["prompt_id"]))
    scan = worker.run(shard, ScanPrompts(tuple(prompts["prompt"]), tuple(prompts["target"]),
                                         tuple(prompts["in_objective"]), 1))
    assert next(worker.gradient_model().model.parameters()).dtype == torch.float32
    assert next(worker.loaded.model.parameters()).dtype == torch.bfloat16
    # The float32 copy is the job's float32 model: the same sums as the float32 run's scan, which
    # were added in another order (float64 sums of float32 terms: 1e-9 of the scale is ample).
    want = read(out, "heads")["atp"].to_numpy()
    np.testing.assert_allclose(np.asarray(scan["arrays"]["atp_heads"]).ravel() / scan["n_prompts"], want,
                               rtol=0, atol=1e-9 * np.abs(want).max())
    worker.run(DiscoveryShard("d", "m", "deltas", (0,), "exact"), ([prompts["prompt"][0]], []))
    assert worker.float32_copy is None


def test_resume_recomputes_only_the_deleted_shard(finished, tiny_dir, tmp_path, capsys):
    src, _ = finished
    out = tmp_path / "OUT"
    shutil.copytree(src, out)
    results = out / "discovery" / "results"
    before = {p.name: p.read_bytes() for p in results.glob("*.parquet")}
    (scan,) = [p for p in sorted(results.glob("m0-scan-*.parquet"))[1:]]
    scan.unlink()
    cfg = load_config(None, overrides(tiny_dir, "wandb.mode=disabled"), str(out))
    report = run_discovery(cfg, resume=True)
    assert f"{scan.stem}: missing; it will be recomputed" in capsys.readouterr().err
    assert (report.counts.run, report.counts.reused) == (1, len(before) - 1)
    assert {p.name: p.read_bytes() for p in results.glob("*.parquet")} == before  # the same bytes again
    for name in ("heads", "neurons", "sets"):
        assert read(out, name).equals(read(src, name))


def test_resume_recomputes_the_steps_whose_inputs_moved(finished, tiny_dir, tmp_path, capsys):
    """A scan shard whose sums changed (here: rewritten with one unscreened head's attribution raised,
    its manifest record updated so that the file verifies) changes the screen: every exact and sets
    shard (of both halves) was computed for other heads and is recomputed; the scan and neuron shards
    are kept."""
    out = tmp_path / "OUT"
    shutil.copytree(finished[0], out)
    folder = out / "discovery"
    unscreened = read(out, "heads").filter(pl.col("exact").is_null()).row(0, named=True)
    path = sorted((folder / "results").glob("m0-scan-*.parquet"))[0]
    frame = pl.read_parquet(path)
    row = frame.filter(pl.col("key") == "atp_heads").row(0, named=True)
    values = np.asarray(row["values"])
    values[unscreened["layer"] * N_HEADS + unscreened["head"]] += 1e3
    frame = frame.with_columns(pl.when(pl.col("key") == "atp_heads").then(pl.Series([values.tolist()] * frame.height))
                               .otherwise(pl.col("values")).alias("values"))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["shards"][path.stem].update(write_shard(frame, path).entry())
    (folder / "manifest.json").write_text(json.dumps(manifest))
    report = run_discovery(load_config(None, overrides(tiny_dir, "wandb.mode=disabled"), str(out)), resume=True)
    steps = {shard_id.split("-")[1] for shard_id in report.counts.recomputed}
    # 3 exact shards (the selection half's objective), 4 sets shards (those and the held-out one)
    assert steps == {"exact", "sets"} and report.counts.run == len(report.counts.recomputed) == 7
    assert "computed from other inputs" in capsys.readouterr().err
    heads = read(out, "heads")
    raised = heads.filter((pl.col("layer") == unscreened["layer"]) & (pl.col("head") == unscreened["head"]))
    assert raised["exact"].is_not_null().all()  # now screened and scored


def test_target_yaml_runs_as_a_sweep_config(finished, tiny_dir, tmp_path):
    out, _ = finished
    target = out / "discovery" / "target.yaml"
    sets = read(out, "sets")
    small = ["prompts.n=2", "ablation.random_controls=1", "ray.workers=0", "wandb.mode=disabled", "stats.n_boot=10"]
    cfg = load_config(target, small)
    assert cfg.model.path == str(tiny_dir)
    assert cfg.ablation.target_heads == best_set(sets, "head")["components"]
    assert cfg.ablation.target_neurons == best_set(sets, "neuron")["components"]
    args = ["--sweep", "--config", str(target), "--out", str(tmp_path / "sweep")]
    with contextlib.redirect_stdout(io.StringIO()):
        assert launch.main(args + [a for item in small for a in ("--set", item)]) == 0
    conditions = pl.read_parquet(tmp_path / "sweep" / "conditions.parquet").filter(pl.col("kind") == "target")
    assert parse_heads(conditions["heads"][0]) == parse_heads(cfg.ablation.target_heads)
    assert parse_neurons(conditions["neurons"][0]) == parse_neurons(cfg.ablation.target_neurons)
    # The follow-up sweep verifies exactly the held-out attempts, none of the selection half's.
    def attempts(frame: pl.DataFrame) -> list[tuple]:
        return sorted((tuple(r["numbers"]), r["target"], r["attempt"]) for r in frame.iter_rows(named=True))

    swept, discovery = pl.read_parquet(tmp_path / "sweep" / "prompts.parquet"), read(out, "prompts")
    assert cfg.prompts.file == str((out / "discovery" / "heldout_prompts.parquet").resolve())
    assert "kept out of the selection half" in target.read_text()
    assert attempts(swept) == attempts(discovery.filter("heldout"))
    assert not set(attempts(swept)) & set(attempts(discovery.filter(~pl.col("heldout"))))


def test_wandb_run(finished):
    out, _ = finished
    (run_dir,) = (out / "discovery" / "wandb" / "wandb").glob("offline-run-*")
    run = read_run(run_dir)
    assert run["job_type"] == "discover"
    heads = read(out, "heads")
    model = heads["model"][0]
    assert run["summary"][f"{model}/discover/spearman_atp_exact"] == pytest.approx(
        spearman(heads["atp"].to_numpy(), heads["exact"].fill_null(np.nan).to_numpy()), rel=1e-12)
    assert run["summary"]["discover/shards_run"] == len(json.loads((out / "discovery" / "manifest.json").read_text())["shards"])
    logged = {k for step in run["history"] for k in step}
    assert {"tables/heads", "tables/neurons", "tables/sets", "tables/probes", f"figures/{model}__atp_vs_exact"} <= logged
    (art,) = [a for a in run["artifacts"] if a["type"] == DISCOVERY_ARTIFACT_TYPE]
    assert {"heads.parquet", "neurons.parquet", "probes.parquet", "sets.parquet", "target.yaml"} <= set(art["files"])
    assert "charts/" + model + "/atp_vs_exact" in run["config"]["_wandb"]["visualize"]
    # A sweep run with --config target.yaml names this artifact as its input (jobs.lineage).
    (found,), notes = find_inputs(config_file=str(out / "discovery" / "target.yaml"))
    assert (found.name, found.type, found.digest, notes) == (art["name"], art["type"], art["digest"], [])


@pytest.mark.parametrize("item, key", [
    ("discover.exact=0", "discover.exact"), ("discover.exact=some", "discover.exact"),
    ("discover.k=[]", "discover.k"), ("discover.k=[0, 2]", "discover.k"), ("discover.k=[true]", "discover.k"),
    ("discover.controls=0", "discover.controls"), ("discover.prompts=wrong", "discover.prompts"),
    ("discover.max_prompts=0", "discover.max_prompts"), ("discover.batch_size=0", "discover.batch_size"),
    ("discover.exactly=3", "discover.exactly"),
])
def test_config_errors_name_the_key(item, key):
    with pytest.raises(ConfigError, match=rf"^{key}: "):
        load_config(None, [item])


def test_prompt_choices_and_resume_keys():
    assert config_mod.DISCOVER_PROMPTS == PROMPT_CHOICES
    a, b, c = (load_config(None, o, file_default=False) for o in ([], ["discover.exact=3"], ["ablation.random_controls=3"]))
    assert config_mod.config_differences(a, b) == []  # a sweep ignores the discover section
    assert discovery_differences(a.to_dict(), b) == ["discover.exact: 64 -> 3"]
    assert discovery_differences(a.to_dict(), c) == []  # the target set is no input of a discovery


def test_no_prompt_for_the_objective_is_refused_before_loading(tiny_dir, tmp_path):
    cfg = load_config(None, overrides(tiny_dir, "prompts.p_correct=1", "discover.prompts=incorrect"), str(tmp_path / "OUT"))
    with pytest.raises(DiscoveryError, match="discover.prompts: 'incorrect' selects no prompt out of 8"):
        run_discovery(cfg)
    assert not (tmp_path / "OUT").exists()  # refused before anything was written: no folder left behind


def test_a_holdout_that_leaves_no_prompt_to_rank_on_is_refused_before_loading(tiny_dir, tmp_path):
    # 4 correct attempts of 8, floor(0.9 * 4 + 0.5) = 4 held out: none left to choose on
    cfg = load_config(None, overrides(tiny_dir, "discover.holdout=0.9"), str(tmp_path / "OUT"))
    with pytest.raises(DiscoveryError, match=r"^discover.holdout: 0.9 holds out all 4 correct prompts of 8"):
        run_discovery(cfg)
    assert not (tmp_path / "OUT").exists()


def test_two_models_get_their_own_rows_and_targets(tiny_dir, tmp_path):
    other = build_seed_shaped_model(tmp_path / "other", seed=1, n_ranks=PLUMBING_RANKS, n_layers=3, n_heads=2, n_kv_heads=1,
                                    head_dim=HEAD_DIM)
    cfg = load_config(None, [f"model.path=[{tiny_dir}, {other}]", *SETTINGS, "prompts.n=4", "discover.max_prompts=1",
                             "discover.exact=2", "discover.k=[1]", "discover.controls=1", "discover.holdout=0",
                             "wandb.mode=disabled"],
                      str(tmp_path / "OUT"))
    report = run_discovery(cfg)
    names = [f.model for f in report.findings]
    assert names == [tiny_dir.name, "other"]
    counts = {n: dict(read(tmp_path / "OUT", n).group_by("model").len().iter_rows()) for n in ("heads", "neurons", "probes")}
    assert counts["heads"] == {names[0]: N_LAYERS * N_HEADS, "other": 3 * 2}
    assert counts["neurons"] == {names[0]: N_LAYERS * N_NEURONS, "other": 3 * 2 * 2 * HEAD_DIM}
    assert counts["probes"] == {names[0]: N_LAYERS, "other": 3}
    assert sorted(p.name for p in (tmp_path / "OUT" / "discovery").glob("target*.yaml")) == sorted(
        f"target-{n}.yaml" for n in names)
    # 4 x 4 heads against 3 x 2: no component of one is a component of the other, so no overlap is counted
    assert read(tmp_path / "OUT", "cross_model").height == 0


def test_slices_are_even_and_stable():
    assert slices(list(range(12)), 8) == [tuple(range(6)), tuple(range(6, 12))]
    assert slices(list(range(7)), 3) == [(0, 1, 2), (3, 4), (5, 6)]
    assert slices([5], 8) == [(5,)] and slices([], 8) == []
