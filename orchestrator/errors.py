"""Errors the CLI turns into exit codes."""


class UserError(Exception):
    """Bad input (recipe, model, data, flags): exit 2 with this one-line message."""


class RunFailed(RuntimeError):
    """A run failed after it started (a shard that failed every retry, a recovery that failed): exit 1
    with this message; the committed work stays for a rerun."""


class RecipeValueError(ValueError):
    """A value its type allows but its range does not: raised by a section's __post_init__, naming the key."""

    def __init__(self, key: str, field_name: str, why: str):
        super().__init__(f"key '{key}': {why}")
        self.field_name, self.why = field_name, why


def require(section: str, *rules: tuple[bool, str, str]) -> None:
    """Each rule is (holds, field, why); the first that fails raises RecipeValueError for `section.field`."""
    for holds, name, why in rules:
        if not holds:
            raise RecipeValueError(f"{section}.{name}" if section else name, name, why)
