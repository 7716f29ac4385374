"""The compare job (`launch.py --compare`) on the seed-shaped model (conftest `sweep_model_dir`: its small
vocabulary makes every layer's logit lens 15x cheaper): against itself, and against a copy with one planted
change in one layer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import polars as pl
import pytest
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

import launch
from jobs import tracking
from jobs.compare import CompareError, run_compare
from jobs.config import load_config
from jobs.errors import InputError
from tests.support.wandb_records import read_run

PLANTED_LAYER = 12  # its down_proj gets one scaled row
N_LAYERS = 36
SETTINGS = ("model.dtype=float32", "model.device=cpu", "prompts.n=3", "stats.n_boot=50", "wandb.mode=disabled")


@pytest.fixture(scope="module")
def planted_dir(sweep_model_dir, tmp_path_factory) -> Path:
    """The seed-shaped model with row 7 of layer PLANTED_LAYER's down_proj scaled by 3 (nothing else)."""
    out = tmp_path_factory.mktemp("planted")
    for path in Path(sweep_model_dir).iterdir():
        if path.name != "model.safetensors":
            shutil.copy(path, out / path.name)
    tensors = load_file(Path(sweep_model_dir) / "model.safetensors")
    key = f"model.layers.{PLANTED_LAYER}.mlp.down_proj.weight"
    tensors[key] = tensors[key].clone()
    tensors[key][7] *= 3.0
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def _overrides(a: Path, b: Path, *extra: str) -> list[str]:
    return [f"model.path=[{a}, {b}]", *SETTINGS, *extra]


def test_a_model_against_itself_is_identical(sweep_model_dir, tmp_path, capsys):
    out = tmp_path / "OUT"
    argv = ["--compare", "--out", str(out)]
    for item in _overrides(sweep_model_dir, sweep_model_dir, "compare.neurons=L0 N5, L35 N5"):
        argv += ["--set", item]
    assert launch.main(argv) == 0
    printed = capsys.readouterr().out
    folder = out / "compare"
    res = pl.read_parquet(folder / "residual.parquet")
    assert res.height == 3 * N_LAYERS
    assert (res["cos"] == 1.0).all() and (res["max_abs_diff"] == 0.0).all() and (res["norm_ratio"] == 1.0).all()
    lens = pl.read_parquet(folder / "lens.parquet")
    a, b = (lens.filter(pl.col("side") == s).drop("side") for s in ("a", "b"))
    assert a.equals(b) and a.height == 3 * N_LAYERS
    assert (pl.read_parquet(folder / "neurons.parquet")["diff"] == 0.0).all()
    summary = pl.read_parquet(folder / "summary_residual.parquet")
    assert set(summary["attempts"]) <= {"all", "correct", "incorrect"} and (summary["cos_lo"] == 1.0).all()
    assert summary.filter(pl.col("attempts") == "all")["n"].to_list() == [3] * N_LAYERS
    for group in summary["attempts"].unique():
        assert (folder / "figures" / f"compare_{group}.png").read_bytes()[:4] == b"\x89PNG"
    assert pl.read_parquet(folder / "prompts.parquet").height == 3
    record = json.loads((folder / "compare.json").read_text())
    assert record["first_differing_layer"] is None and record["neurons"]["neurons"] == "L0 N5, L35 N5"
    assert "identical after every layer" in printed and str(folder) in printed


def test_a_planted_change_shows_from_its_layer_on(sweep_model_dir, planted_dir, tmp_path):
    target = tmp_path / "target.yaml"  # as --discover writes it
    target.write_text(f'ablation:\n  target_neurons: "L{PLANTED_LAYER} N5, L{PLANTED_LAYER + 1} N5"\n')
    cfg = load_config(None, _overrides(sweep_model_dir, planted_dir, f"compare.neurons_from={target}",
                                       "wandb.mode=offline"), str(tmp_path / "OUT"))
    report = run_compare(cfg)
    assert report.numbers["first_differing_layer"] == PLANTED_LAYER
    folder = tmp_path / "OUT" / "compare"
    res = pl.read_parquet(folder / "residual.parquet")
    before, after = res.filter(pl.col("layer") < PLANTED_LAYER), res.filter(pl.col("layer") >= PLANTED_LAYER)
    assert (before["max_abs_diff"] == 0.0).all() and (before["cos"] == 1.0).all()
    assert (after["max_abs_diff"] > 0).all() and (after["one_minus_cos"] > 0).all()
    lens = pl.read_parquet(folder / "lens.parquet")
    a, b = (lens.filter((pl.col("side") == s) & (pl.col("layer") < PLANTED_LAYER)).drop("side", "model")
            for s in ("a", "b"))
    assert a.equals(b)
    neurons = pl.read_parquet(folder / "neurons.parquet")
    # The planted layer's own down_proj input is upstream of the change; the next layer's is not.
    assert (neurons.filter(pl.col("layer") == PLANTED_LAYER)["diff"] == 0.0).all()
    assert (neurons.filter(pl.col("layer") == PLANTED_LAYER + 1)["diff"] != 0.0).all()
    assert any(f"differ from layer {PLANTED_LAYER} on" in line for line in report.lines())

    run = read_run(report.wandb_dir)
    assert run["job_type"] == "compare" and run["summary"]["compare/first_differing_layer"] == PLANTED_LAYER
    curve = {step["layer"]: step["compare/one_minus_cos"] for step in run["history"] if "layer" in step}
    assert sorted(curve) == list(range(N_LAYERS))
    assert all(curve[k] == 0 for k in range(PLANTED_LAYER)) and curve[PLANTED_LAYER] > 0
    (art,) = [x for x in run["artifacts"] if x["type"] == tracking.COMPARE_ARTIFACT_TYPE]
    assert {"compare/residual.parquet", "compare/neurons.parquet", "compare/figures/compare_all.png"} <= set(art["files"])


