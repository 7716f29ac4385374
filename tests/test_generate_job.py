"""The generate job (`launch.py --generate`) on seed-shaped models, in this process.

A random-weight model writes no attempt line, so the way from generated outputs to a sweep is shown
with a scripted seed-shaped model whose continuation is known in advance (`build_scripted_model`);
sharding, resume and the seeds of sampling are checked on the random one, against one plain call of
`verif.model.generate.generate` over the whole run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import polars as pl
import pytest
import torch
from polars.testing import assert_frame_equal
from transformers import AutoTokenizer, Qwen2ForCausalLM

import launch
from jobs import tracking
from jobs.config import load_config
from jobs.errors import InputError
from jobs.generate import GenerateError, generation_settings, run_generate
from tests.support.models import seed_shaped_config
from tests.support.sweeps import sweep_overrides
from tests.support.wandb_records import read_run
from verif.model.generate import generate
from verif.model.loading import load_model
from verif.task.countdown import generate_problems
from verif.task.tinyzero import generation_prompt

SCRIPT = "\n- 3*5+4=19"  # one attempt line, then the end-of-sequence token
PROBLEMS = [([3, 5, 4], 19), ([2, 7, 9], 19), ([8, 1, 6], 40)]  # the attempt is right for the first only
SCRIPT_MARGIN = 100.0  # logit of the scripted token x sqrt(hidden) after the final norm: ~1100 above the rest


def build_scripted_model(out: Path, tokenizer_dir: Path, text: str, after: str) -> Path:
    """A seed-shaped Qwen2 (36 x 16 heads, the vocabulary of `tokenizer_dir`) that continues any prompt whose last
    token is `after` with `text`, then its end-of-sequence token, whether it decodes greedily or samples.

    Every attention and MLP output projection is zero, so the residual stream at a position is its
    token's embedding and the next token depends on the current token alone. Each token of the script
    gets its own embedding axis, which the untied unembedding maps to the next token of the script.
    """
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    (start,) = tok.encode(after, add_special_tokens=False)
    chain = [start, *tok.encode(text, add_special_tokens=False), tok.eos_token_id]
    assert len(set(chain[:-1])) == len(chain) - 1, "a token may appear once: the next token follows from it alone"
    config = seed_shaped_config(vocab_size=len(tok))
    config.tie_word_embeddings = False
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embed, unembed = model.model.embed_tokens.weight, model.lm_head.weight
        unembed.zero_()
        for axis, (token, following) in enumerate(zip(chain, chain[1:])):
            embed[token] = 0.0
            embed[token, axis] = 1.0
            unembed[following, axis] = SCRIPT_MARGIN
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(tokenizer_dir) / name, out / name)
    return out


@pytest.fixture(scope="module")
def scripted_dir(sweep_model_dir, tmp_path_factory) -> Path:
    return build_scripted_model(tmp_path_factory.mktemp("scripted"), sweep_model_dir, SCRIPT, after=">")


@pytest.fixture(scope="module")
def problems_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("problems") / "problems.jsonl"
    path.write_text("".join(json.dumps({"nums": nums, "target": target}) + "\n" for nums, target in PROBLEMS))
    return path


def _argv(mode: str, out: Path, settings: list[str]) -> list[str]:
    argv = [mode, "--out", str(out)]
    for item in settings:
        argv += ["--set", item]
    return argv


def _seed_cfg(model_dir: Path, out: Path, *extra: str):
    """A sampled run on the random seed-shaped model: 4 problems x 2 samples, 2 problems per shard."""
    return load_config(None, [
        f"model.path={model_dir}", "model.dtype=float32", "model.device=cpu", "generate.n_problems=4",
        "generate.do_sample=true", "generate.n=2", "generate.batch_size=4", "generate.problems_per_shard=2",
        "generate.max_new_tokens=4", "ray.workers=0", "wandb.mode=disabled", *extra], out=str(out))


def test_generate_end_to_end_feeds_a_sweep(scripted_dir, problems_file, sweep_model_dir, tmp_path, capsys):
    gen_out = tmp_path / "GEN"
    assert generation_prompt(*PROBLEMS[0]).endswith("<think>")  # whose last token starts the script
    rc = launch.main(_argv("--generate", gen_out, [
        f"model.path={scripted_dir}", "model.dtype=float32", "model.device=cpu",
        f"generate.problems_file={problems_file}", "generate.max_new_tokens=16", "generate.batch_size=2",
        "generate.problems_per_shard=2", "ray.workers=0", "wandb.mode=offline"]))
    printed = capsys.readouterr().out
    assert rc == 0, printed
    n_script = len(AutoTokenizer.from_pretrained(scripted_dir).encode(SCRIPT, add_special_tokens=False))
    gen = pl.read_parquet(gen_out / "generations.parquet")
    assert gen["problem_id"].to_list() == [0, 1, 2] and gen["sample"].to_list() == [0, 0, 0]
    assert [(n, t) for n, t in zip(gen["nums"].to_list(), gen["target"].to_list())] == PROBLEMS
    assert gen["output_text"].to_list() == [SCRIPT] * 3
    assert gen["finish"].to_list() == ["eos"] * 3 and gen["n_new_tokens"].to_list() == [n_script + 1] * 3
    assert not gen["correct"].any() and set(gen["reason"]) == {"no <answer> on the last line"}
    attempts = pl.read_parquet(gen_out / "attempts.parquet")
    assert attempts["attempt"].to_list() == ["3*5+4=19"] * 3
    assert attempts["label"].to_list() == [True, False, False] and attempts["source_row"].to_list() == [0, 1, 2]
    manifest = json.loads((gen_out / "manifest.json").read_text())
    assert manifest["job"] == "generate" and {e["status"] for e in manifest["shards"].values()} == {"done"}
    assert sorted(manifest["shards"]) == ["p000000", "p000002"]
    assert f"generations: {gen_out / 'generations.parquet'}" in printed and "attempts: 3 " in printed

    (run_dir,) = (gen_out / "wandb" / "wandb").glob("offline-run-*")
    run = read_run(run_dir)
    assert run["job_type"] == "generate"
    summary = run["summary"]
    assert (summary["generate/n_samples"], summary["generate/fraction_correct"]) == (3, 0.0)
    assert summary["generate/n_attempts_correct"] == 1 and summary["generate/tokens_per_s"] > 0
    assert any("tables/generations" in step for step in run["history"])
    (art,) = [a for a in run["artifacts"] if a["type"] == tracking.GENERATIONS_ARTIFACT_TYPE]
    assert set(art["files"]) == {"generations.parquet", "attempts.parquet"}

    # The outputs are a sweep's prompts.file as they are, and its W&B run names them as its input.
    sweep_out = tmp_path / "SWEEP"
    rc = launch.main(_argv("--sweep", sweep_out, sweep_overrides(
        sweep_model_dir, "ray.workers=0", f"prompts.file={gen_out / 'generations.parquet'}", "wandb.mode=offline")))
    assert rc == 0, capsys.readouterr().err
    (sweep_run,) = (sweep_out / "wandb" / "wandb").glob("offline-run-*")
    (used,) = [a for a in read_run(sweep_run)["artifacts"] if a["use_after_commit"]]
    assert (used["name"], used["type"], used["digest"]) == (art["name"], art["type"], art["digest"])
    prompts = pl.read_parquet(sweep_out / "prompts.parquet")
    cols = ["numbers", "target", "attempt", "label", "source_row"]
    assert_frame_equal(prompts.select(cols), attempts.select(cols))
    results = pl.read_parquet(sweep_out / "results" / "*.parquet")
    assert results.height == 3 * 4 and results["p_yes_norm"].is_finite().all()  # 4 conditions per prompt


def test_shards_equal_one_whole_run_and_resume_recomputes_only_what_is_missing(sweep_model_dir, tmp_path):
    out = tmp_path / "GEN"
    cfg = _seed_cfg(sweep_model_dir, out)
    first = run_generate(cfg)
    assert (first.ran.shards, first.shards_skipped) == (2, 0)
    gen = pl.read_parquet(out / "generations.parquet")

    # Two shards of 2 problems give what one call over all 4 problems gives (same batches, same seeds).
    problems = generate_problems(4, seed=0)
    loaded = load_model(str(sweep_model_dir), dtype="float32", device="cpu")
    whole = generate(loaded, [generation_prompt(p.numbers, p.target) for p in problems], **generation_settings(cfg))
    assert gen["output_text"].to_list() == [s.text for s in whole.samples]
    assert gen["n_new_tokens"].to_list() == [s.n_new_tokens for s in whole.samples]
    assert gen["nums"].to_list() == [list(problems[s.prompt_index].numbers) for s in whole.samples]
    texts = gen.group_by("problem_id").agg(pl.col("output_text").n_unique())["output_text"]
    assert (texts == 2).any()  # sampled: a problem's two samples differ

    # No output of a random model has an attempt line: an empty attempts table, said so, no failure.
    assert pl.read_parquet(out / "attempts.parquet").height == 0
    assert any('no output has a line starting with "- "' in line for line in first.lines())

    kept = out / "results" / "p000000.parquet"
    mtime = kept.stat().st_mtime_ns
    (out / "results" / "p000002.parquet").unlink()
    again = run_generate(_seed_cfg(sweep_model_dir, out, "prompts.n=3", "wandb.mode=disabled"), resume=True)
    assert (again.ran.shards, again.shards_skipped) == (1, 1)
    assert again.recomputed == {"p000002": "missing"}
    assert kept.stat().st_mtime_ns == mtime
    assert_frame_equal(pl.read_parquet(out / "generations.parquet"), gen, check_exact=True)

    with pytest.raises(GenerateError, match=r"--resume: the config differs.*generate.max_new_tokens: 4 -> 5"):
        run_generate(_seed_cfg(sweep_model_dir, out, "generate.max_new_tokens=5"), resume=True)
    with pytest.raises(InputError, match="already holds the output of a generate job; pass --resume"):
        run_generate(cfg)


@pytest.mark.parametrize("settings, message", [
    (["model.path=[a, b]"], r"model.path: --generate runs one model, got 2 \(a, b\)"),
    (["generate.n=2"], r"generate.n 2: greedy decoding gives 2 identical samples"),
    (["generate.batch_size=4", "generate.problems_per_shard=3"],
     r"generate.problems_per_shard 3: must be a multiple of .*generate.batch_size 4 // generate.n 1 = 4"),
    (["generate.problems_file=missing.jsonl"], r"generate.problems_file 'missing.jsonl': no such file"),
])
def test_bad_input_is_refused_before_anything_is_written(sweep_model_dir, tmp_path, capsys, settings, message):
    out = tmp_path / "GEN"
    argv = _argv("--generate", out, [f"model.path={sweep_model_dir}", "ray.workers=0", *settings])
    assert launch.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    with pytest.raises(InputError, match=message):  # a GenerateError, or the shared checks' (jobs.inputs)
        run_generate(load_config(None, argv[4::2], str(out)))
    assert not out.exists()


def test_a_sweep_folder_is_not_resumed_as_a_generate_job(sweep_model_dir, tmp_path):
    out = tmp_path / "OUT"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"job": "sweep", "config": {}, "shards": {}}))
    with pytest.raises(InputError, match="holds the output of a sweep job, not of a generate job"):
        run_generate(_seed_cfg(sweep_model_dir, out), resume=True)
