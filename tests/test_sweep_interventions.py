"""Intervention kinds through the sweep: conditions x kinds, the mean kinds' first pass in OUT, resume, the
circuit conditions and faithfulness, and a worker's resample shard with its partners' texts.

One in-process sweep on the seed-shaped plumbing model (`sweep_model`) (the small sweep of tests.support.sweeps, three kinds and a
mean circuit); its numbers are checked against the zero-only reference sweep (`sweep_reference`) and
against the independent hook reference of tests/support/interventions.py.
"""

from __future__ import annotations

import shutil

import numpy as np
import polars as pl
import pytest

from jobs.reference import ReferencePlan, means_path, resume_problems
from jobs.runtime.storage import OutDir, file_digest
from jobs.runtime.worker import Shard, ShardScorer, WorkerSpec
from jobs.errors import InputError
from jobs.partners import pair_partners
from jobs.sweep import run_sweep
from tests.support.interventions import means_of, reference_table
from tests.support.sweeps import KEY, manifest, sweep_cfg
from tests.tolerances import ScoreTol
from verif.design.conditions import Ablation, Condition, build_conditions, with_interventions
from verif.design.heads import parse_heads
from verif.model.engine import EngineOptions, Scorer
from verif.model.interventions import Sites, Sources
from verif.model.score import resolve_yes_no

KINDS = ("zero", "mean_positional")  # and mean through the circuit conditions
SETTINGS = ("ray.workers=0", f"ablation.kind=[{', '.join(KINDS)}]", "ablation.circuit=mean", "shards.prompts_per_shard=3")


@pytest.fixture(scope="module")
def kinds_sweep(sweep_model_dir, tmp_path_factory):
    """The small sweep under zero and mean_positional, with mean circuits: (results, OUT)."""
    out = tmp_path_factory.mktemp("kinds") / "OUT"
    report = run_sweep(sweep_cfg(sweep_model_dir, out, *SETTINGS))
    assert report.shards_run == 2
    return OutDir(out).read_results(), out


def test_conditions_times_kinds_keep_the_zero_ids(kinds_sweep, sweep_reference):
    results, out = kinds_sweep
    conditions = pl.read_parquet(OutDir(out).conditions)
    zero = pl.read_parquet(OutDir(sweep_reference[1]).conditions)["condition"].to_list()
    assert zero == ["baseline", "target", "random-000", "random-001"]
    expected = zero + [f"{c}@{k}" for k in KINDS[1:] for c in zero[1:]]
    expected += [f"{c}@mean" for c in ("circuit", "circuit-random-000", "circuit-random-001", "circuit-empty")]
    assert conditions["condition"].to_list() == expected
    assert conditions["intervention"].to_list() == ["none"] + [k for k in KINDS for _ in range(3)] + ["mean"] * 4
    assert conditions.filter(pl.col("kind") == "circuit")["kept"].to_list() == ["target"]
    # the same random sets under every kind
    heads = dict(zip(conditions["condition"], conditions["heads"]))
    assert heads["random-001"] == heads["random-001@mean_positional"]
    assert results.height == 6 * len(expected)


def test_zero_rows_are_the_zero_only_sweeps(kinds_sweep, sweep_reference, sweep_model, rounding):
    """Adding kinds leaves the zero conditions' numbers as a zero-only sweep has them (other batches: rounding)."""
    got = kinds_sweep[0].filter(pl.col("condition").is_in(["baseline", "target", "random-000", "random-001"]))
    want = sweep_reference[0]
    tol = ScoreTol.between_forwards(rounding(sweep_model))
    a, b = got.sort(KEY), want.sort(KEY)
    assert a.select(KEY).equals(b.select(KEY))
    np.testing.assert_allclose(a["log_odds"], b["log_odds"], rtol=0, atol=tol.log)


