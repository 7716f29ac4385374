"""Bad input costs one clear line, never a traceback, a half-made folder or the machine's memory (issues 14, 19).

Every case runs `launch.py` in a process of its own, as a user runs it, through each job it applies to
(sweep, discover, generate, compare, weight diff: they share one preparation path, `jobs.prepare`, and
the cases show it holds for each), and must give: exit code 2, exactly one line on stderr naming the
key or the file (and line), no traceback, nothing created where OUT would go, and nothing changed in
an existing folder.

- Errors the configuration or a path alone decides must come before torch, transformers or Ray are
  imported (seconds on 2 cores): each runs in a fresh interpreter, and that is asserted from the
  modules the process had loaded when it exited, never from a timing.
- Errors that need a model's config or tokenizer run in a child forked from one process that imported
  the jobs once (`tests.support.launcher`), on the tiny model (its tokenizer loads in milliseconds).
  Each must also show that no worker started: the child never imported Ray (the cases ask for Ray
  workers) and never opened the model's weights.
- A folder that cannot be written during the work (a file over the size limit) ends like failed
  shards: exit 1, one line saying what is on disk and the command that resumes, which then finishes.

The engine's own bound (no prompt makes a forward chunk hold more than its token budget) is checked
on the seed-shaped model without allocating anything large.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from jobs.config import load_config
from jobs.errors import InputError
from jobs.inputs import JOBS, check_prompt_lengths, token_limits
from jobs.runtime.lock import OutLock
from jobs.sweep import prepare
from tests.support.launcher import LIGHT_PRELOAD, Launcher
from tests.support.models import build_tiny_model
from verif.model.engine import EngineOptions, Scorer
from verif.model.score import resolve_yes_no
from verif.task.prompts import STUDY
from verif.task.tinyzero import generation_prompt

REPO = Path(__file__).resolve().parent.parent
SHORT = {"numbers": [79, 17, 60], "target": 36, "attempt": "79 - 60 + 17 = 19 + 17 = 36"}
ALL_JOBS = tuple(JOBS)  # sweep, discover, generate, compare, weight-diff
PROMPT_JOBS = tuple(name for name, job in JOBS.items() if job.prompts)  # sweep, discover, compare
MODEL_JOBS = (*PROMPT_JOBS, "generate")
TINY_CONTEXT = 4096  # build_tiny_model's max_position_embeddings


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# The study template shows the attempt twice: "1+1+...+1" of n ones is 2n - 1 tokens each time.
MIXED_ONES = 600


def _long_attempt(n_ones: int) -> dict:
    return {"numbers": [1, 2], "target": 3, "attempt": "+".join(["1"] * n_ones)}


HUGE_PROBLEM = {"nums": list(range(1, 5001)), "target": 3}  # 5,000 numbers (the issue's --generate case)


def _manifest(job: str) -> str:
    return json.dumps({"job": job, "config": {}, "shards": {}})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny")


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny) -> Path:
    """Every bad input of the table, made once (the cases only read them)."""
    d = tmp_path_factory.mktemp("bad_input")
    (d / "empty.jsonl").write_text("")
    (d / "blank.jsonl").write_text("\n   \n\t\n")
    _jsonl(d / "newline.jsonl", [SHORT, {**SHORT, "attempt": "79 - 60 + 17\n= 36"}])
    _jsonl(d / "long.jsonl", [SHORT, _long_attempt(10_000)])  # 20,000 characters, ~40,000 tokens
    _jsonl(d / "mixed.jsonl", [SHORT, SHORT, _long_attempt(MIXED_ONES), SHORT])  # ~3,000 tokens among 3 short
    _jsonl(d / "huge_problem.jsonl", [HUGE_PROBLEM])
    (d / "latin1.jsonl").write_bytes(json.dumps(SHORT).encode() + b"\n" + b'{"attempt": "caf\xe9"}\n')
    (d / "json.jsonl").write_text(json.dumps(SHORT) + "\n{not json\n")
    wrong = {**SHORT, "attempt": SHORT["attempt"] + "0", "pair_id": 4}
    _jsonl(d / "pair_three.jsonl", [{**SHORT, "pair_id": 4}, wrong, wrong])  # a pair is two rows
    (d / "folder.jsonl").mkdir()
    unreadable = d / "unreadable.jsonl"
    _jsonl(unreadable, [SHORT]).chmod(0o000)
    (d / "a_file").write_text("not a folder\n")
    for folder in ("notes", "notes/discovery", "notes/compare"):  # a user's files where each job's folder goes
        (d / folder).mkdir()
        (d / folder / "todo.txt").write_text("mine\n")
    (d / "locked").mkdir()
    (d / "compared" / "compare").mkdir(parents=True)  # a finished compare
    (d / "compared" / "compare" / "manifest.json").write_text(_manifest("compare"))
    (d / "compared" / "compare" / "residual.parquet").write_text("the seed-0 results\n")
    (d / "swept").mkdir()
    (d / "swept" / "manifest.json").write_text(_manifest("sweep"))
    (d / "no_tokenizer").mkdir()  # a model folder with config.json and weights but no tokenizer files
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny / name, d / "no_tokenizer" / name)
    unwritable = d / "unwritable"
    unwritable.mkdir()
    unwritable.chmod(0o555)
    shutil.copytree(tiny, d / "tiny_copy")  # cross-model patching's partners: the same model, another name,
    build_tiny_model(d / "tiny_wide", intermediate_size=96)  # another MLP width,
    build_tiny_model(d / "tiny_words", words=("The",))  # "The" one token: the prompts tokenize differently
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


# Root passes os.access under /sys, then mkdir fails with EPERM: refused only once the folder is made, after
# the models' checks. Anyone else is refused by the access check, before the imports.
EPERM_AT_MKDIR = os.geteuid() == 0 and os.path.ismount("/sys")


def _uncreatable(files: Path) -> str:
    """A folder the OS refuses to create: under /sys (see EPERM_AT_MKDIR), else below a mode-555 folder."""
    return "/sys/verif-bad-input" if EPERM_AT_MKDIR else f"{_unwritable(files)}/OUT"


@dataclass(frozen=True)
class Case:
    """One bad input: launch.py's arguments and what its one line must name ({files}, {model}, {out},
    {sub} (the job's folder inside OUT) are filled in); `light`: refused before torch/transformers/Ray
    load, else run by the launcher and refused before any worker; `out`: where OUT goes (default: a
    fresh path inside an empty folder that must stay empty); `model`: the model folder; `locked`: this
    process holds that job's lock on OUT while the case runs, as a running driver would."""

    id: str
    args: tuple[str, ...]
    named: tuple[str, ...]
    light: bool = True
    out: str | None = None
    model: str = "{tiny}"
    locked: str | None = None

    @property
    def job(self) -> str:
        return next((name for name in ALL_JOBS if f"--{name}" in self.args), "sweep")


TARGET = ("--set", "ablation.target_heads=L1 H1, L2 H3", "--set", "ablation.random_controls=2")  # fits the tiny model


def command(job: str, *args: str) -> tuple[str, ...]:
    """`launch.py` for `job` on {model} (Ray workers asked for: a refused job must start none), W&B off."""
    head = {
        "sweep": ("--sweep", "--set", "model.path={model}", *TARGET),
        "discover": ("--discover", "--set", "model.path={model}", *TARGET, "--set", "discover.k=[1, 2, 4]"),
        "generate": ("--generate", "--set", "model.path={model}"),
        "compare": ("--compare", "--set", "model.path=[{model}, {model}]"),
        "weight-diff": ("--weight-diff", "--base", "{model}", "--tuned", "{model}"),
    }[job]
    return (*head, "--set", "ray.workers=1", "--set", "wandb.mode=disabled", *args)


CROSS = ("--set", "ablation.kind=[zero, cross]")


def sweep(*args: str) -> tuple[str, ...]:
    return command("sweep", *args)


def check(*args: str) -> tuple[str, ...]:
    return ("--check", "--set", "model.path={model}", *TARGET, *args)


def each(jobs: tuple[str, ...], id: str, args: tuple[str, ...], named: tuple[str, ...], **kw) -> list[Case]:
    """The case `id` through each of `jobs` (`{job}` in `named` and `out` is the job's name)."""
    return [Case(f"{job}-{id}", command(job, *args), tuple(t.replace("{job}", job) for t in named),
                 **{k: v.replace("{job}", job) if isinstance(v, str) else v for k, v in kw.items()})
            for job in jobs]


CASES = [
    # -- issue 14's table -------------------------------------------------------------------------------------
    Case("prompts-file-missing", sweep("--set", "prompts.file={files}/absent.jsonl"),
         ("prompts.file", "absent.jsonl", "no such file")),
    Case("prompts-file-empty", sweep("--set", "prompts.file={files}/empty.jsonl"),
         ("prompts.file", "empty.jsonl", "no records (the file is empty)")),
    Case("prompts-file-blank-only", sweep("--set", "prompts.file={files}/blank.jsonl"),
         ("prompts.file", "blank.jsonl", "every line is blank")),
    Case("attempt-over-max-tokens-among-short", sweep("--set", "prompts.file={files}/mixed.jsonl"),
         ("{files}/mixed.jsonl:3: the prompt has {mixed_tokens} tokens", "prompts.max_tokens = 1024"), light=False),
    Case("attempt-with-a-newline", sweep("--set", "prompts.file={files}/newline.jsonl"),
         ("{files}/newline.jsonl:2: the attempt", "line break", "prompts.line_breaks=join")),
    Case("out-not-writable", sweep(), ("{out}", "is not writable"), out="{unwritable}/OUT"),
    Case("out-parent-is-a-file", sweep(), ("{files}/a_file is a file, not a folder",), out="{files}/a_file/OUT"),
    Case("resume-without-folder", sweep("--resume"), ("--resume: nothing to resume in {out}",), out="{new}"),
    Case("out-non-empty-without-sweep", sweep(), ("{files}/notes is not empty and holds no sweep", "todo.txt"),
         out="{files}/notes"),
    Case("target-heads-L-1", sweep("--set", "ablation.target_heads=L-1 H3"), ("ablation.target_heads", "'L-1'")),
    Case("target-heads-garbage", sweep("--set", "ablation.target_heads=garbage"),
         ("ablation.target_heads", "'garbage'")),
    Case("more-controls-than-sets", sweep("--set", "ablation.target_heads=L3 H1", "--set", "ablation.match_layers=true",
                                          "--set", "ablation.random_controls=20"),
         ("ablation.random_controls", "only 3 distinct control sets"), light=False),
    Case("malformed-yaml", ("--sweep", "--config", "{files}/bad.yaml"), ("{files}/bad.yaml:3:9: not valid YAML",)),
    Case("config-typo-in-a-key", ("--check", "--config", "{files}/typo.yaml"),
         ("ablation.random_contols: unknown key; did you mean random_controls?",)),
    # -- issue 19: every job keeps the sweep's promises -------------------------------------------------------
    # 1. prompt and context lengths, through every job that reads prompts, and --generate's own
    *each(PROMPT_JOBS, "attempt-of-20000-characters", ("--set", "prompts.file={files}/long.jsonl"),
          ("{files}/long.jsonl:2: the prompt has {long_tokens} tokens (tiny), over prompts.max_tokens = 1024",),
          light=False),
    Case("generate-problem-of-5000-numbers", command("generate", "--set", "generate.problems_file={files}/huge_problem.jsonl"),
         ("{files}/huge_problem.jsonl:1: the prompt has {huge_tokens} tokens (tiny), over prompts.max_tokens = 1024",),
         light=False),
    Case("generate-new-tokens-past-the-context", command("generate", "--set", "generate.max_new_tokens=3900"),
         ("generated problem 0 (generate.seed 0): the prompt has",
          f"over the context length of tiny ({TINY_CONTEXT}) less generate.max_new_tokens (3900) = "
          f"{TINY_CONTEXT - 3900}"), light=False),
    Case("generate-new-tokens-fill-the-context", command("generate", "--set", f"generate.max_new_tokens={TINY_CONTEXT}"),
         (f"generate.max_new_tokens {TINY_CONTEXT}: the context length of tiny is {TINY_CONTEXT} tokens",), light=False),
    # 2, 3. a compare's folder is refused like any job's (before the models load)
    Case("compare-over-a-finished-compare", command("compare"),
         ("{files}/compared/compare already holds the output of a compare job; pass --resume",), out="{files}/compared"),
    *each(("discover", "generate", "compare", "weight-diff"), "out-not-writable", (),
          ("{out}{sub} cannot be created", "is not writable"), out="{unwritable}/OUT"),
    *each(("discover", "compare", "weight-diff"), "out-non-empty-without-its-job", (),
          ("{files}/notes{sub} is not empty and holds no {job}", "todo.txt"), out="{files}/notes"),
    *each(("generate", "compare", "weight-diff"), "resume-without-folder", ("--resume",),
          ("--resume: nothing to resume in {out}{sub}",), out="{new}"),
    Case("weight-diff-resume-of-a-sweep", command("weight-diff", "--resume"),
         ("--resume: {files}/swept holds the output of a sweep job, not of a weight-diff job",), out="{files}/swept"),
    # 4. the number of distinct random sets, counted before any draw
    Case("random-controls-100000-of-3-sets",
         sweep("--set", "ablation.target_heads=L3 H1", "--set", "ablation.match_layers=true",
               "--set", "ablation.random_controls=100000"),
         ("ablation.random_controls: only 3 distinct control sets of 1 heads exist",), light=False),
    Case("discover-more-controls-than-sets", command("discover", "--set", "discover.k=[1, 2]", "--set", "discover.controls=17"),
         ("discover.controls 17: only 16 distinct random sets of 1 heads exist",), light=False),
    # 5. a folder the OS refuses to create (EPERM at mkdir) is one line, for every job
    *each(ALL_JOBS, "out-the-os-refuses", (), ("output folder {out}{sub} cannot be created",), out="{uncreatable}",
          light=not EPERM_AT_MKDIR),
    # 6. a --set value that is not YAML names the --set item
    *each(ALL_JOBS, "set-not-yaml", ("--set", "model.path=!!@@##"),
          ("--set 'model.path=!!@@##': the value is not valid YAML at column 16",)),
    # 8. messages that say what is wrong: the missing tokenizer, the job holding the lock, the target's range
    *each(MODEL_JOBS, "model-folder-without-tokenizer", (),
          ("model.path '{files}/no_tokenizer': it has no tokenizer",), model="{files}/no_tokenizer", light=False),
    *each(("discover", "generate", "compare", "weight-diff"), "out-in-use", (),
          ("{out}{sub} is in use by a {job} job, pid ",), out="{files}/locked", locked="{job}"),
    Case("discover-target-heads-out-of-range", command("discover", "--set", "ablation.target_heads=L99 H0"),
         ("ablation.target_heads (model {model}): L99 H0: model has 4 layers (0-3) (--discover ablates sets of its "
          "own, yet refuses a target the model does not have: fix it, or unset it with --set KEY=null)",),
         light=False),
    # -- more of the same kinds --------------------------------------------------------------------------------
    Case("prompts-file-unreadable", sweep("--set", "prompts.file={unreadable}"), ("prompts.file", "cannot be read")),
    Case("prompts-file-is-a-folder", sweep("--set", "prompts.file={files}/folder.jsonl"), ("folder.jsonl", "is a folder")),
    Case("prompts-file-not-utf8", sweep("--set", "prompts.file={files}/latin1.jsonl"),
         ("{files}/latin1.jsonl:2: not UTF-8",)),
    Case("prompts-file-bad-json", sweep("--set", "prompts.file={files}/json.jsonl"), ("{files}/json.jsonl:2: invalid JSON",)),
    Case("pair-of-three-rows", sweep("--set", "prompts.file={files}/pair_three.jsonl"),
         ("{files}/pair_three.jsonl:3: pair_id 4 has 3 rows",)),
    Case("out-is-a-file", sweep(), ("{files}/a_file: it is a file",), out="{files}/a_file"),
    Case("resume-folder-without-sweep", sweep("--resume"), ("--resume: {files}/notes has no manifest.json",),
         out="{files}/notes"),
    Case("out-in-use-by-another-driver", sweep("--resume"), ("{files}/locked is in use by a sweep job, pid ",),
         out="{files}/locked", locked="sweep"),
    Case("discover-resume-without-folder", command("discover", "--resume"),
         ("--resume: nothing to resume in {out}/discovery",), out="{new}"),
    Case("generate-out-non-empty", command("generate"),
         ("{files}/notes is not empty and holds no generate", "todo.txt"), out="{files}/notes"),
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
    Case("fractional-gpus-above-one", sweep("--set", "ray.gpus_per_worker=1.5"),
         ("ray.gpus_per_worker: above 1 must be a whole number", "(got 1.5)")),
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
    Case("resample-without-pairs", sweep("--set", "ablation.kind=[zero, resample]", "--set", "prompts.n=4"),
         ("ablation.kind: resample patches each prompt with its partner's activations", "prompt 0 has no pair",
          "prompts.pairs: true"), light=False),
    Case("discover-resample-without-pairs", command("discover", "--set", "discover.intervention=resample",
                                                    "--set", "prompts.n=4"),
         ("discover.intervention: resample patches each prompt", "prompt 0 has no pair"), light=False),
    # -- cross-model activation patching (issue 21) -------------------------------------------------------------
    Case("cross-without-source-model", sweep(*CROSS, "--set", "model.path=[{model}, {files}/tiny_copy]"),
         ("ablation.source_model: ablation.kind cross patches one model's activations into the others; name the "
          "source, one of model.path ({model}, {files}/tiny_copy)",)),
    Case("source-model-without-cross", sweep("--set", "ablation.source_model=tiny"),
         ("ablation.source_model 'tiny': only ablation.kind cross reads it, and ablation.kind is ['zero']",)),
    Case("cross-with-one-model", sweep(*CROSS, "--set", "ablation.source_model=tiny"),
         ("ablation.kind cross: patches the source model's activations into another model, and model.path has 1",)),
    Case("cross-as-a-circuit-kind", sweep("--set", "ablation.circuit=cross"),
         ("ablation.circuit: cross is not a circuit kind",)),
    Case("cross-unknown-source-model", sweep(*CROSS, "--set", "model.path=[{model}, {files}/tiny_copy]",
                                             "--set", "ablation.source_model=r1"),
         ("ablation.source_model 'r1': not one of the models in model.path; valid: 'tiny', 'tiny_copy'",), light=False),
    Case("cross-architectures-differ", sweep(*CROSS, "--set", "model.path=[{model}, {files}/tiny_wide]",
                                             "--set", "ablation.source_model=tiny"),
         ("ablation.kind cross: models differ in intermediate_size: tiny 64, tiny_wide 96",), light=False),
    Case("cross-prompt-tokenized-differently", sweep(*CROSS, "--set", "model.path=[{model}, {files}/tiny_words]",
                                                     "--set", "ablation.source_model=tiny"),
         ("ablation.kind cross: prompt 0 tokenizes differently: tiny ", "tiny_words ",
          "first difference at token "), light=False),
]
NO_OUT = ("no-mode", "unknown-flag", "weight-diff-without-base")


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under `root` with its size and modification time (lock files included)."""
    return {str(p.relative_to(root)): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in root.rglob("*")}


@pytest.fixture(scope="module")
def token_counts(files, tiny) -> dict[str, int]:
    """The long prompts' token counts, computed here from the rendered prompts (the messages must match)."""
    tok = AutoTokenizer.from_pretrained(str(tiny))

    def count(record: dict) -> int:
        return len(tok.encode(STUDY.render(record["numbers"], record["target"], record["attempt"]),
                              add_special_tokens=False))

    counts = {"long_tokens": count(_long_attempt(10_000)), "mixed_tokens": count(_long_attempt(MIXED_ONES)),
              "huge_tokens": len(tok.encode(generation_prompt(HUGE_PROBLEM["nums"], HUGE_PROBLEM["target"])))}
    assert counts["long_tokens"] > 20_000 and counts["huge_tokens"] > 10_000  # the issue's sizes
    assert 1024 < counts["mixed_tokens"] < TINY_CONTEXT  # over prompts.max_tokens alone
    return counts


def _launcher(work: Path, preload: tuple[str, ...] | None = None) -> Launcher:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return Launcher(work, env, preload) if preload else Launcher(work, env)


@pytest.fixture(scope="module")
def launcher(tmp_path_factory) -> Launcher:
    """Children of a server that imported the jobs once (`tests.support.launcher`): for cases after the imports."""
    server = _launcher(tmp_path_factory.mktemp("launcher"))
    yield server
    server.close()


@pytest.fixture(scope="module")
def light_launcher(tmp_path_factory) -> Launcher:
    """Children of a server that imported only what launch.py imports first: for cases before the imports."""
    server = _launcher(tmp_path_factory.mktemp("light_launcher"), LIGHT_PRELOAD)
    yield server
    server.close()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_is_one_line_and_exit_2(case, files, tiny, token_counts, request, tmp_path):
    sub = f"/{JOBS[case.job].subfolder}" if JOBS[case.job].subfolder else ""
    fill = {"files": files, "tiny": tiny, "unreadable": _unreadable(files), "unwritable": _unwritable(files),
            "uncreatable": _uncreatable(files), "new": tmp_path / "typo", "sub": sub, **token_counts}
    fill["model"] = case.model.format(**fill)
    out = Path(case.out.format(**fill)) if case.out else tmp_path / "runs" / "OUT"
    fill["out"] = out
    args = [a.format(**fill) for a in case.args]
    if "--out" not in args and case.id not in NO_OUT:
        args += ["--out", str(out)]
    lock = OutLock(JOBS[case.locked].folder(load_config(None, [], str(out))).lock, case.locked) if case.locked else None
    with lock or contextlib.nullcontext():
        before = _snapshot(files)
        ran = request.getfixturevalue("light_launcher" if case.light else "launcher").run(
            args, watch=(Path(fill["model"]),))
        after = _snapshot(files)
    err = ran.stderr
    assert ran.returncode == 2, (args, ran.returncode, err[-3000:])
    assert "Traceback" not in err + ran.stdout, err[-3000:]
    assert err.endswith("\n") and err.count("\n") == 1 and err.startswith("error: "), err
    for text in case.named:
        assert text.format(**fill) in err, (text.format(**fill), err)
    assert ran.stdout == ""
    if case.out is None or case.out == "{new}":
        assert list(tmp_path.iterdir()) == [], "the refused run created files"  # no OUT, no parent of it
    assert not Path(_uncreatable(files)).exists()
    assert after == before, "the refused run changed an existing folder"
    if case.light:
        assert ran.modules == [], f"{case.id}: refused only after importing {ran.modules}"
    else:
        assert any(p.endswith("config.json") for p in ran.opened), "honest label: this case reads the model's config"
        assert "ray" not in ran.modules, "a worker pool was started"
        if case.job != "weight-diff":  # (a weight diff reads the safetensors headers: its config)
            assert not [p for p in ran.opened if p.endswith(".safetensors")], "the model's weights were read"


def test_cases_cover_every_row_of_the_issues():
    """Issue 14's table, row by row, and issue 19's failures through each job they apply to, are in CASES
    (renaming a case must not drop a row silently)."""
    ids = {c.id for c in CASES}
    rows = {"prompts-file-missing", "prompts-file-empty", "prompts-file-blank-only", "sweep-attempt-of-20000-characters",
            "attempt-over-max-tokens-among-short", "attempt-with-a-newline", "out-not-writable", "out-parent-is-a-file",
            "resume-without-folder", "out-non-empty-without-sweep", "target-heads-L-1", "target-heads-garbage",
            "more-controls-than-sets", "malformed-yaml", "config-typo-in-a-key"}
    assert rows <= ids
    per_job = {"attempt-of-20000-characters": PROMPT_JOBS, "out-the-os-refuses": ALL_JOBS, "set-not-yaml": ALL_JOBS,
               "model-folder-without-tokenizer": MODEL_JOBS}
    assert {f"{job}-{row}" for row, jobs in per_job.items() for job in jobs} <= ids
    assert {"generate-problem-of-5000-numbers", "generate-new-tokens-past-the-context", "compare-over-a-finished-compare",
            "compare-out-not-writable", "random-controls-100000-of-3-sets", "discover-more-controls-than-sets",
            "discover-out-in-use", "generate-out-in-use", "compare-out-in-use",
            "discover-target-heads-out-of-range"} <= ids
    assert sum(c.light for c in CASES) >= 20 + 10


# ---------------------------------------------------------------- a folder that cannot be written during the work


RESUME_LINE = re.compile(r"^cannot write (\S+): File too large; (.+); (?:continue|run it again) with: (.+)$")


@pytest.mark.parametrize("job, limit, written", [
    ("sweep", 20_000, "{out}/figures"),  # the shards fit, the figures do not
    ("compare", 20_000, "{out}/compare/figures"),
])
def test_a_folder_that_fills_up_ends_with_the_resume_command(job, limit, written, launcher, tiny, tmp_path):
    """A write past the file size limit (EFBIG, as a full quota) ends the job with exit 1 and one line: what
    is on disk and the command that resumes; that command, pasted, finishes the job."""
    out = tmp_path / "OUT"
    args = [a.format(model=tiny) for a in command(job, "--set", "ray.workers=0", "--set", "prompts.n=4",
                                                   "--set", "stats.n_boot=20")] + ["--out", str(out)]
    ran = launcher.run(args, file_size_limit=limit)
    assert ran.returncode == 1, ran.stderr[-3000:]
    assert "Traceback" not in ran.stderr, ran.stderr[-3000:]
    m = RESUME_LINE.match(ran.stderr.strip().splitlines()[-1])
    assert m, ran.stderr[-2000:]
    assert m.group(1) == written.format(out=out)
    assert m.group(2) == (f"1 of 1 shards are on disk in {out}" if job == "sweep"
                          else f"{out}/compare holds no finished result (this job has no shards)")
    resume = shlex.split(m.group(3))
    assert resume[-3:] == ["--resume", "--out", str(out)]
    again = launcher.run(resume[2:])  # [python, launch.py, ...]: the arguments, run as launch.py
    assert again.returncode == 0, again.stderr[-3000:]
    folder = out / JOBS[job].subfolder if JOBS[job].subfolder else out
    assert json.loads((folder / "manifest.json").read_text())["finished"]
    assert sorted(p.name for p in (folder / "figures").iterdir()), "the resumed run wrote no figures"


# ---------------------------------------------------------------- options that accept the input


def _tiny_cfg(tiny: Path, out: Path, *extra: str):
    return load_config(None, [f"model.path={tiny}", "ablation.target_heads=L1 H1, L2 H3", "ablation.random_controls=2",
                              *extra], str(out))


def test_too_long_prompts_skipped_and_counted(files, tiny, tmp_path):
    """prompts.too_long: skip leaves the long prompt out, renumbers the rest and records it; prompts.line_breaks:
    join makes the attempt with a line break one line."""
    plan = prepare(_tiny_cfg(tiny, tmp_path / "out", f"prompts.file={files / 'mixed.jsonl'}", "prompts.too_long=skip"))
    assert plan.prompts["prompt_id"].to_list() == [0, 1, 2] and plan.prompts["source_row"].to_list() == [0, 1, 3]
    (skipped,) = plan.prompt_source.too_long
    assert skipped["where"] == f"{files / 'mixed.jsonl'}:3" and skipped["limit"] == "prompts.max_tokens"
    assert "prompts skipped as too long: 1 (first: " in "\n".join(plan.prompt_source.lines())
    assert not (tmp_path / "out").exists()

    cfg = _tiny_cfg(tiny, tmp_path / "out", f"prompts.file={files / 'newline.jsonl'}", "prompts.line_breaks=join")
    attempts = prepare(cfg).prompts["attempt"].to_list()
    assert attempts == [SHORT["attempt"], "79 - 60 + 17 = 36"]


def test_model_context_and_all_too_long(files, tiny, token_counts, tmp_path):
    """Over the model's own context length (4096 for the tiny model) is an error whatever prompts.max_tokens
    says; skipping every prompt leaves nothing to score, an error too."""
    long, mixed = files / "long.jsonl", files / "mixed.jsonl"
    with pytest.raises(InputError, match=rf"^{long}:2: the prompt has {token_counts['long_tokens']} tokens "
                                         rf"\(tiny\), over the context length of tiny = {TINY_CONTEXT}; the model "
                                         "cannot read it"):
        prepare(_tiny_cfg(tiny, tmp_path / "out", f"prompts.file={long}", "prompts.max_tokens=100000"))
    with pytest.raises(InputError, match="every prompt is over its limit"):
        prepare(_tiny_cfg(tiny, tmp_path / "out", f"prompts.file={mixed}", "prompts.too_long=skip",
                          "prompts.max_tokens=10"))
    assert not (tmp_path / "out").exists()


def test_engine_budget_is_never_a_reason_to_skip():
    """A prompt over only the engine's budgets is refused even with skip (engine options may change on --resume,
    the prompts a sweep scores may not); over prompts.max_tokens too, it is skipped."""

    class Words:  # a tokenizer: one token per word
        def __call__(self, texts, add_special_tokens, verbose=True):
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
