"""The sweep engine end to end: Ray workers, resume, what --resume trusts, configuration errors.

Ray runs, and faults injected from outside (signals, killed processes, lost nodes), are in
test_faults.py (drivers on a local Ray) and test_cluster.py (a simulated multi-node cluster, equal to
the in-process run bit for bit); the small sweep they all share is tests.support.sweeps.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import polars as pl
import pytest

import launch
from jobs.config import ConfigError, load_config, reference_markdown
from jobs.errors import InputError
from jobs.runtime.storage import OutDir
from jobs.sweep import SweepError, prepare, run_sweep
from tests.support.families import score_tolerance
from tests.support.sweeps import N_ROWS, N_SHARDS, assert_same_results, manifest, sweep_cfg, sweep_overrides
from verif.design.conditions import Ablation
from verif.design.heads import STUDY_HEADS_TEXT, canonical, parse_heads
from verif.model.engine import EngineOptions, Scorer
from verif.model.loading import load_model
from verif.model.score import resolve_yes_no
from verif.task.prompts import POST, STUDY

REPO = Path(__file__).resolve().parent.parent


def finished_copy(sweep_reference, tmp_path: Path) -> Path:
    """A copy of the reference's finished OUT folder to damage."""
    out = tmp_path / "OUT"
    shutil.copytree(sweep_reference[1], out)
    return out


def test_existing_out_needs_resume(sweep_model_dir, sweep_reference, tmp_path):
    out = finished_copy(sweep_reference, tmp_path)
    with pytest.raises(InputError, match="already holds the output of a sweep job; pass --resume"):
        run_sweep(sweep_cfg(sweep_model_dir, out, "ray.workers=0"))