def test_mean_kinds_and_circuit_equal_the_independent_reference(kinds_sweep, sweep_model, rounding):
    """mean_positional over all six prompts (the default reference, read in two shards and added), and the
    circuit (every head but the target's, mean-ablated), against hooks one prompt at a time."""
    results, out = kinds_sweep
    prompts = pl.read_parquet(OutDir(out).prompts)
    conditions = pl.read_parquet(OutDir(out).conditions)
    ids = resolve_yes_no(sweep_model.tokenizer)
    toks = [sweep_model.tokenizer.encode(p, add_special_tokens=False) for p in prompts["prompt"]]
    means = means_of(sweep_model.model, toks)
    by_id = {r["condition"]: r for r in conditions.iter_rows(named=True)}
    target = tuple(parse_heads(by_id["target"]["heads"]))
    arch = sweep_model.arch
    circuit = tuple((l, h) for l in range(arch.n_layers) for h in range(arch.n_heads) if (l, h) not in target)
    cases = {"target@mean_positional": Ablation(target, (), "mean_positional"),
             "random-000@mean_positional": Ablation(parse_heads(by_id["random-000"]["heads"]), (), "mean_positional"),
             "circuit@mean": Ablation(circuit, (), "mean")}
    want = reference_table(sweep_model, ids, toks, list(cases.values()), means)
    tol = ScoreTol.between_forwards(rounding(sweep_model))
    for j, cond in enumerate(cases):
        got = results.filter(pl.col("condition") == cond).sort("prompt_id")["log_odds"].to_numpy()
        np.testing.assert_allclose(got, want.log_odds[:, j], rtol=0, atol=tol.log, err_msg=cond)
    base = results.filter(pl.col("condition") == "baseline").sort("prompt_id")["log_odds"].to_numpy()
    assert (np.abs(want.log_odds - base[:, None]) > 4 * tol.log).any(axis=0).all()  # each moves some answer


def test_faithfulness_is_the_formula_on_the_results(kinds_sweep):
    results, out = kinds_sweep
    faith = pl.read_parquet(OutDir(out).stats / "faithfulness.parquet")
    prompts = pl.read_parquet(OutDir(out).prompts)
    lo = results.join(prompts.select("prompt_id", "label"), on="prompt_id")

    def m(cond, label):
        part = lo.filter(pl.col("condition") == cond)
        return part.filter(pl.col("label") == (label == "correct")) if label != "all" else part

    for label in ("correct", "incorrect", "all"):
        mean = {c: m(c, label)["log_odds"].mean() for c in ("baseline", "circuit@mean", "circuit-empty@mean",
                                                             "circuit-random-000@mean", "circuit-random-001@mean")}
        want = {c: (mean[c] - mean["circuit-empty@mean"]) / (mean["baseline"] - mean["circuit-empty@mean"])
                for c in ("circuit@mean", "circuit-random-000@mean", "circuit-random-001@mean")}
        rows = faith.filter(pl.col("label") == label)
        got = dict(zip(rows["condition"], rows["faithfulness"]))
        assert got.keys() == want.keys()
        for c in want:
            assert got[c] == pytest.approx(want[c], rel=1e-12, abs=1e-12)
        t = rows.filter(pl.col("kept") == "target").row(0, named=True)
        beaten = sum(want[c] >= want["circuit@mean"] for c in want if c != "circuit@mean")
        assert t["n_random"] == 2 and t["p_greater"] == pytest.approx((1 + beaten) / 3)
        assert ("explains no more than a random set of its size" in t["verdict"]) == bool(beaten)


def test_stats_and_figures_per_kind(kinds_sweep):
    out = OutDir(kinds_sweep[1])
    tvc = pl.read_parquet(out.stats / "target_vs_controls.parquet")
    assert tvc.group_by("intervention").len().sort("intervention").rows() == [(k, 3) for k in sorted(KINDS)]
    assert set(tvc["target_condition"]) == {"target", "target@mean_positional"}
    assert (tvc["n_controls"] == 2).all()  # each target against the random sets of its own kind
    paired = pl.read_parquet(out.stats / "paired_change.parquet")
    assert set(paired["condition"]) == set(tvc["target_condition"])
    names = {p.name.split("__", 1)[1] for p in out.figures.glob("*.png")}
    assert {"interventions.png", "faithfulness.png", "before_after.png", "before_after__mean_positional.png",
            "null__delta_correct__mean_positional.png", "null__delta_correct.png"} <= names


def test_reference_means_in_out_and_resume(kinds_sweep, sweep_model_dir, tmp_path):
    """The means file is recorded with its digests; a resume reuses it, or recomputes it (the same bytes) when
    it does not verify; a reference whose prompts changed is refused."""
    results, src = kinds_sweep
    out = tmp_path / "OUT"
    shutil.copytree(src, out)
    (model,) = manifest(out)["reference"]
    entry = manifest(out)["reference"][model]
    path = means_path(OutDir(out), model)
    assert entry["file"] == f"reference/{model}.npz" and entry["sha256"] == file_digest(path)
    assert entry["n_prompts"] == 6 and entry["positional"] is True
    before = file_digest(path)
    path.write_bytes(b"damaged")
    OutDir(out).shard("m0-p000003-c000").unlink()
    report = run_sweep(sweep_cfg(sweep_model_dir, out, *SETTINGS), resume=True)
    assert report.shards_run == 1 and file_digest(path) == before
    again = OutDir(out).read_results()
    assert again.sort(KEY).equals(results.sort(KEY))
    plan = ReferencePlan("prompts", ("another prompt",), Sites(), False, 3)
    assert resume_problems(manifest(out), plan)[0].startswith("ablation.reference: the reference prompts changed")


