"""The recipe's `cluster` section: how `orchestrator run` uses the machines, and the cluster that
`orchestrator plan` plans for (a described one, or this machine).

Checked through errors.require: a value out of range raises RecipeValueError naming the key (exit 2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from orchestrator.errors import require


@dataclass
class ClusterConfig:
    address: Optional[str] = None  # None: an embedded local Ray; "auto" or ray://host:port: join one
    workers: int = 2  # compression actors
    cpus_per_worker: float = 1.0
    gpus_per_worker: str = "auto"  # auto: 1 per worker when Ray has GPUs (shared when fewer than workers), else 0; or a number (fractions allowed)
    max_restarts: int = 2  # per actor; also the retries a shard gets
    memory_gb: float = 0.0  # memory the planner may plan for on this machine; 0 = what is available now
    # A described cluster, for planning: `orchestrator run` still uses the machines Ray has, but its plan
    # (the forecast in report.json, the refusal of a shard too big for a GPU) follows these when given.
    # gpus_per_node > 0: the plan is made for nodes x gpus_per_node GPUs, one worker per GPU (cluster.workers
    # is then not used); 0: this machine, its CPUs, with rates measured at plan time.
    nodes: int = 1
    gpus_per_node: int = 0
    gpu_memory_gb: float = 80.0  # per GPU: the limit a shard's GPU-side memory must fit
    host_memory_gb: float = 0.0  # per node (RAM); 0 = unknown, not checked
    network_gbps: float = 100.0  # between nodes, gigabits per second, per node
    read_gb_per_s: float = 2.0  # weight loading from storage (and writing the export), gigabytes per second, per node
    gpu_tflops: float = 400.0  # float32 matmul rate one GPU reaches on the calibration matmuls (TF32 tensor
    #                            cores; H100 SXM: 495 TF32 dense peak), teraflop/s, achieved not peak

    def __post_init__(self):
        require("cluster",
                (self.workers >= 1, "workers", "must be >= 1"),
                (self.cpus_per_worker > 0, "cpus_per_worker", "must be > 0"),
                (valid_gpus(self.gpus_per_worker), "gpus_per_worker",
                 f"must be auto or a number >= 0 (fractions below 1 allowed), not {self.gpus_per_worker!r}"),
                (self.max_restarts >= 0, "max_restarts", "must be >= 0"),
                (self.memory_gb >= 0, "memory_gb", "must be >= 0 (0: this machine's available memory)"),
                (self.nodes >= 1, "nodes", "must be >= 1"),
                (self.gpus_per_node >= 0, "gpus_per_node", "must be >= 0 (0: plan for this machine's CPUs)"),
                (self.gpu_memory_gb > 0, "gpu_memory_gb", "must be > 0 (gigabytes per GPU)"),
                (self.host_memory_gb >= 0, "host_memory_gb", "must be >= 0 (gigabytes per node; 0: unknown)"),
                (self.network_gbps > 0, "network_gbps", "must be > 0 (gigabits per second between nodes)"),
                (self.read_gb_per_s > 0, "read_gb_per_s", "must be > 0 (gigabytes per second from storage)"),
                (self.gpu_tflops > 0, "gpu_tflops", "must be > 0 (teraflop/s per GPU)"))

    @property
    def described(self) -> bool:
        """Whether the plan is for described GPUs (gpus_per_node > 0) rather than this machine."""
        return self.gpus_per_node > 0

    @property
    def planned_workers(self) -> int:
        """The workers the plan counts: one per described GPU, else cluster.workers."""
        return self.nodes * self.gpus_per_node if self.described else self.workers


def valid_gpus(value: str) -> bool:
    if value == "auto":
        return True
    try:
        gpus = float(value)
    except ValueError:
        return False
    return gpus >= 0 and (gpus <= 1 or gpus.is_integer())  # Ray: above 1, whole GPUs only
