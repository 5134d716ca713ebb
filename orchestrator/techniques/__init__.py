"""Compression techniques: each one a pure function on tensors, registered by name.

A recipe stage names a technique (`method: rtn`); its remaining keys fill the
technique's parameter dataclass, which validates itself. The registry is the
only place the recipe, the planner and the worker learn what exists.

Every technique is called as fn(W [out, in] float32, params, H) -> LayerResult,
H being the layer's [in, in] float32 input Hessian (hessian.py) or None. Those
registered with needs_calibration (gptq, sparsegpt, wanda) require H; rtn and
magnitude ignore it.
"""

from orchestrator.techniques.registry import TECHNIQUES, Technique, get_technique
from orchestrator.techniques import gptq, magnitude, rtn, sparsegpt, wanda  # noqa: F401  (registers them)

__all__ = ["TECHNIQUES", "Technique", "get_technique"]
