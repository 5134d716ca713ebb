"""The compression worker: applies a recipe's stages to one shard's Linear layers.

`compress_shard` is plain tensor work (testable without Ray); `CompressionWorker`
is the Ray actor that runs it where the cluster puts it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import resource
import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import Callable

import ray
import torch
from safetensors.torch import load_file

from orchestrator.awq import awq_stage, scale_shard, scaled_input
from orchestrator.capture import (BlockInputs, block_kind, build_blocks, capture_block_inputs,
                                  expert_outputs, recalibrate_experts, replay_of, run_blocks)
from orchestrator.checkpoint import read_keys, write_tensors
from orchestrator.export import QuantizedLayer, pack_shard, scheme_of
from orchestrator.input_stats import HessianSet
from orchestrator.partition import LinearLayer, Shard
from orchestrator.recipe import ExpertsConfig, Stage
from orchestrator.techniques.grid import QuantParams
from orchestrator.techniques.hessian import shared_factors
from orchestrator.techniques.result import weight_error

log = logging.getLogger(__name__)


@dataclass
class LayerMetrics:
    name: str
    relative_error: float  # ||W_hat - W||_F / ||W||_F
    sqnr_db: float  # 10 log10(||W||^2 / ||W_hat - W||^2); inf when exact
    sparsity: float  # fraction of exact zeros in W_hat
    bits: int | None  # quantization bits, None when not quantized
    group_size: int | None
    methods: list[str]
    stats: dict = field(default_factory=dict)  # per technique, e.g. {"gptq": {"damp": 0.01, "damp_raised": False}}


@dataclass
class ShardFiles:
    """Where a worker writes a shard (paths every node can reach): the checkpoint the run evaluates
    (every weight on its grid, dense dtype) and the export (the same, packed by compressed-tensors)."""

    evaluated: str
    export: str


@dataclass
class ShardResult:
    index: int
    tensors: dict[str, torch.Tensor]  # every checkpoint tensor of the shard; emptied once written to disk
    layers: list[LayerMetrics]
    seconds: float
    worker: dict = field(default_factory=dict)  # node, pid, device
    quant: dict[str, QuantParams] = field(default_factory=dict)  # layer name -> its grid (quantized layers)
    capture_seconds: float = 0.0  # running the blocks over the calibration activations (Hessians, outputs)
    cpu_seconds: float = 0.0  # CPU time of the worker process on this shard, all threads
    capture_window: tuple[float, float] | None = None  # epoch s: its first calibration chunk began, its last ended
    capture_chunks: int = 0  # the calibration set came in this many chunks (shard_pool.py)
    evaluated_keys: list[str] = field(default_factory=list)  # the keys written to each file
    export_keys: list[str] = field(default_factory=list)
    evaluated_bytes: int = 0  # tensor bytes written to each file
    export_bytes: int = 0
    quantized: list[QuantizedLayer] = field(default_factory=list)  # the layers packed in the export
    packed_bytes: int = 0  # their bytes in the export (integers, scales, zeros, shapes)
    # experts module -> {"tokens": calibration tokens routed to each expert, "min_tokens", "under_calibrated"}
    experts: dict[str, dict] = field(default_factory=dict)


@dataclass
class Calibrating:
    """A shard whose calibration chunks are still coming (CompressionWorker.calibrate)."""

    tensors: dict[str, torch.Tensor]
    blocks: torch.nn.ModuleList
    hessians: HessianSet
    started: float  # epoch s
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    chunks: int = 0  # calls so far


# What a shard's blocks hand on: hidden states per batch; a part of an expert-split block, the routed outputs
# of its experts instead (experts module -> per batch: expert -> y [tokens sent to it, hidden])
Outputs = list[torch.Tensor] | dict[str, list[dict[int, torch.Tensor]]]


def shard_outputs(shard: Shard, hidden: list[torch.Tensor], kept: dict) -> Outputs:
    return hidden if shard.experts is None else {module: outputs.kept for module, outputs in kept.items()}


def compress_layer(
    W: torch.Tensor, name: str, stages: list[Stage], H: torch.Tensor | None = None,
    storage_dtype: torch.dtype = torch.float32, router: bool = False, C: torch.Tensor | None = None,
) -> tuple[torch.Tensor, LayerMetrics, QuantParams | None]:
    """W [out, in] float32 -> (compressed W [out, in], metrics, the grid if quantized). Stages run in recipe order.

    storage_dtype: the checkpoint's dtype, which `scale_dtype: auto` resolves to.

    H: the layer's [in, in] float32 input Hessian (techniques/hessian.py), or None
    when no calibration statistics are available. C: its asymmetric cross term (capture.HessianSet),
    handed to a stage whose `asymmetric` weight is > 0.
    """
    W_hat, keep, quant, methods, stats = W, None, None, [], {}
    for stage in stages:
        if not stage.applies_to(name, router):
            continue
        cross = (C,) if getattr(stage.params, "asymmetric", 0) > 0 else ()
        result = stage.technique.apply(W_hat, resolve_scale_dtype(stage.params, storage_dtype), H, *cross)
        W_hat = result.weight
        if result.mask is not None:
            keep = result.mask if keep is None else keep & result.mask
        if keep is not None:
            W_hat = W_hat * keep  # a later stage never revives a pruned weight
        quant = result.quant or quant
        methods.append(stage.technique.name)
        if result.stats:
            stats[stage.technique.name] = {k: v.item() if isinstance(v, torch.Tensor) else v
                                           for k, v in result.stats.items()}
    relative_error, sqnr_db = weight_error(W_hat, W)
    metrics = LayerMetrics(
        name=name,
        relative_error=relative_error,
        sqnr_db=sqnr_db,
        sparsity=(W_hat == 0).float().mean().item(),
        bits=quant.bits if quant else None,
        group_size=quant.group_size if quant else None,
        methods=methods,
        stats=stats,
    )
    return W_hat, metrics, quant


def resolve_scale_dtype(params, storage_dtype: torch.dtype):
    """`scale_dtype: auto` -> the checkpoint's dtype when it is 16-bit (scales then round-trip), else float32."""
    if getattr(params, "scale_dtype", None) != "auto":
        return params
    half = {torch.bfloat16: "bfloat16", torch.float16: "float16"}
    return dataclasses.replace(params, scale_dtype=half.get(storage_dtype, "float32"))