@pytest.mark.parametrize("extra, message", [
    (("model.path=[only]",), r"model.path: --compare needs exactly two models \(a, b\), got 1"),
    (("model.path=[a, b, c]",), r"model.path: --compare needs exactly two models \(a, b\), got 3"),
    (("compare.neurons=L1 N1", "compare.neurons_from=t.yaml"), r"compare.neurons and compare.neurons_from 't.yaml'"),
    (("compare.neurons_from=missing.yaml",), r"compare.neurons_from 'missing.yaml': no such file"),
    (("compare.neurons=L36 N0",), r"compare.neurons: L36 N0: model has 36 layers \(0-35\)"),
])
def test_bad_input_is_refused_before_any_model_loads(sweep_model_dir, tmp_path, extra, message):
    cfg = load_config(None, _overrides(sweep_model_dir, sweep_model_dir, *extra), str(tmp_path / "OUT"))
    with pytest.raises(CompareError, match=message):
        run_compare(cfg)
    assert not (tmp_path / "OUT").exists()


def test_a_neurons_file_without_neurons_is_refused(sweep_model_dir, tmp_path):
    heads_only = tmp_path / "target.yaml"
    heads_only.write_text('ablation:\n  target_heads: "L3 H13"\n')
    cfg = load_config(None, _overrides(sweep_model_dir, sweep_model_dir, f"compare.neurons_from={heads_only}"),
                      str(tmp_path / "OUT"))
    with pytest.raises(CompareError, match="has no ablation.target_neurons"):
        run_compare(cfg)


def test_models_of_one_name_with_different_tokenizers_are_refused(sweep_model_dir, tmp_path):
    """Two folders both called `model` (their names collide; their paths do not): the tokenizers are
    still compared, one per path, and a vocabulary that differs by one token is refused."""
    a, b = tmp_path / "base" / "model", tmp_path / "tuned" / "model"
    for folder in (a, b):
        shutil.copytree(sweep_model_dir, folder)
    tok = AutoTokenizer.from_pretrained(b)
    tok.add_tokens(["<verif_extra>"])
    tok.save_pretrained(b)
    cfg = load_config(None, _overrides(a, b), str(tmp_path / "OUT"))
    with pytest.raises(CompareError, match=rf"model.path: '{a}' and '{b}' have different tokenizers"):
        run_compare(cfg)
    assert not (tmp_path / "OUT").exists()


def test_a_compare_folder_is_refused_or_resumed_with_its_own_config(seed_model_dir, tmp_path):
    """A compare's folder is never overwritten (issue 19: a re-run with prompts.seed=5 replaced the seed-0
    results): refused without --resume, and --resume computes it again only with the config it was started
    with. Both before any model is read."""
    cfg = load_config(None, _overrides(seed_model_dir, seed_model_dir), str(tmp_path / "OUT"))
    folder = tmp_path / "OUT" / "compare"
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"job": "compare", "config": cfg.to_dict(), "shards": {}}))
    with pytest.raises(InputError, match="compare already holds the output of a compare job; pass --resume"):
        run_compare(cfg)
    seed5 = load_config(None, _overrides(seed_model_dir, seed_model_dir, "prompts.seed=5"), str(tmp_path / "OUT"))
    with pytest.raises(InputError, match=r"^--resume: the config differs from the one \S+/compare was started with: "
                                         r"prompts.seed: 0 -> 5$"):
        run_compare(seed5, resume=True)
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json"]
