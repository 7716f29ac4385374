"""Shared, session-scoped fixtures: the seed-shaped test model, the packaged SmolLM2 and the study heads.

Loading a model is the slow part of most tests, so each model is built/loaded once per session.
Tests must treat the loaded models as read-only (the fast engine re-points q/k/v and gate/up weights
at fused views of equal values, which is allowed: it changes no number).

No test depends on the state of the working tree or writes into it: every test (and every session
fixture) runs in a fresh, empty working folder, so a default path (`runs/<name>`, `--check` without
`--out`) lands there, and the session fails if git sees anything new or changed in the checkout
afterwards (tests.support.worktree), ignored paths such as `runs/` included.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from verif.design.heads import STUDY_HEADS_TEXT, parse_heads
from verif.model.loading import LoadedModel, load_model
from tests.support.models import build_seed_shaped_model
from tests.support.worktree import repo_state, writes
from tests.support.sweeps import sweep_cfg
from tests.support.tokenizer import PLUMBING_RANKS, qwen25_tokenizer
from tests.tolerances import float64_copy, forward_rounding

# One intra-op thread unless told otherwise: the test models are small (per-op overhead dominates)
# and on a shared 2-core machine two OpenMP threads competing with other processes made the same
# forwards 10-40x slower than one thread (measured). VERIF_TEST_THREADS=N overrides.
torch.set_num_threads(int(os.environ.get("VERIF_TEST_THREADS", "1")))

REPO = Path(__file__).resolve().parent.parent
_REPO_BEFORE = pytest.StashKey[dict]()


def pytest_sessionstart(session):
    if not hasattr(session.config, "workerinput"):  # the controlling process (xdist workers: no check)
        session.config.stash[_REPO_BEFORE] = repo_state(REPO)


def pytest_sessionfinish(session):
    before = session.config.stash.get(_REPO_BEFORE, None)
    if before is None:
        return  # an xdist worker, or not a git checkout
    written = writes(before, repo_state(REPO) or {})
    if written:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        message = f"FAILED: the tests wrote into the repository ({REPO}): {', '.join(written)}"
        if reporter is not None:
            reporter.write_line(message, red=True, bold=True)
        else:
            print(message)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session", autouse=True)
def _session_folder(tmp_path_factory):
    """Session fixtures run in a working folder of the session's own (before any test's)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path_factory.mktemp("session_cwd"))
        yield


@pytest.fixture(autouse=True)
def _test_folder(tmp_path_factory, monkeypatch):
    """Each test runs in a fresh, empty working folder: relative default paths land there."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


# Short verification prompts (about 30-60 tokens) of different token lengths: long enough for
# attention to matter, short enough that SmolLM2 runs them quickly on a CPU.
SHORT_PROMPTS = (
    "Numbers [3 5 7], target 22. Attempt: 3 * 5 + 7 = 15 + 7 = 22. Is the attempt correct? "
    "Answer Yes or No. Answer:",
    "The User is given the numbers [79 17 60] and must make 36. The User's attempt is "
    "79 - 60 + 17 = 19 + 17 = 36. Is it correct? Answer only in 'Yes' or 'No'. The answer is",
    "Numbers [12 4 9 2], target 50. Attempt: 12 * 4 + 9 - 2 = 55. Correct? Answer:",
    "Verify: using [44 19 35] make 98. Attempt: 44 + 19 + 35 = 63 + 35 = 98. "
    "Is the User's attempt correct? Therefore, the final answer is",
)


@pytest.fixture(scope="session")
def seed_model_dir(tmp_path_factory) -> object:
    """A random-weight Qwen2 folder with the study's shape (36 layers x 16 heads) and the Qwen2.5 tokenizer."""
    return build_seed_shaped_model(tmp_path_factory.mktemp("seed_model"))