def compress_shard(shard: Shard, tensors: dict[str, torch.Tensor], stages: list[Stage],
                   hessian_of: Callable[[str], torch.Tensor | None] = lambda name: None,
                   device: torch.device = torch.device("cpu"),
                   cross_of: Callable[[str], torch.Tensor | None] = lambda name: None) -> ShardResult:
    """All of a shard's tensors in -> the same keys out, targeted Linear weights compressed.

    Each layer is compressed on `device` (its Hessian moved there too); what comes back is on the CPU."""
    start = time.perf_counter()
    awq_stats = {}
    if stage := awq_stage(stages):  # scaled input channels, folded into the norms and layers before them
        tensors, scales, awq_stats = scale_shard(shard, tensors, stage, hessian_of)
        hessian_of, cross_of = scaled_input(hessian_of, scales), scaled_input(cross_of, scales)
    out = dict(tensors)
    metrics, grids = [], {}
    with shared_factors():  # layers reading one input (one H tensor) share its factorisation
        for layer in shard.linears:
            if not any(s.applies_to(layer.name, layer.router) for s in stages):
                continue
            original = tensors[layer.weight_key]
            W = as_out_in(original, layer).to(device=device, dtype=torch.float32)
            H, C = hessian_of(layer.name), cross_of(layer.name)
            W_hat, m, quant = compress_layer(W, layer.name, stages, None if H is None else H.to(device),
                                             original.dtype, layer.router, None if C is None else C.to(device))
            out[layer.weight_key] = (W_hat.T if layer.transposed else W_hat).to("cpu", original.dtype).contiguous()
            if layer.name in awq_stats:
                m.stats["awq"] = awq_stats[layer.name]
            metrics.append(m)
            if quant is not None:
                grids[layer.name] = dataclasses.replace(quant, scale=quant.scale.cpu(), zero=quant.zero.cpu())
    return ShardResult(shard.index, out, metrics, time.perf_counter() - start, quant=grids)


