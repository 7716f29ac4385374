"""Errors the command line reports as one line: bad input (exit 2), and shards that failed on every
attempt or an output folder that could not be written (exit 1, with the command that resumes:
`jobs.runtime.resumable.JobFailed`).

Everything else that goes wrong is a bug and keeps its traceback.
"""


class InputError(Exception):
    """Bad input (config, files, models, output folder), with the key or file and what is valid."""


class ShardFailed(RuntimeError):
    """A shard failed on every allowed attempt, or no worker is left to run it (a worker that dies, a
    node that is lost: the cluster's doing, not the input's)."""


class WriteFailed(RuntimeError):
    """A file or folder of OUT could not be written (a full disk, a file over the size limit, no
    permission): the machine's doing, not the input's or a bug. What was written before stays."""

    def __init__(self, path, reason: str):
        super().__init__(f"cannot write {path}: {reason}")
        self.path = path
