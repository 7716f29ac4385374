"""Errors a user can fix by changing their input: the command line prints one line and exits 2.

Everything else that goes wrong is a bug and keeps its traceback.
"""


class InputError(Exception):
    """Bad input (config, files, models, output folder), with the key or file and what is valid."""
