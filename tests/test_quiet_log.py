"""A quiet, honest log: what reaches the terminal is the progress bar and the errors a user must see.

A prompt over the limits is the project's own one-line error; transformers' warning about a sequence
longer than the tokenizer's maximum ("... will result in indexing errors") would come first and say
something false (the prompt is never run). Real checkpoints carry a `model_max_length` (Qwen2.5's is
131072); the seed-shaped model is given one here so that the warning can happen. transformers writes
its warnings through its own logger to the stderr it found at import (pytest's, not a test's capture),
so the test listens on that logger as well as on stderr.
"""

from __future__ import annotations

import json
import logging
import shutil

import pytest
from transformers import AutoTokenizer

import launch
from verif.task.prompts import STUDY

WARNING = "Token indices sequence length is longer than the specified maximum sequence length"


@pytest.fixture
def transformers_warnings():
    """The messages of warnings transformers logs while the test runs."""
    seen: list[str] = []

    class Listen(logging.Handler):
        def emit(self, record):
            if record.levelno >= logging.WARNING:
                seen.append(record.getMessage())

    handler, logger = Listen(), logging.getLogger("transformers")
    logger.addHandler(handler)
    yield seen
    logger.removeHandler(handler)


def test_a_too_long_prompt_is_one_line_on_stderr(seed_model_dir, tmp_path, capsys, transformers_warnings):
    model = tmp_path / "model"  # the seed-shaped model's config and tokenizer: --check reads no weights
    model.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(seed_model_dir / name, model / name)
    tok_config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**tok_config, "model_max_length": 4096}))
    long_attempt = "+".join(["1"] * 1100)  # ~4600 tokens in the study template (the attempt is shown twice)
    prompts = tmp_path / "long.jsonl"
    prompts.write_text(json.dumps({"numbers": [1, 2], "target": 3, "attempt": long_attempt}) + "\n")

    # The warning is live in this process: the tokenizer left to itself gives it.
    AutoTokenizer.from_pretrained(str(model))([STUDY.render([1, 2], 3, long_attempt)], add_special_tokens=False)
    assert any(WARNING in m for m in transformers_warnings)
    transformers_warnings.clear()

    code = launch.main(["--check", "--set", f"model.path={model}", "--set", f"prompts.file={prompts}",
                        "--set", "prompts.max_tokens=100000"])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"error: {prompts}:1: the prompt has "), err
    assert "over the context length of model = 4096" in err
    assert transformers_warnings == []
