"""The statistics of the layers' inputs that calibration collects, and which layers share them.

- `HessianSet`: a running H = 2/n sum x x^T per group of layers that read one tensor (q/k/v, gate/up),
  the tokens each expert was sent, and asymmetric calibration's cross term C;
- `expected_input_groups`: those groups predicted from layer names, for the planner, which runs no model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from orchestrator.partition import LinearLayer
from orchestrator.techniques.hessian import accumulate_hessian


# Layer names whose inputs are one tensor in the architectures we know (q/k/v or query/key/value; gate/up;
# the low-rank q/kv projections of multi-head latent attention, DeepSeek's)
SHARED_INPUT = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "query": "qkv", "key": "qkv", "value": "qkv",
                "gate_proj": "gate_up", "up_proj": "gate_up", "q_a_proj": "qkv_a", "kv_a_proj_with_mqa": "qkv_a"}


def expected_input_groups(layers: list[LinearLayer]) -> dict[tuple[str, str], list[LinearLayer]]:
    """The groups of layers `run_blocks` will find reading one input (one H each), predicted from names:
    (parent module, shared-input name) -> its layers. An expert's projections group by what they read."""
    groups: dict[tuple[str, str], list[LinearLayer]] = {}
    for layer in layers:
        if layer.expert is not None:
            key = (layer.expert.module, f"{layer.expert.expert}.{layer.expert.input_of}")
        else:
            parent, leaf = layer.name.rsplit(".", 1)
            key = (parent, SHARED_INPUT.get(leaf, leaf))
        groups.setdefault(key, []).append(layer)
    return groups


@dataclass
class HessianSet:
    """Running H per group of layers that share an input, and the tokens each expert was sent; with dense
    inputs alongside (asymmetric calibration), the cross term C = (2/n) sum (x - x~) x~^T too (gptq.py)."""

    groups: dict[str, list[str]] = field(default_factory=dict)  # group leader -> member layer names
    H: dict[str, torch.Tensor] = field(default_factory=dict)  # leader -> [in, in] float32
    n: dict[str, int] = field(default_factory=dict)  # leader -> tokens in H
    expert_tokens: dict[str, dict[int, int]] = field(default_factory=dict)  # experts module -> expert -> tokens
    leaders: dict[str, str] = field(default_factory=dict)  # member layer name -> its group's leader
    C: dict[str, torch.Tensor] = field(default_factory=dict)  # leader -> [in, in] float32 cross term

    def leader(self, layer_name: str) -> str | None:
        return self.leaders.get(layer_name)

    def join(self, leader: str, member: str) -> None:
        if member not in self.leaders:
            self.groups.setdefault(leader, []).append(member)
            self.leaders[member] = leader

    def of(self, layer_name: str) -> torch.Tensor | None:
        """The layer's H. No token reached it (an expert the router never chose): the identity, every input
        weighing the same, so GPTQ rounds to nearest and SparseGPT / Wanda prune by magnitude."""
        leader = self.leader(layer_name)
        if leader is None or leader not in self.H:
            return None
        if self.n[leader] == 0:
            return torch.eye(len(self.H[leader]), dtype=self.H[leader].dtype, device=self.H[leader].device)
        return self.H[leader]

    def cross_of(self, layer_name: str) -> torch.Tensor | None:
        """The layer's C, None without dense inputs (or for a group no token reached)."""
        leader = self.leader(layer_name)
        return self.C.get(leader) if leader is not None and self.n.get(leader) else None

    def fold(self, leader: str, members: list[str], x: torch.Tensor, dense_x: torch.Tensor | None = None) -> None:
        """x [..., in], read by every layer in members, into the group's H; dense_x [..., in] the dense
        model's input on the same tokens, into C."""
        for member in members:
            self.join(leader, member)
        n = self.n.get(leader, 0)
        if dense_x is not None:
            self.C[leader], _ = accumulate_hessian(self.C.get(leader), n, x, left=dense_x.to(x.dtype) - x)
        self.H[leader], self.n[leader] = accumulate_hessian(self.H.get(leader), n, x)
