"""`python launch.py ARGS` in a process of its own per command, without paying the imports each time.

A bad-input case that needs a model's config or tokenizer runs after torch, transformers and the jobs
are imported (~6-9 s on 2 cores), and even one the configuration alone refuses pays a fresh
interpreter (~0.3-1 s); dozens of cases would cost minutes. A `Launcher` starts one server process
that imports what it is told once (`JOBS_PRELOAD`: the jobs; `LIGHT_PRELOAD`: only what `launch.py`
imports before it parses the command line, so a child that imports torch does so itself) and then
forks a child per command: each child is a separate process that runs `launch.py` as
`python launch.py` would (its own exit code, stdout and stderr in files, its own environment,
optionally a limit on the size of files it writes) and reports, from inside, which heavy packages it
had imported when it exited and which files under the watched folders it opened (Python's `open`
audit event), so a test can show that no worker started and no weights were read. Nothing in the
child is shared back with the server.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "ray", "wandb")
# What a server imports once, before any fork: every job (torch, transformers), or only launch.py's own
# imports (no heavy package), for commands that must be refused before any is imported.
JOBS_PRELOAD = ("launch", "jobs.sweep", "jobs.discover.job", "jobs.generate", "jobs.compare", "jobs.weight_diff")
LIGHT_PRELOAD = ("launch",)


@dataclass(frozen=True)
class Ran:
    """One command's outcome, as the child saw it."""

    returncode: int
    stdout: str
    stderr: str
    modules: list[str]  # the HEAVY packages the child had imported when it exited
    opened: list[str]  # files under the watched folders the child opened


class Launcher:
    """The server (module docstring); `run(args, ...)` runs one command line in a forked child."""

    def __init__(self, work: Path, env: dict[str, str], preload: tuple[str, ...] = JOBS_PRELOAD):
        self.work = Path(work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.count = 0
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.support.launcher", *preload], cwd=REPO, env=env,
                                     bufsize=0, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        ready = self._reply()
        if ready.strip() != "ready":
            raise RuntimeError(f"the launcher server did not start: {ready!r}")

    def run(self, args: list[str], env: dict[str, str] | None = None, watch: tuple[Path, ...] = (),
            file_size_limit: int | None = None, timeout: float = 120.0) -> Ran:
        """`launch.py *args` in a child with `env` added; a child still running after `timeout` seconds is
        killed (SIGKILL, so its return code is -9)."""
        self.count += 1
        base = self.work / f"run{self.count}"
        request = {"args": [str(a) for a in args], "env": env or {}, "watch": [str(p) for p in watch],
                   "fsize": file_size_limit, "base": str(base)}
        self.proc.stdin.write((json.dumps(request) + "\n").encode())
        child = json.loads(self._reply())["pid"]
        if not select.select([self.proc.stdout], [], [], timeout)[0]:
            os.kill(child, signal.SIGKILL)  # not yet reaped by the server, so the pid is still this child's
        reply = self._reply()
        report = json.loads(Path(f"{base}.report").read_text()) if Path(f"{base}.report").exists() else {}
        return Ran(json.loads(reply)["returncode"], Path(f"{base}.out").read_text(), Path(f"{base}.err").read_text(),
                   report.get("modules", []), report.get("opened", []))

    def _reply(self) -> str:
        """One line from the server, read without a buffer (so `select` sees what is not yet read)."""
        line = b""
        while not line.endswith(b"\n"):
            byte = os.read(self.proc.stdout.fileno(), 1)
            if not byte:
                raise RuntimeError(f"the launcher server died (exit {self.proc.wait()})")
            line += byte
        return line.decode()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


# ------------------------------------------------------------------------------------------ the server side


def _child(request: dict) -> None:
    """Runs in the forked child: redirect, limit, watch, run launch.py, report, exit with its code."""
    import atexit
    import resource
    import runpy
    import traceback

    base = request["base"]
    for fd, path, mode in ((0, os.devnull, os.O_RDONLY), (1, f"{base}.out", os.O_WRONLY | os.O_CREAT),
                           (2, f"{base}.err", os.O_WRONLY | os.O_CREAT)):
        target = os.open(path, mode, 0o644)
        os.dup2(target, fd)
        os.close(target)
    os.environ.update(request["env"])
    watched = tuple(request["watch"])
    opened: list[str] = []

    def audit(event: str, args: tuple) -> None:
        if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            path = os.path.abspath(os.fsdecode(args[0]))
            if path.startswith(watched):
                opened.append(path)

    if watched:
        sys.addaudithook(audit)
    _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    if request["fsize"]:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full quota
        resource.setrlimit(resource.RLIMIT_FSIZE, (request["fsize"], hard))
    sys.argv = ["launch.py", *request["args"]]
    try:
        runpy.run_path(str(REPO / "launch.py"), run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - printed as the interpreter would, then exit 1
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    modules = sorted({m.split(".")[0] for m in sys.modules} & set(HEAVY))
    resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
    Path(f"{base}.report").write_text(json.dumps({"modules": modules, "opened": opened}))
    os._exit(code)


def _serve(preload: list[str]) -> None:
    import importlib

    for name in preload:
        importlib.import_module(name)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(request)
        sys.stdout.write(json.dumps({"pid": pid}) + "\n")
        sys.stdout.flush()
        _, status = os.waitpid(pid, 0)
        sys.stdout.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    _serve(sys.argv[1:])