@pytest.fixture(scope="session")
def sweep_model_dir(tmp_path_factory) -> object:
    """The seed shape (36 x 16 heads: the study's heads are valid) with the first 10,000 Qwen2.5 BPE ranks
    (tests.support.tokenizer.PLUMBING_RANKS): the model of the shared small sweep (tests.support.sweeps) and
    of the tests of its plumbing (sharding, Ray, faults, resume), where the vocabulary's size only costs
    time: every driver and worker loads its tokenizer in ~0.04 s instead of ~1.6 s."""
    return build_seed_shaped_model(tmp_path_factory.mktemp("sweep_model"), n_ranks=PLUMBING_RANKS)


@pytest.fixture(scope="session")
def seed_model(seed_model_dir) -> LoadedModel:
    """The seed-shaped model loaded through the real loader, float32 on the CPU."""
    return load_model(str(seed_model_dir), dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def sweep_model(sweep_model_dir) -> LoadedModel:
    """The shared small sweep's model (`sweep_model_dir`) loaded through the real loader, float32 on the CPU:
    for tests that check a sweep's numbers against a reference computed on the same weights."""
    return load_model(str(sweep_model_dir), dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def smollm2() -> LoadedModel:
    """The packaged SmolLM2-135M (real weights, Llama, 30 layers x 9 heads), float32 on the CPU (~15-30 s)."""
    return load_model("packaged:smollm2-135m", dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def qwen_tokenizer():
    """The offline Qwen2.5 tokenizer (`tests.support.tokenizer.qwen25_tokenizer`), built once (~5 s)."""
    return qwen25_tokenizer()


@pytest.fixture(scope="session")
def study_heads() -> list[tuple[int, int]]:
    """The study's 29 heads of Qwen2.5-3B (valid on the seed-shaped model)."""
    return parse_heads(STUDY_HEADS_TEXT)


@pytest.fixture(scope="session")
def short_prompts() -> tuple[str, ...]:
    """A few short verification prompts of different token lengths."""
    return SHORT_PROMPTS


@pytest.fixture(scope="session")
def seed_model64(seed_model) -> LoadedModel:
    """The seed-shaped model in float64 (`tests.tolerances.float64_copy`, norms in float64 too): where
    exactness is the point, float64 removes the float32 noise that would otherwise set the tolerance."""
    return dataclasses.replace(seed_model, model=float64_copy(seed_model.model))


# The earliest position any test reads scores at: the last token of an 8-token prompt.
SCORED_FROM = 7


@pytest.fixture(scope="session")
def rounding(short_prompts) -> Callable[..., float]:
    """`rounding(loaded, first=SCORED_FROM)`: delta, the float32 rounding error of one whole forward of that
    model's logits (`tests.tolerances.forward_rounding`) at positions >= `first`, measured once per model on
    the short prompts, unablated and with a quarter of all heads ablated (every layer).

    Tests that compare logits at every position ask for first=0: SmolLM2 rounds ~4x worse at its first
    tokens (its attention sink) when heads are ablated."""
    cache: dict[int, np.ndarray] = {}

    def delta(loaded: LoadedModel, first: int = SCORED_FROM) -> float:
        if id(loaded.model) not in cache:
            arch, tok = loaded.arch, loaded.tokenizer
            toks = [tok.encode(p, add_special_tokens=False) for p in short_prompts]
            quarter = [(layer, h) for layer in range(arch.n_layers) for h in range(arch.n_heads)
                       if (layer * arch.n_heads + h) % 4 == 0]  # fmt: skip
            cache[id(loaded.model)] = forward_rounding(loaded, toks, [[], quarter])
        return float(cache[id(loaded.model)][first:].max())

    return delta


@pytest.fixture(scope="session")
def sweep_reference(sweep_model_dir, tmp_path_factory):
    """`tests.support.sweeps`' small sweep scored in this process, without Ray: (results frame, finished OUT).

    Tests that need a finished folder copy OUT; none may change it.
    """
    from jobs.runtime.storage import OutDir
    from jobs.sweep import run_sweep

    out = tmp_path_factory.mktemp("reference") / "OUT"
    report = run_sweep(sweep_cfg(sweep_model_dir, out, "ray.workers=0"))
    assert report.shards_run == 6 and report.rows_written == 24
    return OutDir(out).read_results(), out
