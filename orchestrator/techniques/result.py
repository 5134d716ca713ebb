"""What a technique returns for one layer."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from orchestrator.techniques.grid import QuantParams


@dataclass
class LayerResult:
    weight: torch.Tensor  # [out, in] float32: the compressed weight, as the model will compute with it
    mask: torch.Tensor | None = None  # [out, in] bool, True = kept (pruning)
    quant: QuantParams | None = None  # scales and zeros (quantization)
    qweight: torch.Tensor | None = None  # [out, in] int32 integers on the grid (quantization)
    stats: dict = field(default_factory=dict)  # per-layer numbers, e.g. GPTQ's damping and loss
