"""Bad input costs one clear line, never a traceback, a half-made folder or the machine's memory (issue 14).

Every input of the issue's table, and the configuration errors that already worked, runs through
`launch.py` in a subprocess as a user runs it, and each must give: exit code 2, exactly one line on
stderr naming the key or the file (and line), no traceback, nothing created where OUT would go, and
nothing changed in an existing folder. Errors the configuration or a path alone decides must come
before torch, transformers or Ray are imported (seconds on 2 cores): that is asserted from the modules
the process had loaded when it exited, never from a timing. The engine's own bound (no prompt makes a
forward chunk hold more than its token budget) is checked on the seed-shaped model without
allocating anything large.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from jobs.config import load_config
from jobs.errors import InputError
from jobs.inputs import check_prompt_lengths, token_limits
from jobs.runtime.lock import OutLock
from jobs.sweep import prepare
from tests.support.sweeps import sweep_overrides
from verif.model.engine import EngineOptions, Scorer
from verif.model.score import resolve_yes_no
from verif.task.prompts import STUDY

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "ray", "wandb")
# Runs launch.py as `python launch.py ARGS` would, then writes which heavy packages the process had
# imported by the time it exited (to $HEAVY_OUT): the deterministic cause of a slow error.
RUNNER = (
    "import atexit, json, os, runpy, sys\n"
    f"heavy = {HEAVY!r}\n"
    "atexit.register(lambda: open(os.environ['HEAVY_OUT'], 'w').write(json.dumps(\n"
    "    sorted({m.split('.')[0] for m in sys.modules} & set(heavy)))))\n"
    "sys.argv = ['launch.py', *sys.argv[1:]]\n"
    "runpy.run_path('launch.py', run_name='__main__')\n"
)
SHORT = {"numbers": [79, 17, 60], "target": 36, "attempt": "79 - 60 + 17 = 19 + 17 = 36"}


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# The study template shows the attempt twice: "1+1+...+1" of n ones is 2n - 1 tokens each time.
MIXED_ONES = 1_250


def _long_attempt(n_ones: int) -> dict:
    return {"numbers": [1, 2], "target": 3, "attempt": "+".join(["1"] * n_ones)}


@pytest.fixture(scope="module")
def files(tmp_path_factory, seed_model_dir) -> Path:
    """Every bad input of the table, made once (the cases only read them)."""
    d = tmp_path_factory.mktemp("bad_input")
    (d / "empty.jsonl").write_text("")
    (d / "blank.jsonl").write_text("\n   \n\t\n")
    _jsonl(d / "newline.jsonl", [SHORT, {**SHORT, "attempt": "79 - 60 + 17\n= 36"}])
    _jsonl(d / "long.jsonl", [SHORT, _long_attempt(10_000)])  # 20,000 characters, ~40,000 tokens
    _jsonl(d / "mixed.jsonl", [SHORT, SHORT, _long_attempt(MIXED_ONES), SHORT])  # ~5,160 tokens among 3 short
    (d / "latin1.jsonl").write_bytes(json.dumps(SHORT).encode() + b"\n" + b'{"attempt": "caf\xe9"}\n')
    (d / "json.jsonl").write_text(json.dumps(SHORT) + "\n{not json\n")
    (d / "folder.jsonl").mkdir()
    unreadable = d / "unreadable.jsonl"
    _jsonl(unreadable, [SHORT]).chmod(0o000)
    (d / "a_file").write_text("not a folder\n")
    (d / "notes").mkdir()
    (d / "notes" / "todo.txt").write_text("mine\n")
    (d / "locked").mkdir()
    unwritable = d / "unwritable"
    unwritable.mkdir()
    unwritable.chmod(0o555)
    (d / "bad.yaml").write_text("prompts:\n  n: [1, 2\nablation: 3\n")
    (d / "list.yaml").write_text("- a\n- b\n")
    (d / "typo.yaml").write_text("prompts:\n  n: 4\nablation:\n  random_contols: 3\n")
    return d


def _unreadable(files: Path) -> str:
    """A file this process cannot read: mode 000, or (root reads any mode) a write-only procfs entry,
    whose mode the kernel enforces for root too."""
    path = files / "unreadable.jsonl"
    return str(path) if not os.access(path, os.R_OK) else "/proc/sys/vm/compact_memory"


def _unwritable(files: Path) -> str:
    """A folder this process cannot write: mode 555, or (root writes any mode) a /proc/<pid> folder."""
    path = files / "unwritable"
    return str(path) if not os.access(path, os.W_OK) else "/proc/1"


@dataclass(frozen=True)
class Case:
    """One bad input: launch.py's arguments and what its one line must name ({files}, {model}, {out}
    are filled in); `light`: refused before torch/transformers/Ray load; `out`: where OUT goes
    (default: a fresh path inside an empty folder that must stay empty)."""

    id: str
    args: tuple[str, ...]
    named: tuple[str, ...]
    light: bool = True
    out: str | None = None


def sweep(*args: str) -> tuple[str, ...]:
    return ("--sweep", "--set", "model.path={model}", "--set", "ray.workers=0", "--set", "wandb.mode=disabled", *args)


def check(*args: str) -> tuple[str, ...]:
    return ("--check", "--set", "model.path={model}", *args)


CASES = [
    # -- the issue's table ------------------------------------------------------------------------------------
    Case("prompts-file-missing", sweep("--set", "prompts.file={files}/absent.jsonl"),
         ("prompts.file", "absent.jsonl", "no such file")),
    Case("prompts-file-empty", sweep("--set", "prompts.file={files}/empty.jsonl"),
         ("prompts.file", "empty.jsonl", "no records (the file is empty)")),
    Case("prompts-file-blank-only", sweep("--set", "prompts.file={files}/blank.jsonl"),
         ("prompts.file", "blank.jsonl", "every line is blank")),
    Case("attempt-of-20000-characters", sweep("--set", "prompts.file={files}/long.jsonl"),
         ("{files}/long.jsonl:2: the prompt has {long_tokens} tokens", "prompts.max_tokens = 1024",
          "prompts.too_long=skip"), light=False),
    Case("attempt-of-5164-tokens-among-short", sweep("--set", "prompts.file={files}/mixed.jsonl"),
         ("{files}/mixed.jsonl:3: the prompt has {mixed_tokens} tokens", "prompts.max_tokens = 1024"), light=False),
    Case("attempt-with-a-newline", sweep("--set", "prompts.file={files}/newline.jsonl"),
         ("{files}/newline.jsonl:2: the attempt", "line break", "prompts.line_breaks=join")),
    Case("out-not-writable", sweep(), ("{out}", "is not writable"), out="{unwritable}/OUT"),
    Case("out-parent-is-a-file", sweep(), ("{files}/a_file is a file, not a folder",), out="{files}/a_file/OUT"),
    Case("resume-without-folder", sweep("--resume"), ("--resume: nothing to resume in {out}",), out="{new}"),
    Case("out-non-empty-without-sweep", sweep(), ("{files}/notes is not empty and holds no sweep", "todo.txt"),
         out="{files}/notes"),
    # the other sharded jobs check their folders as early (OUT/discovery for --discover)
    Case("discover-resume-without-folder", ("--discover", "--set", "model.path={model}", "--resume"),
         ("--resume: nothing to resume in {out}/discovery",), out="{new}"),
    Case("generate-out-non-empty", ("--generate", "--set", "model.path={model}"),
         ("{files}/notes is not empty and holds no generate", "todo.txt"), out="{files}/notes"),
    Case("target-heads-L-1", sweep("--set", "ablation.target_heads=L-1 H3"), ("ablation.target_heads", "'L-1'")),
    Case("target-heads-garbage", sweep("--set", "ablation.target_heads=garbage"),
         ("ablation.target_heads", "'garbage'")),
    Case("more-controls-than-sets", sweep("--set", "ablation.target_heads=L3 H1", "--set", "ablation.match_layers=true",
                                          "--set", "ablation.random_controls=20"),
         ("ablation.random_controls", "only 15 distinct control sets"), light=False),
    Case("malformed-yaml", ("--sweep", "--config", "{files}/bad.yaml"), ("{files}/bad.yaml:3:9: not valid YAML",)),
    Case("config-typo-in-a-key", ("--check", "--config", "{files}/typo.yaml"),
         ("ablation.random_contols: unknown key; did you mean random_controls?",)),
    # -- more of the same kinds --------------------------------------------------------------------------------
    Case("prompts-file-unreadable", sweep("--set", "prompts.file={unreadable}"), ("prompts.file", "cannot be read")),
    Case("prompts-file-is-a-folder", sweep("--set", "prompts.file={files}/folder.jsonl"), ("folder.jsonl", "is a folder")),
    Case("prompts-file-not-utf8", sweep("--set", "prompts.file={files}/latin1.jsonl"),
         ("{files}/latin1.jsonl:2: not UTF-8",)),
    Case("prompts-file-bad-json", sweep("--set", "prompts.file={files}/json.jsonl"), ("{files}/json.jsonl:2: invalid JSON",)),
    Case("out-is-a-file", sweep(), ("{files}/a_file: it is a file",), out="{files}/a_file"),
    Case("resume-folder-without-sweep", sweep("--resume"), ("--resume: {files}/notes has no manifest.json",),
         out="{files}/notes"),
    Case("out-in-use-by-another-driver", sweep("--resume"), ("{files}/locked is in use by another sweep", "pid "),
         out="{files}/locked"),
    Case("line-breaks-option", sweep("--set", "prompts.line_breaks=fold"), ("prompts.line_breaks", "'error', 'join'")),
    Case("too-long-option", sweep("--set", "prompts.too_long=truncate"), ("prompts.too_long", "'error', 'skip'")),
    Case("max-tokens-zero", check("--set", "prompts.max_tokens=0"), ("prompts.max_tokens: must be >= 1",)),
    Case("bucket-ratio-below-one", sweep("--set", "engine.bucket_ratio=0.5"), ("engine.bucket_ratio: must be >= 1",)),
    # -- configuration errors that already were one line --------------------------------------------------------
    Case("unknown-key", sweep("--set", "ablation.random_contols=3"), ("did you mean random_controls?",)),
    Case("unknown-section", sweep("--set", "promts.n=3"), ("promts: unknown key; did you mean prompts?",)),
    Case("not-a-number", sweep("--set", "prompts.n=many"), ("prompts.n: expected int, got str 'many'",)),
    Case("below-minimum", sweep("--set", "prompts.n=0"), ("prompts.n: must be >= 1",)),
    Case("ratio-out-of-range", sweep("--set", "prompts.p_correct=1.5"), ("prompts.p_correct: must be between 0 and 1",)),
    Case("wandb-mode", sweep("--set", "wandb.mode=cloud"), ("wandb.mode: must be one of",)),
    Case("unknown-sweep", sweep("--set", "ablation.sweeps=[heads]"), ("ablation.sweeps: unknown sweep 'heads'",)),
    Case("bool-for-str", sweep("--set", "model.dtype=true"), ("model.dtype: expected str, got bool",)),
    Case("max-rows-zero", sweep("--set", "engine.max_rows=0"), ("engine.max_rows: must be >= 1",)),
    Case("max-rows-float", sweep("--set", "engine.max_rows=2.5"), ("engine.max_rows: expected int or str",)),
    Case("neurons-garbage", sweep("--set", "ablation.target_neurons=garbage"), ("ablation.target_neurons",)),
    Case("unknown-template", sweep("--set", "prompts.template=nosuch"), ("prompts.template",)),
    Case("extract-rule", sweep("--set", "prompts.extract=all"), ("prompts.extract: must be one of",)),
    Case("negative-workers", sweep("--set", "ray.workers=-1"), ("ray.workers: must be >= 0",)),
    Case("reserved-resource", sweep("--set", "ray.resources_per_worker={{GPU: 1}}"), ("ray.resources_per_worker",)),
    Case("section-not-a-mapping", sweep("--set", "model=3"), ("model: must be a mapping",)),
    Case("set-without-value", sweep("--set", "prompts.n"), ("--set 'prompts.n': expected dotted.key=value",)),
    Case("config-missing", ("--check", "--config", "{files}/absent.yaml"), ("absent.yaml", "no such file")),
    Case("config-not-a-mapping", ("--check", "--config", "{files}/list.yaml"), ("list.yaml: the top level must be a mapping",)),
    Case("no-mode", ("--out", "{out}"), ("one of the arguments --sweep",)),
    Case("unknown-flag", ("--sweep", "--bogus-flag"), ("unrecognized arguments: --bogus-flag",)),
    Case("weight-diff-without-base", ("--weight-diff",), ("--weight-diff needs --base and --tuned",)),
    # -- interventions (issue 20) -------------------------------------------------------------------------------
    Case("unknown-intervention-kind", sweep("--set", "ablation.kind=[zero, noise]"),
         ("ablation.kind: unknown intervention kind 'noise'", "'zero', 'mean', 'mean_positional', 'resample'")),
    Case("reference-file-does-not-parse", sweep("--set", "ablation.kind=mean", "--set",
                                                "ablation.reference={files}/json.jsonl"),
         ("ablation.reference: {files}/json.jsonl:2: invalid JSON",)),
    Case("reference-file-missing", sweep("--set", "ablation.reference={files}/absent.jsonl"),
         ("ablation.reference", "absent.jsonl", "no such file")),
    Case("circuit-with-an-empty-target", sweep("--set", "ablation.circuit=true", "--set", "ablation.target_heads="),
         ("ablation.circuit: a circuit keeps the target set", "ablation.target_heads", "empty")),
]


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under `root` with its size and modification time (lock files included)."""
    return {str(p.relative_to(root)): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in root.rglob("*")}


