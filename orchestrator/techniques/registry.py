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
    apply: Callable  # pure function: (W [out, in] float32, params, H [in, in] float32 | None) -> LayerResult
    needs_calibration: bool = False  # True: apply needs H, the layer's input Hessian (see hessian.py)


def register(name: str, kind: Literal["prune", "quantize"], params: type, *, needs_calibration: bool = False):
    """Decorator: make `fn` available to recipes as `method: <name>`.

    `fn(W, params, H)`: W [out, in] float32; H the [in, in] float32 matrix
    (2/n) sum_k x_k x_k^T over the layer's n calibration inputs, or None. A
    technique registered with needs_calibration=True requires H; the others
    accept it and ignore it.
    """

    def wrap(fn: Callable) -> Callable:
        if name in TECHNIQUES:
            raise RuntimeError(f"technique {name!r} registered twice")
        TECHNIQUES[name] = Technique(name, kind, params, fn, needs_calibration)
        return fn

    return wrap


def get_technique(name: str) -> Technique:
    try:
        return TECHNIQUES[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; known: {', '.join(sorted(TECHNIQUES))}") from None
