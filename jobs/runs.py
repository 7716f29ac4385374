"""Where a job writes when no `--out` names a folder: a new numbered folder per run, and `runs/latest`.

Researchers re-run the same command all day, so a run never lands in an earlier run's folder unless
asked to (the convention of Lightning's `version_N` and W&B's run per launch): the runs of a series
`stem` are `runs/<stem>`, `runs/<stem>-2`, `runs/<stem>-3`, ..., a new run takes the number after the
highest one there, and `runs/latest` is a link to the folder of the run started last. `--resume`
without `--out` continues the latest run of the series that holds the job's output. Nothing is created
before the job itself creates its folder: `runs/latest` moves when the job starts and moves back if
the job stopped before it made its folder (bad input creates nothing).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from jobs.config import Config
from jobs.errors import InputError

RUNS = Path("runs")
LATEST = "latest"


def series(stem: str, root: Path = RUNS) -> dict[int, Path]:
    """The existing folders of the series `stem` by their number (`stem` is 1, `stem-N` is N)."""
    base = root / stem
    if not base.parent.is_dir():
        return {}
    number = re.compile(rf"{re.escape(base.name)}(?:-([1-9][0-9]*))?")
    found = {}
    for p in base.parent.iterdir():
        m = number.fullmatch(p.name)
        if m and p.is_dir() and m.group(1) != "1":  # `stem-1` is nobody's number: `stem` is the first
            found[int(m.group(1) or 1)] = p
    return found


def next_folder(stem: str, root: Path = RUNS) -> Path:
    """The folder of a new run: the number after the highest of the series (`runs/<stem>` when there is none)."""
    taken = series(stem, root)
    n = max(taken, default=0) + 1
    return root / (stem if n == 1 else f"{stem}-{n}")


@dataclass(frozen=True)
class RunFolder:
    """The folder a job without `--out` runs in, and why (a new run, or the latest one continued)."""

    path: Path
    job: str
    continued: bool

    @property
    def why(self) -> str:
        return f"the latest {self.job} of this name, continued" if self.continued else "a new run folder"

    def line(self) -> str:
        """What the command line prints before the job starts."""
        return f"run folder: {self.path} ({self.why}; {self.path.parent / LATEST} links to the latest run)"

    @contextmanager
    def linked(self) -> Iterator[None]:
        """`runs/latest` points at this folder while the job runs and after it, unless the job stopped before it
        created the folder (then the link is as it was). A `runs/latest` that is not a link is left alone."""
        link = self.path.parent / LATEST
        ours = link.is_symlink() or not link.exists()
        before = os.readlink(link) if link.is_symlink() else None
        if ours:
            _point(link, self.path.name)
        try:
            yield
        finally:
            if ours:
                _point(link, self.path.name if self.path.exists() else before)


def _point(link: Path, target: str | None) -> None:
    """Make `link` a relative link to `target` (None: no link), replacing the old one atomically."""
    if target is None:
        link.unlink(missing_ok=True)
        return
    if not link.parent.is_dir():  # runs/ does not exist before the first job has made its folder in it
        return
    tmp = link.with_name(f".{link.name}.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, link)


def choose(stem: str, job: str, resume: bool, marker: str, root: Path = RUNS) -> RunFolder:
    """A new folder of the series `stem`, or with `resume` its latest folder holding `marker` (the file a run of
    `job` leaves there, relative to the folder): an InputError when there is none."""
    if not resume:
        return RunFolder(next_folder(stem, root), job, continued=False)
    held = [p for _, p in sorted(series(stem, root).items()) if (p / marker).exists()]
    if not held:
        raise InputError(f"--resume: no {job} to continue in {root / stem} or {root / stem}-N (none holds "
                         f"{marker}); drop --resume to start one, or name its folder with --out")
    return RunFolder(held[-1], job, continued=True)


@dataclass(frozen=True)
class Series:
    """A job's run folders: the stem (`{name}` is the config's name), the file a run of it leaves in its folder
    (what `--resume` looks for), and whether the config's own `out` is this job's (the sweep's is not
    `--generate`'s or `--weight-diff`'s: they never write into a sweep's folder)."""

    stem: str
    marker: str
    config_out: bool = True


SERIES = {
    "sweep": Series("{name}", "manifest.json"),
    "discover": Series("{name}", "discovery/manifest.json"),  # OUT/discovery, in a folder of its own
    "compare": Series("{name}", "compare/compare.json"),  # OUT/compare, likewise
    "generate": Series("{name}-generate", "manifest.json", config_out=False),
    "weight-diff": Series("weight_diff", "weight_diff_summary.json", config_out=False),
}


def place(cfg: Config, out: str | None, job: str, resume: bool = False) -> tuple[Config, RunFolder | None]:
    """`cfg` with the job's output folder: `out` (the command line's), else the config's own where the job reads
    it, else a run folder of the job's series (None returned for it when the folder was named)."""
    spec = SERIES[job]
    named = out or (cfg.out if spec.config_out else None)
    if named:
        return cfg.replace(out=named), None
    folder = choose(spec.stem.format(name=cfg.name), job, resume, spec.marker)
    return cfg.replace(out=str(folder.path)), folder


@contextmanager
def announced(folder: RunFolder | None) -> Iterator[None]:
    """Print which run folder a job runs in and keep `runs/latest` on it (nothing for a folder `--out` named)."""
    if folder is None:
        yield
        return
    print(folder.line(), flush=True)
    with folder.linked():
        yield