def write_files(shard: Shard, result: ShardResult, files: ShardFiles) -> None:
    """Write the shard as evaluated and as exported (packed); record keys and bytes in `result`.

    GPT-2's Conv1D layers stay dense in the export: compressed-tensors only
    quantizes nn.Linear (and nn.Embedding) modules when it loads a checkpoint.
    """
    layers = {layer.name: layer for layer in shard.linears}
    result.quantized = [QuantizedLayer(name, layers[name].weight_key, scheme_of(q, layers[name].in_features))
                        for name, q in sorted(result.quant.items()) if not layers[name].transposed]
    packed, result.packed_bytes = pack_shard(result.tensors, result.quantized, result.quant)
    result.evaluated_bytes = write_tensors(Path(files.evaluated), result.tensors)
    result.export_bytes = write_tensors(Path(files.export), packed)
    result.evaluated_keys, result.export_keys = sorted(result.tensors), sorted(packed)


def as_out_in(weight: torch.Tensor, layer: LinearLayer) -> torch.Tensor:
    """Every technique sees W as [out, in]; GPT-2's Conv1D stores [in, out]."""
    return weight.T if layer.transposed else weight


def compute_device(gpu_ids: list, cuda_available: bool) -> torch.device:
    """CUDA when Ray granted this worker a GPU and CUDA works here; otherwise the CPU (with a warning
    when a GPU was granted but CUDA is absent). Ray sets CUDA_VISIBLE_DEVICES, so "cuda" is our GPU."""
    if gpu_ids and cuda_available:
        return torch.device("cuda")
    if gpu_ids:
        log.warning("Ray granted this worker GPU %s but CUDA is not available (torch %s); compressing on the CPU",
                    ", ".join(map(str, gpu_ids)), torch.__version__)
    return torch.device("cpu")