def test_resume_with_changed_config_is_refused(sweep_model_dir, sweep_reference, tmp_path):
    out = finished_copy(sweep_reference, tmp_path)
    before = {p.name: p.stat().st_mtime_ns for p in OutDir(out).results.iterdir()}
    changed = sweep_cfg(sweep_model_dir, out, "ray.workers=0", "ablation.random_controls=3", "prompts.seed=7")
    with pytest.raises(SweepError, match=r"ablation.random_controls: 2 -> 3.*prompts.seed: 0 -> 7"):
        run_sweep(changed, resume=True)
    # Keys that change no number (workers, engine chunking, W&B) may differ on resume.
    ok = sweep_cfg(sweep_model_dir, out, "ray.workers=0", "engine.max_rows=5")
    assert run_sweep(ok, resume=True).shards_run == 0
    assert {p.name: p.stat().st_mtime_ns for p in OutDir(out).results.iterdir()} == before


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_resume_recomputes_every_untrustworthy_shard(sweep_model_dir, sweep_reference, tmp_path, capsys):
    """Truncated, corrupt, missing and unrecorded shard files are named and recomputed, never read;
    a killed writer's temp file and its stale lock are cleaned up; intact shards are not touched."""
    out = OutDir(finished_copy(sweep_reference, tmp_path))
    ids = sorted(out.shard_files())
    truncated, corrupt, missing, unrecorded = ids[:4]
    with open(out.shard(truncated), "r+b") as fh:
        fh.truncate(fh.seek(0, os.SEEK_END) // 2)
    data = bytearray(out.shard(corrupt).read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the column data, footer intact
    out.shard(corrupt).write_bytes(bytes(data))
    out.shard(missing).unlink()
    m = json.loads(out.manifest.read_text())
    m["shards"][unrecorded]["status"] = "pending"  # killed after the rename, before the manifest update
    out.manifest.write_text(json.dumps(m))
    leftover = out.results / f".{ids[4]}.parquet.tmp-{_dead_pid()}"
    leftover.write_bytes(b"PAR1 half a file")
    out.lock.write_text(json.dumps({"pid": _dead_pid(), "host": "gone", "started": "then"}))
    intact = {i: out.shard(i).stat().st_mtime_ns for i in ids[4:]}

    report = run_sweep(sweep_cfg(sweep_model_dir, out.root, "ray.workers=0"), resume=True)
    err = capsys.readouterr().err
    assert sorted(report.recomputed) == sorted([truncated, corrupt, missing, unrecorded])
    assert "truncated" in report.recomputed[truncated] and "corrupt" in report.recomputed[corrupt]
    assert report.recomputed[missing] == "missing" and "not recorded" in report.recomputed[unrecorded]
    for shard_id in report.recomputed:
        assert f"shard {shard_id}: " in err
    assert "taking over the lock of pid" in err and "host gone" in err
    assert report.shards_run == 4 and report.shards_skipped == N_SHARDS - 4
    assert {i: out.shard(i).stat().st_mtime_ns for i in ids[4:]} == intact
    assert not leftover.exists() and not out.lock.exists()
    assert_same_results(out.read_results(), sweep_reference[0])
    entries = manifest(out.root)["shards"]
    assert all(e["status"] == "done" and e["rows"] == N_ROWS // N_SHARDS for e in entries.values())


def test_corrupt_manifest_is_a_clear_error(sweep_model_dir, sweep_reference, tmp_path, capsys):
    out = finished_copy(sweep_reference, tmp_path)
    (out / "manifest.json").write_text('{"config": {"name": "sweep"}, "shards": {')
    args = ["--sweep", "--resume", "--out", str(out)]
    for item in sweep_overrides(sweep_model_dir):
        args += ["--set", item]
    assert launch.main(args) == 2
    err = capsys.readouterr().err
    assert f"{out / 'manifest.json'} is unreadable or not valid JSON" in err
    assert "Start the sweep again in a new --out" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "override, message",
    [
        ("ablation.random_contols=3", "ablation.random_contols: unknown key; did you mean random_controls?"),
        ("prompts.n=many", "prompts.n: expected int, got str 'many'"),
        ("prompts.n=0", "prompts.n: must be >= 1"),
        ("wandb.mode=cloud", "wandb.mode: must be one of 'offline', 'online', 'disabled'"),
        ("ablation.sweeps=[heads]", "ablation.sweeps: unknown sweep 'heads'"),
        ("model.dtype=true", "model.dtype: expected str, got bool"),
        ("engine.max_rows=0", "engine.max_rows: must be >= 1"),
        ("engine.max_rows=big", "engine.max_rows: must be a whole number >= 1 or 'auto'"),
        ("engine.max_rows=2.5", "engine.max_rows: expected int or str, got float 2.5"),
        ("ablation.target_heads=L-1 H3", "ablation.target_heads: cannot parse head 'L-1'"),
        ("ablation.target_heads=garbage", "ablation.target_heads: cannot parse head 'garbage'"),
    ],
)
def test_config_errors_name_the_key(override, message, tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override], str(tmp_path / "out"))
    assert message in str(err.value)


def test_yaml_error_is_one_line_with_its_position(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("prompts:\n  n: [1, 2\nablation: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    assert str(err.value).startswith(f"{bad}:3:9: not valid YAML: ") and "\n" not in str(err.value)


def _cli(capsys, *args: str) -> tuple[int, str]:
    code = launch.main(list(args))
    return code, capsys.readouterr().err


def test_cli_errors_before_any_shard(seed_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["--sweep", "--out", str(out), "--set", f"model.path={seed_model_dir}", "--set", "model.device=cpu"]
    cases = [
        (["--set", "ablation.target_heads=L17 H16"], "L17 H16: model has 16 heads per layer (0-15)"),
        (["--set", "ablation.target_heads=L36 H0"], "L36 H0: model has 36 layers (0-35)"),
        (["--set", "ablation.target_heads=L3 H1, 3.1"], "duplicate heads: L3 H1"),
        (["--set", "model.path=/no/such/model"], "'/no/such/model': no such file or folder"),
        (["--set", "scoring.yes=[' Yesss']"], "variant ' Yesss' encodes to 3 tokens"),
        (["--set", "ablation.random_contols=3"], "did you mean random_controls?"),
        (["--config", str(tmp_path / "missing.yaml")], "no such file"),
        (["--set", "ablation.target_heads=L3 H1", "--set", "ablation.match_layers=true", "--set",
          "ablation.random_controls=20"], "ablation.random_controls: only 15 distinct control sets of 1 heads"),
    ]
    for extra, message in cases:
        code, err = _cli(capsys, *base, *extra)
        assert code == 2, (extra, err)
        assert message in err, (extra, err)
        assert not (out / "results").exists()


def test_tinyzero_config_validates():
    cfg = load_config(REPO / "configs" / "tinyzero_qwen2.5_3b.yaml")
    assert cfg.model.path == "Qwen/Qwen2.5-3B"
    assert cfg.ablation.random_controls == 100 and cfg.prompts.n == 1024
    assert cfg.model.dtype == "bfloat16" and cfg.ray.gpus_per_worker == 1
    # The config spells the study's heads out for readers; they must be the study's heads.
    assert canonical(parse_heads(cfg.ablation.target_heads)) == canonical(parse_heads(STUDY_HEADS_TEXT))


def test_tinyzero_config_runs_on_seed_shaped_model(sweep_model_dir, tmp_path):
    """The study's config with only the model swapped (and sizes cut for a CPU): 29 heads are valid."""
    overrides = [
        f"model.path={sweep_model_dir}", "model.device=cpu", "model.dtype=float32", "ray.address=",
        "ray.workers=0", "prompts.n=4", "ablation.random_controls=2", "wandb.mode=disabled", "stats.n_boot=50",
        "engine.compile=false",
    ]
    cfg = load_config(REPO / "configs" / "tinyzero_qwen2.5_3b.yaml", overrides, str(tmp_path))
    plan = prepare(cfg)
    target = next(c for c in plan.conditions if c.kind == "target")
    assert len(target.heads) == 29
    report = run_sweep(cfg)
    assert report.rows_written == 4 * 4
    figures = report.finalized.figures
    assert all(p.suffix == ".png" for p in figures) and figures


def _reference_problems(readme: str) -> list[str]:
    """How the README's configuration reference differs from `--config-reference`: it must be there once, as one
    table with exactly the generated rows, and no row of it may appear anywhere else."""
    want = reference_markdown().splitlines()
    lines = readme.splitlines()
    starts = [i for i, line in enumerate(lines) if line == want[0]]
    if len(starts) != 1:
        return [f"the table's header appears {len(starts)} times"]
    block = list(itertools.takewhile(lambda line: line.startswith("|"), lines[starts[0]:]))
    problems = [f"stale or missing: {line}" for line in want if line not in block]
    problems += [f"not generated: {line}" for line in block if line not in want]
    counts = Counter(line for line in lines if line in want[2:])  # the rows (other tables share the separator)
    problems += [f"appears {n} times: {line}" for line, n in counts.items() if n > 1]
    return problems


def test_readme_holds_the_generated_config_reference():
    problems = _reference_problems((REPO / "README.md").read_text())
    assert not problems, f"README configuration reference: regenerate it (--config-reference): {problems}"
    # The bug this replaced: rows repeated after the table (a blank line, then generate.* and compare.* again).
    doubled = (REPO / "README.md").read_text().replace(
        reference_markdown(), reference_markdown() + "\n\n" + "\n".join(reference_markdown().splitlines()[-4:]))
    assert any(p.startswith("appears 2 times: | `compare.") for p in _reference_problems(doubled))



def test_neuron_target_sweep_with_self_check(sweep_model_dir, tmp_path):
    """A target of heads and neurons end to end (in-process): conditions name both, controls match both
    counts, the worker's fast-path self-check is in the manifest, and the target's rows equal the engine
    scoring the same ablation directly."""
    cfg = sweep_cfg(sweep_model_dir, tmp_path / "out", "ray.workers=0", "prompts.n=3", "shards.prompts_per_shard=3",
                    "ablation.target_heads=L17 H14", "ablation.target_neurons=L17 N3, L20 N100")
    report = run_sweep(cfg)
    out = OutDir(tmp_path / "out")
    conditions = pl.read_parquet(out.conditions)
    target = conditions.filter(kind="target").row(0, named=True)
    assert (target["heads"], target["neurons"], target["n_neurons"]) == ("L17 H14", "L17 N3, L20 N100", 2)
    assert conditions.filter(kind="random")["n_neurons"].to_list() == [2, 2]
    assert conditions.filter(kind="random")["n_heads"].to_list() == [1, 1]
    (worker,) = manifest(out.root)["workers"]
    check = worker["self_check"]
    assert check["path"] == "fast" and check["max_abs_diff"] <= check["tolerance"]
    assert report.rows_written == 3 * 4
    loaded = load_model(str(sweep_model_dir), dtype="float32", device="cpu")
    scorer = Scorer(loaded, resolve_yes_no(loaded.tokenizer), EngineOptions())
    prompts = pl.read_parquet(out.prompts)["prompt"].to_list()
    want = scorer.score_prompts(prompts, [Ablation(((17, 14),), ((17, 3), (20, 100)))]).log_odds[:, 0]
    got = out.read_results().filter(condition="target").sort("prompt_id")["log_odds"].to_numpy()
    # one condition alone against four sharing a trunk: other GEMM shapes, float32 rounding of a 36-layer
    # forward (tests/support/families.score_tolerance); a wrong neuron index moves log-odds by ~1e-2
    np.testing.assert_allclose(got, want, rtol=0, atol=score_tolerance(36, 128, want).max())


def test_sweep_on_chain_of_thought_outputs_with_the_post_template(sweep_model_dir, tmp_path):
    """Model outputs as prompts.file: attempts extracted, labelled, rendered with the chosen template;
    the template is recorded, and a resume with another template text is refused."""
    outputs = tmp_path / "outputs.jsonl"
    rows = [
        {"nums": [79, 17, 60], "target": 36, "output_text": "- 79 - 60 + 17 = 19 + 17 = 36 (this works)"},
        {"nums": [3, 5, 7], "target": 22, "output_text": "no attempt here"},
        {"nums": [3, 5, 7], "target": 22, "output_text": "- 3 * 5 + 7 = 15 + 7 = 23\n- 3 * 5 + 7 = 15 + 7 = 22"},
    ]
    outputs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    template = tmp_path / "template.txt"
    template.write_text(POST.text + "\n")
    out = tmp_path / "out"
    cfg = sweep_cfg(sweep_model_dir, out, "ray.workers=0", f"prompts.file={outputs}", f"prompts.template={template}")
    report = run_sweep(cfg)
    prompts = pl.read_parquet(OutDir(out).prompts)
    assert prompts["attempt"].to_list() == ["79 - 60 + 17 = 19 + 17 = 36", "3 * 5 + 7 = 15 + 7 = 22"]
    assert prompts["label"].to_list() == [True, True] and prompts["source_row"].to_list() == [0, 2]
    assert prompts["prompt"][0] == POST.render([79, 17, 60], 36, "79 - 60 + 17 = 19 + 17 = 36")
    assert prompts["template"].unique().to_list() == [f"file:{template.resolve()}"]
    assert "1 without an attempt line" in "\n".join(report.lines())
    template.write_text(STUDY.text + "\n")
    with pytest.raises(SweepError, match="prompts.template: the template text changed"):
        run_sweep(cfg, resume=True)
