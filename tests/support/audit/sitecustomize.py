"""Test support, loaded by every Python process of the simulated cluster's nodes (their PYTHONPATH).

When VERIF_AUDIT_LOG names a folder, each process appends to `<folder>/<pid>.log` every path it opens
(Python's `open` audit event: builtins.open, io.open, os.open) that lies under one of the folders in
VERIF_AUDIT_WATCH. The cluster tests read these logs to show which files the workers touched.
"""

import os
import sys

_LOG_DIR = os.environ.get("VERIF_AUDIT_LOG")
_WATCH = tuple(p for p in os.environ.get("VERIF_AUDIT_WATCH", "").split(os.pathsep) if p)

if _LOG_DIR and _WATCH:
    _log = open(os.path.join(_LOG_DIR, f"{os.getpid()}.log"), "a", buffering=1)

    def _audit(event: str, args: tuple) -> None:
        if event != "open" or not args or isinstance(args[0], int) or args[0] is None:
            return
        path = os.path.abspath(os.fsdecode(args[0]))
        if path.startswith(_WATCH):
            _log.write(path + "\n")

    sys.addaudithook(_audit)
