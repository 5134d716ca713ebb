"""Errors the CLI turns into exit codes."""


class UserError(Exception):
    """Bad input (recipe, model, data, flags): exit 2 with this one-line message."""


class RunFailed(RuntimeError):
    """A run failed after it started (a shard that failed every retry, a recovery that failed): exit 1
    with this message; the committed work stays for a rerun."""
