"""Errors the CLI turns into exit codes."""


class UserError(Exception):
    """Bad input (recipe, model, data, flags): exit 2 with this one-line message."""