@pytest.fixture(scope="module")
def token_counts(files, seed_model_dir) -> dict[str, int]:
    """The long prompts' token counts, computed here from the rendered prompts (the messages must match)."""
    tok = AutoTokenizer.from_pretrained(str(seed_model_dir))

    def count(record: dict) -> int:
        return len(tok.encode(STUDY.render(record["numbers"], record["target"], record["attempt"]),
                              add_special_tokens=False))

    counts = {"long_tokens": count(_long_attempt(10_000)), "mixed_tokens": count(_long_attempt(MIXED_ONES))}
    assert counts["long_tokens"] > 20_000 and 5_000 < counts["mixed_tokens"] < 5_300  # the issue's sizes
    return counts


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_is_one_line_and_exit_2(case, files, seed_model_dir, token_counts, tmp_path):
    fill = {"files": files, "model": seed_model_dir, "unreadable": _unreadable(files),
            "unwritable": _unwritable(files), "new": tmp_path / "typo", **token_counts}
    out = Path(case.out.format(**fill)) if case.out else tmp_path / "runs" / "OUT"
    fill["out"] = out
    args = [a.format(**fill) for a in case.args]
    if "--out" not in args and case.id not in ("no-mode", "unknown-flag", "weight-diff-without-base"):
        args += ["--out", str(out)]
    heavy_out = tmp_path.parent / f"{tmp_path.name}.heavy.json"
    env = {**os.environ, "HEAVY_OUT": str(heavy_out), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    in_use = case.id == "out-in-use-by-another-driver"  # this process holds the folder's lock, as a driver does
    with OutLock(files / "locked" / ".lock") if in_use else contextlib.nullcontext():
        before = _snapshot(files)
        proc = subprocess.run([sys.executable, "-c", RUNNER, *args], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=120)
        after = _snapshot(files)
    err = proc.stderr
    assert proc.returncode == 2, (args, proc.returncode, err[-3000:])
    assert "Traceback" not in err + proc.stdout, err[-3000:]
    assert err.endswith("\n") and err.count("\n") == 1 and err.startswith("error: "), err
    for text in case.named:
        assert text.format(**fill) in err, (text.format(**fill), err)
    assert proc.stdout == ""
    if case.out is None or case.out == "{new}":
        assert list(tmp_path.iterdir()) == [], "the refused run created files"  # no OUT, no parent of it
    assert after == before, "the refused run changed an existing folder"
    heavy = json.loads(heavy_out.read_text())
    if case.light:
        assert heavy == [], f"{case.id}: refused only after importing {heavy}"
    else:
        assert "torch" in heavy  # honest labels: these need the model's config or tokenizer


def test_cases_cover_every_row_of_the_issue():
    """The issue's table, row by row, is in CASES (renaming a case must not drop a row silently)."""
    rows = {"prompts-file-missing", "prompts-file-empty", "prompts-file-blank-only", "attempt-of-20000-characters",
            "attempt-of-5164-tokens-among-short", "attempt-with-a-newline", "out-not-writable", "out-parent-is-a-file",
            "resume-without-folder", "out-non-empty-without-sweep", "target-heads-L-1", "target-heads-garbage",
            "more-controls-than-sets", "malformed-yaml", "config-typo-in-a-key"}
    assert rows <= {c.id for c in CASES}
    assert sum(c.light for c in CASES) >= 20 + 10


# ---------------------------------------------------------------- options that accept the input


def test_too_long_prompts_skipped_and_counted(files, seed_model_dir, tmp_path):
    """prompts.too_long: skip leaves the long prompt out, renumbers the rest and records it; prompts.line_breaks:
    join makes the attempt with a line break one line."""
    cfg = load_config(None, sweep_overrides(seed_model_dir, f"prompts.file={files / 'mixed.jsonl'}",
                                            "prompts.too_long=skip"), str(tmp_path / "out"))
    plan = prepare(cfg)
    assert plan.prompts["prompt_id"].to_list() == [0, 1, 2] and plan.prompts["source_row"].to_list() == [0, 1, 3]
    (skipped,) = plan.prompt_source.too_long
    assert skipped["where"] == f"{files / 'mixed.jsonl'}:3" and skipped["limit"] == "prompts.max_tokens"
    assert "prompts skipped as too long: 1 (first: " in "\n".join(plan.prompt_source.lines())
    assert not (tmp_path / "out").exists()

    cfg = load_config(None, sweep_overrides(seed_model_dir, f"prompts.file={files / 'newline.jsonl'}",
                                            "prompts.line_breaks=join"), str(tmp_path / "out"))
    attempts = prepare(cfg).prompts["attempt"].to_list()
    assert attempts == [SHORT["attempt"], "79 - 60 + 17 = 36"]


def test_model_context_and_all_too_long(files, seed_model_dir, token_counts, tmp_path):
    """Over the model's own context length (4096 for the seed-shaped model) is an error whatever
    prompts.max_tokens says; skipping every prompt leaves nothing to score, an error too."""
    mixed = files / "mixed.jsonl"
    cfg = load_config(None, sweep_overrides(seed_model_dir, f"prompts.file={mixed}", "prompts.max_tokens=100000"),
                      str(tmp_path / "out"))
    with pytest.raises(InputError, match=rf"^{mixed}:3: the prompt has {token_counts['mixed_tokens']} tokens "
                                         rf"\(\w+\), over the context length of \w+ = 4096; the model cannot read it"):
        prepare(cfg)
    cfg = load_config(None, sweep_overrides(seed_model_dir, f"prompts.file={mixed}", "prompts.too_long=skip",
                                            "prompts.max_tokens=10"), str(tmp_path / "out"))
    with pytest.raises(InputError, match="every prompt is over its limit"):
        prepare(cfg)
    assert not (tmp_path / "out").exists()


def test_engine_budget_is_never_a_reason_to_skip():
    """A prompt over only the engine's budgets is refused even with skip (engine options may change on --resume,
    the prompts a sweep scores may not); over prompts.max_tokens too, it is skipped."""

    class Words:  # a tokenizer: one token per word
        def __call__(self, texts, add_special_tokens):
            return {"input_ids": [t.split() for t in texts]}

    limits = {"m": token_limits(max_tokens=8, context=None, engine_tokens=4, model="m")}
    prompts, where = ["a b c", "a b c d e", "a b c d e f g h i"], ["f:1", "f:2", "f:3"]
    with pytest.raises(InputError, match=r"^f:2: the prompt has 5 tokens \(m\), over the engine's longest prompt"):
        check_prompt_lengths(prompts, where, {"m": Words()}, limits, "skip")
    skipped = check_prompt_lengths(prompts[::2], where[::2], {"m": Words()}, limits, "skip")
    assert [(t.where, t.tokens, t.limit.name) for t in skipped] == [("f:3", 9, "prompts.max_tokens")]


# ---------------------------------------------------------------- the engine's memory bound


def test_engine_refuses_before_any_forward_and_chunks_within_the_budget(seed_model):
    """No prompt makes a forward chunk hold more than max_chunk_tokens (rows x padded length): long prompts get
    fewer rows; one over the budgets is refused before the first forward."""
    opts = EngineOptions(max_rows=64, max_chunk_tokens=240, max_unit_tokens=960)
    scorer = Scorer(seed_model, resolve_yes_no(seed_model.tokenizer), opts)
    seen: list[tuple[int, int]] = []
    inner = scorer.forward._layer

    def spy(*args):
        seen.append(tuple(args[0].shape[:2]))  # h: [rows, padded length, hidden]
        return inner(*args)

    scorer.forward._layer = spy
    with pytest.raises(ValueError, match="prompt 1 has 481 tokens; the engine scores at most 240"):
        scorer.score_tokens([[11] * 8, [11] * 481], [[], [(3, 1)]])
    assert seen == []  # refused while planning: nothing was run, nothing allocated
    table = scorer.score_tokens([[11] * 8, [12] * 10, [13] * 120], [[], [(3, 1)], [(0, 2)]])
    assert table.nonfinite == 0
    assert seen and max(rows * length for rows, length in seen) <= 240
    assert {length for _, length in seen} == {8, 10, 120}  # 10 / 8 > bucket_ratio: no unit pads 8 to 10