@ray.remote
class CompressionWorker:
    """A Ray actor that compresses the shards it is given, on CUDA if it was granted a GPU.

    It reads each shard's tensors itself, straight from the checkpoint's
    safetensors files (a path every node can read): no weights pass through the
    driver or the object store on the way in.

    Data-free stages need one call, `compress`. Calibration-aware stages need two:
    `calibrate` runs the shard's blocks over its input activations, keeps the
    shard's tensors and the layers' Hessians here and returns the blocks' outputs
    (the next shard's inputs in parallel mode) at once; `compress` then uses them
    and, in sequential mode, returns the compressed blocks' outputs instead.
    """

    def __init__(self, threads: int, model_dir: str, key_to_file: dict[str, str], config=None):
        torch.set_num_threads(max(1, threads))
        self.model_dir, self.key_to_file, self.config = model_dir, key_to_file, config
        self.kind = block_kind(config) if config is not None else None
        self.calibrating: dict[int, Calibrating] = {}  # shard -> its calibration so far (chunks to come)
        # shard -> (tensors, Hessians, routing, (capture wall s, capture CPU s, (first start, last end) epoch s,
        # chunks))
        self.calibrated: dict[int, tuple[dict[str, torch.Tensor], HessianSet, dict, tuple]] = {}
        self.device = compute_device(ray.get_gpu_ids(), torch.cuda.is_available())

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        return read_keys(self.model_dir, keys, self.key_to_file)

    def embed(self, stem_keys: list[str], input_ids: torch.Tensor, batch_size: int,
              attention_mask: torch.Tensor | None = None, chunks: list[tuple[int, int]] = ((0, None),)) -> list:
        """The first block's inputs for the calibration ids (padded sentences: with their mask), cut in
        `chunks` (ranges of batches): [hidden states per batch of each chunk..., block kwargs per batch of
        each chunk...], 2 x len(chunks) lists."""
        inputs = capture_block_inputs(self.config, self.read(stem_keys), input_ids, batch_size, attention_mask)
        return [inputs.hidden[a:b] for a, b in chunks] + [inputs.kwargs[a:b] for a, b in chunks]

    def calibrate(self, shard: Shard, hidden: list[torch.Tensor], kwargs: list[dict],
                  stages: list[Stage], experts: ExpertsConfig, hand_on: bool = True,
                  dense: list[torch.Tensor] | None = None, masks: list[torch.Tensor] | None = None,
                  first: bool = True, last: bool = True) -> Outputs | None:
        """Hessians of the layers that need them (and of under-calibrated experts, as `experts` says), kept
        here with the tokens each expert was sent; returns the dense blocks' outputs (a part of a block:
        its experts' outputs) when `hand_on` (parallel mode: the next shard's inputs), else None.
        The calibration set may come in chunks of batches (shard_pool.py), one call each, in order: `first`
        reads the shard and builds its blocks, `last` finishes the Hessians (experts: whole sets only).
        dense: the dense model's hidden states of the same batches (asymmetric calibration, sequential
        mode): the cross terms are kept too, and the outputs returned are the dense chain's next link.
        masks: per batch the tokens that are not padding (capture.token_masks), the only ones in H."""
        wall, cpu, started = time.perf_counter(), time.process_time(), time.time()
        if first:
            tensors = self.read(list(shard.tensor_keys))
            blocks = build_blocks(self.kind, shard, {**tensors, **self.context(shard, None)}).to(self.device)
            self.calibrating[shard.index] = Calibrating(tensors, blocks, HessianSet(), started)
        state = self.calibrating.get(shard.index)
        if state is None:
            raise RuntimeError(f"shard {shard.index}: a later chunk of calibration without the first (restarted?)")
        wanted = [layer for layer in shard.linears
                  if any(s.needs_calibration and s.applies_to(layer.name, layer.router) for s in stages)]
        inputs = BlockInputs(hidden, kwargs, masks)
        with expert_outputs(state.blocks, shard) as kept:
            outputs, _ = run_blocks(state.blocks, inputs, shard, wanted, self.device, dense=dense,
                                    hessians=state.hessians)
        routing = recalibrate_experts(state.blocks, inputs, shard, wanted, state.hessians, experts.min_tokens,
                                      experts.under_calibrated, self.device) if last else {}
        state.seconds += time.perf_counter() - wall
        state.cpu_seconds += time.process_time() - cpu
        state.chunks += 1
        if last:
            del self.calibrating[shard.index]
            self.calibrated[shard.index] = (state.tensors, state.hessians, routing,
                                            (state.seconds, state.cpu_seconds, (state.started, time.time()),
                                             state.chunks))
        return shard_outputs(shard, outputs, kept) if hand_on else None

    def forward(self, shard: Shard, hidden: list[torch.Tensor], kwargs: list[dict], source: str | None,
                context_source: str | None = None) -> Outputs:
        """The shard's blocks run on `hidden` -> their outputs: the dense blocks (source None), or the
        compressed ones in the safetensors file `source` (a part reads its context from `context_source`,
        its part 0's file). Rebuilds a lost or skipped link of the chain."""
        tensors = load_file(source) if source else self.read(list(shard.tensor_keys))
        return self.run(shard, {**tensors, **self.context(shard, context_source)}, hidden, kwargs)

    def combine(self, head: Shard, hidden: list[torch.Tensor], kwargs: list[dict], source: str | None,
                *parts: dict[str, list[dict]]) -> list[torch.Tensor]:
        """An expert-split block's output: its head (partition.head_of; dense, or compressed in its part 0's
        file `source`) run on `hidden`, every expert's output replayed from its part's."""
        tensors = self.read_from(list(head.tensor_keys), source)
        blocks = build_blocks(self.kind, head, tensors).to(self.device)
        with expert_outputs(blocks, head, replay_of(parts, len(hidden))):
            return run_blocks(blocks, BlockInputs(hidden, kwargs), device=self.device)[0]

    def context(self, shard: Shard, source: str | None) -> dict[str, torch.Tensor]:
        """The block tensors a part reads but does not write (its part 0's), from `source` (read_from)."""
        return self.read_from(list(shard.context_keys), source) if shard.context_keys else {}

    def read_from(self, keys: list[str], source: str | None) -> dict[str, torch.Tensor]:
        """Tensors from the checkpoint (source None) or from the safetensors file `source` (a compressed shard)."""
        if source is None:
            return self.read(keys)
        return read_keys(Path(source).parent, keys, dict.fromkeys(keys, Path(source).name))

    def run(self, shard: Shard, tensors: dict[str, torch.Tensor], hidden: list[torch.Tensor],
            kwargs: list[dict]) -> Outputs:
        blocks = build_blocks(self.kind, shard, tensors).to(self.device)
        with expert_outputs(blocks, shard) as kept:
            outputs = run_blocks(blocks, BlockInputs(hidden, kwargs), device=self.device)[0]
        return shard_outputs(shard, outputs, kept)

    def check_loads(self, *args) -> dict:
        """export.check_loads in this process, whose libraries are imported already (driver.py)."""
        from orchestrator.export import check_loads

        return check_loads(*args)

    def write_rest(self, keys: list[str], files: ShardFiles) -> int:
        """Copy the tensors outside the blocks (embeddings, norms, head) to both outputs; -> tensor bytes."""
        tensors = self.read(keys)
        write_tensors(Path(files.evaluated), tensors)
        return write_tensors(Path(files.export), tensors)

    def compress(self, shard: Shard, stages: list[Stage], files: ShardFiles, hidden: list[torch.Tensor] | None = None,
                 kwargs: list[dict] | None = None, context_source: str | None = None) -> tuple[ShardResult, Outputs | None]:
        """Compress a shard and write it to `files`; -> (result without tensors, the compressed blocks'
        outputs on `hidden` when given (sequential mode; a part reads its block's compressed attention
        from `context_source`), else None)."""
        cpu = time.process_time()
        tensors, hessians, routing, (capture_s, capture_cpu_s, window, chunks) = self.calibrated.pop(
            shard.index, (None, None, {}, (0.0, 0.0, None, 0)))
        if tensors is None and any(s.needs_calibration for s in stages):
            raise RuntimeError(f"shard {shard.index}: no calibration statistics on this worker (restarted?)")
        if tensors is None:
            tensors = self.read(list(shard.tensor_keys))
        result = compress_shard(shard, tensors, stages, hessians.of if hessians else (lambda name: None),
                                self.device, hessians.cross_of if hessians else (lambda name: None))
        outputs = None
        if hidden is not None:
            outputs = self.run(shard, {**result.tensors, **self.context(shard, context_source)}, hidden, kwargs)
        write_files(shard, result, files)
        result.tensors, result.quant = {}, {}  # the driver gets the record, never the weights
        ctx = ray.get_runtime_context()
        result.worker = {"node": ctx.get_node_id(), "pid": os.getpid(), "device": str(self.device),
                         "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
                         "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
        result.capture_seconds, result.capture_window, result.capture_chunks = capture_s, window, chunks
        result.experts = routing
        result.cpu_seconds = capture_cpu_s + time.process_time() - cpu
        return result, outputs
