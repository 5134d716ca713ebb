"""The name -> technique registry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

TECHNIQUES: dict[str, "Technique"] = {}


@dataclass(frozen=True)
class Technique:
    name: str
    kind: Literal["prune", "quantize"]
    params: type  # a dataclass whose __post_init__ raises ValueError("<field>: <why>")
    apply: Callable  # pure function: (W [out, in] float32, params) -> LayerResult


def register(name: str, kind: Literal["prune", "quantize"], params: type):
    """Decorator: make `fn` available to recipes as `method: <name>`."""

    def wrap(fn: Callable) -> Callable:
        if name in TECHNIQUES:
            raise RuntimeError(f"technique {name!r} registered twice")
        TECHNIQUES[name] = Technique(name, kind, params, fn)
        return fn

    return wrap


def get_technique(name: str) -> Technique:
    try:
        return TECHNIQUES[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; known: {', '.join(sorted(TECHNIQUES))}") from None