def test_with_interventions_and_pair_partners():
    base = build_conditions(4, 4, ((1, 2),), 2, 0)
    assert with_interventions(base, ["zero"]) == base
    both = with_interventions(base, ["resample", "zero"])
    assert [c.id for c in both] == ["baseline", "target@resample", "random-000@resample", "random-001@resample",
                                    "target", "random-000", "random-001"]
    prompts = pl.DataFrame({"prompt_id": [0, 1, 2, 3], "pair_id": [7, 3, 7, 3]}, schema={"prompt_id": pl.Int64,
                                                                                         "pair_id": pl.Int64})
    assert pair_partners(prompts, both) == [2, 3, 0, 1]
    assert pair_partners(prompts, base) is None
    with pytest.raises(InputError, match="prompt 0 has no pair; resample needs counterfactual pairs"):
        pair_partners(prompts.with_columns(pl.lit(None, pl.Int64).alias("pair_id")), both)
    with pytest.raises(InputError, match="prompt 0 has 2 partners in pair 7"):
        pair_partners(pl.DataFrame({"pair_id": [7, 7, 7]}), [Condition("t", "target", ((1, 2),), intervention="resample")])


def test_worker_resamples_from_the_partners_texts(sweep_model_dir, sweep_model, short_prompts):
    """A sweep worker's resample shard reads the partners' activations from their texts (hand-made pairs of
    equal token length, partners outside the shard): the scores of the engine given the partners' cache.
    On the plumbing model of this file's sweep (the seed shape with the first 10,000 Qwen2.5 ranks)."""
    tok = sweep_model.tokenizer
    texts = [short_prompts[1], short_prompts[1].replace("= 19 + 17 = 36", "= 19 + 17 = 37")]  # a counterfactual pair
    assert texts[0] != texts[1]
    assert len(tok.encode(texts[0], add_special_tokens=False)) == len(tok.encode(texts[1], add_special_tokens=False))
    i, j = 0, 1
    abls = [Ablation(), Ablation(((3, 13), (17, 14)), ((10, 5),), "resample"), Ablation(((20, 1),), (), "zero")]
    worker = ShardScorer(WorkerSpec(str(sweep_model_dir), "float32", "cpu", (" Yes", "Yes", " yes", "yes"),
                                    (" No", "No", " no", "no"), EngineOptions()))
    cols = worker.score_shard(Shard("s", "m", (i,), ("baseline", "resample", "zero")), [texts[i]], abls, "m",
                              None, [texts[j]])
    scorer = Scorer(sweep_model, resolve_yes_no(tok))
    toks = scorer.tokenize([texts[i], texts[j]])
    want = scorer.score_tokens(toks[:1], abls, Sources(cache=scorer.activations(toks[1:], Sites.of(abls))))
    np.testing.assert_array_equal(cols["log_odds"], want.log_odds[0])
    assert cols["log_odds"][1] != cols["log_odds"][0]


def test_wandb_keys_per_kind(kinds_sweep):
    """W&B gets each kind's target-vs-controls keys beside zero's, the faithfulness, and histograms pooled per kind."""
    from jobs.tracking import faithfulness_metrics, p_yes_norm_histograms, tvc_metrics

    results, root = kinds_sweep
    out = OutDir(root)
    (model,) = results["model"].unique().to_list()
    keys = tvc_metrics(pl.read_parquet(out.stats / "target_vs_controls.parquet"))
    for prefix in ("", "target@mean_positional/"):
        assert f"{model}/target_vs_controls/{prefix}delta_correct/p_empirical" in keys
    faith = faithfulness_metrics(pl.read_parquet(out.stats / "faithfulness.parquet"))
    assert {f"{model}/faithfulness/mean/{label}/faithfulness" for label in ("correct", "incorrect", "all")} <= set(faith)
    hists = p_yes_norm_histograms(results, pl.read_parquet(out.prompts), pl.read_parquet(out.conditions))
    groups = {k.split("/")[2] for k in hists}
    assert {"baseline", "target", "target@mean_positional", "random_pooled", "random@mean_positional_pooled",
            "circuit@mean_pooled"} <= groups
