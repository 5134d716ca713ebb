"""The compression worker: applies a recipe's stages to one shard's Linear layers.

`compress_shard` is plain tensor work (testable without Ray); `CompressionWorker`
is the Ray actor that runs it where the cluster puts it.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass, field

import ray
import torch

from orchestrator.partition import LinearLayer, Shard
from orchestrator.recipe import Stage


@dataclass
class LayerMetrics:
    name: str
    relative_error: float  # ||W_hat - W||_F / ||W||_F
    sqnr_db: float  # 10 log10(||W||^2 / ||W_hat - W||^2); inf when exact
    sparsity: float  # fraction of exact zeros in W_hat
    bits: int | None  # quantization bits, None when not quantized
    group_size: int | None
    methods: list[str]


@dataclass
class ShardResult:
    index: int
    tensors: dict[str, torch.Tensor]  # every checkpoint tensor of the shard, compressed where targeted
    layers: list[LayerMetrics]
    seconds: float
    worker: dict = field(default_factory=dict)  # node, pid, device


def compress_layer(W: torch.Tensor, name: str, stages: list[Stage]) -> tuple[torch.Tensor, LayerMetrics]:
    """W [out, in] float32 -> (compressed W [out, in], metrics). Stages run in recipe order."""
    W_hat, keep, quant, methods = W, None, None, []
    for stage in stages:
        if not stage.applies_to(name):
            continue
        result = stage.technique.apply(W_hat, stage.params)
        W_hat = result.weight
        if result.mask is not None:
            keep = result.mask if keep is None else keep & result.mask
        if keep is not None:
            W_hat = W_hat * keep  # a later stage never revives a pruned weight
        quant = result.quant or quant
        methods.append(stage.technique.name)
    err2 = (W_hat - W).pow(2).sum().item()
    ref2 = W.pow(2).sum().item()
    return W_hat, LayerMetrics(
        name=name,
        relative_error=(err2 / ref2) ** 0.5 if ref2 > 0 else 0.0,
        sqnr_db=10 * torch.log10(torch.tensor(ref2 / err2)).item() if err2 > 0 else float("inf"),
        sparsity=(W_hat == 0).float().mean().item(),
        bits=quant.bits if quant else None,
        group_size=quant.group_size if quant else None,
        methods=methods,
    )


def compress_shard(shard: Shard, tensors: dict[str, torch.Tensor], stages: list[Stage]) -> ShardResult:
    """All of a shard's tensors in -> the same keys out, targeted Linear weights compressed."""
    start = time.perf_counter()
    out = dict(tensors)
    metrics = []
    for layer in shard.linears:
        if not any(s.applies_to(layer.name) for s in stages):
            continue
        W = as_out_in(tensors[layer.weight_key], layer).float()
        W_hat, m = compress_layer(W, layer.name, stages)
        original = tensors[layer.weight_key]
        out[layer.weight_key] = (W_hat.T if layer.transposed else W_hat).to(original.dtype).contiguous()
        metrics.append(m)
    return ShardResult(shard.index, out, metrics, time.perf_counter() - start)


def as_out_in(weight: torch.Tensor, layer: LinearLayer) -> torch.Tensor:
    """Every technique sees W as [out, in]; GPT-2's Conv1D stores [in, out]."""
    return weight.T if layer.transposed else weight


@ray.remote
class CompressionWorker:
    """A Ray actor that compresses the shards it is given, on CUDA if it was granted a GPU."""

    def __init__(self, threads: int):
        torch.set_num_threads(max(1, threads))
        self.device = "cpu"
        if ray.get_gpu_ids():
            if torch.cuda.is_available():
                self.device = "cuda"
            else:
                warnings.warn("Ray granted this worker a GPU but CUDA is not available; compressing on the CPU")

    def compress(self, shard: Shard, tensors: dict[str, torch.Tensor], stages: list[Stage]) -> ShardResult:
        result = compress_shard(shard, tensors, stages)
        ctx = ray.get_runtime_context()
        result.worker = {"node": ctx.get_node_id(), "pid": os.getpid(), "device": self.device}
        return result


@ray.remote
def read_tensors(model_dir: str, keys: list[str], key_to_file: dict[str, str]) -> dict[str, torch.Tensor]:
    """Load a shard's tensors from the checkpoint, on a worker node, into the object store."""
    from orchestrator.checkpoint import read_keys

    return read_keys(model_dir, keys, key_to_file)
