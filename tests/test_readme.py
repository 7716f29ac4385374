"""The README's commands stay true: CI runs its two commands as written, and every `launch.py` command in it
is one the command line accepts, with a configuration that validates; the main command passes `--check`.

Commands are read from the README's bash blocks (line continuations joined, comments dropped), so editing
a command there is what these tests see.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

import launch
from jobs import config
from jobs.runs import place

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()


def bash_blocks(text: str) -> list[list[str]]:
    """Each ```bash block's commands: continuation lines joined, blank and comment lines dropped."""
    blocks = re.findall(r"^```bash\n(.*?)^```$", text, re.M | re.S)
    return [[line for line in block.replace("\\\n", " ").splitlines() if line.strip() and not line.lstrip().startswith("#")]
            for block in blocks]


def the_two_commands() -> list[str]:
    """The first bash block under "## The two commands", read here independently of .ci/readme_commands."""
    section = README.split("\n## The two commands\n", 1)[1].split("\n## ", 1)[0]
    return bash_blocks(section)[0]


def launch_commands() -> list[tuple[str, list[str]]]:
    """Every `launch.py` command of the README's bash blocks: (the line, the arguments after launch.py)."""
    found = []
    for block in bash_blocks(README):
        for line in block:
            words = shlex.split(line, comments=True)
            if "launch.py" in words:
                args = words[words.index("launch.py") + 1:]
                found.append((line, args[:args.index("&&")] if "&&" in args else args))
    return found


def test_ci_runs_the_readme_commands_as_written_main_first():
    main, tests = the_two_commands()
    assert "launch.py --sweep" in main and "pytest" in tests
    listed = subprocess.run(["bash", ".ci/readme_commands", "README.md"], cwd=REPO, capture_output=True, text=True,
                            check=True).stdout.splitlines()
    assert listed == [main, tests]
    ci = subprocess.run(["bash", ".ci/run", "--print"], cwd=REPO, capture_output=True, text=True, check=True)
    assert ci.stdout.splitlines() == [main, main, tests]  # the main command, again (a re-run), then the tests


def test_every_launch_command_parses_and_its_configuration_validates():
    """Flags argparse knows, `--set` keys and values the schema accepts, config files that exist (those under
    runs/ are outputs of an earlier command: their overrides are checked against the default config)."""
    commands = launch_commands()
    assert len(commands) >= 15, commands
    parser = launch._parser()
    options = {s for action in parser._actions for s in action.option_strings}
    checked = 0
    for line, args in commands:
        if any(a.startswith("[") for a in args):  # the usage synopsis: its flags must exist
            flags = {w.strip("[]") for w in args if w.strip("[").startswith("--")}
            assert flags <= options, (line, flags - options)
            continue
        ns = parser.parse_args(args)
        if ns.config_reference or ns.relog:
            continue
        cfg_file = ns.config if ns.config and not ns.config.startswith("runs/") else None
        overrides = list(ns.overrides)
        if ns.weight_diff:
            overrides += [f"weight_diff.base={ns.base}", f"weight_diff.tuned={ns.tuned}"]
        try:
            cfg = config.load_config(REPO / cfg_file if cfg_file else None, overrides, default_out=False)
        except config.ConfigError as e:
            pytest.fail(f"README command {line!r}: {e}")
        job = next(j for j in ("sweep", "discover", "generate", "compare", "weight_diff", "check") if getattr(ns, j))
        placed, _ = place(cfg, ns.out, {"weight_diff": "weight-diff", "check": "sweep"}.get(job, job))
        assert placed.out, line
        checked += 1
    assert checked >= 12


def test_the_main_command_passes_check(capsys):
    """The README's main command with --sweep replaced by --check: every check a sweep makes, no weights
    loaded (in this test's own working folder, so the folder it reports is a new runs/default)."""
    (_, args), = [(line, a) for line, a in launch_commands() if line == the_two_commands()[0]]
    assert launch.main(["--check" if a == "--sweep" else a for a in args]) == 0
    out = capsys.readouterr().out
    assert "64 prompts" in out and "output folder: runs/default (a new run folder)" in out
