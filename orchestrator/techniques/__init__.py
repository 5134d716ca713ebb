"""Compression techniques: each one a pure function on tensors, registered by name.

A recipe stage names a technique (`method: rtn`); its remaining keys fill the
technique's parameter dataclass, which validates itself. The registry is the
only place the recipe, the planner and the worker learn what exists.
"""

from orchestrator.techniques.registry import TECHNIQUES, Technique, get_technique
from orchestrator.techniques import magnitude, rtn  # noqa: F401  (registers them)

__all__ = ["TECHNIQUES", "Technique", "get_technique"]
