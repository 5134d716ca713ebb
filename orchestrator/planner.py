"""Before any work: what a run will need (memory per process, object-store volume, time), and a refusal
when it cannot fit.

Memory model of one worker compressing one shard (everything it holds at its peak):
- base: the process with torch, transformers, Ray and this package imported (measured: this
  driver process's resident set, which has imported the same), plus WORKER_OVERHEAD_BYTES for what a
  working worker holds beyond its shard (allocator arenas, Ray's task buffers; measured);
- weights: the shard's tensors as read (stored dtype), the compressed copies of the layers it
  rewrites, and an allowance of the shard's size again for the packed copy and what the allocator
  keeps between a worker's shards (fitted to measured peaks: safetensors writes from the tensors'
  own memory, without a serialisation buffer); float32 temporaries of the widest layer (the
  technique's and the packing check's, about six copies);
- Hessians (calibrated stages): one [in, in] float32 matrix per group of layers sharing an input;
- activations (calibrated stages): the shard's input and output hidden states,
  num_samples x seq_len x hidden x 4 bytes each, plus one batch's intermediate activations;
- the GPTQ / SparseGPT factorisation of the widest layer: about four [in, in] float32 matrices.
A part of an expert-split block (partition.py) counts its own tensors and the context it reads, its
experts' Hessians, and for its outputs its experts' routed outputs (tokens x top-k x its share of the
block's experts x hidden x 4 bytes) instead of hidden states. Adding up a split block's output is a
step of its own: base + the block's other tensors (read, and built) + input and output hidden states +
every part's routed outputs; those routed outputs sit in the object store until then.
One worker also copies the tensors outside the blocks (embeddings, norms, head) and, for calibrated
stages, embeds the calibration ids with them: a step of its own, base + those tensors once (read
memory-mapped, written from the same pages) + the first block's input activations.
The driver holds no weights: its base (the same libraries, and matplotlib, which it imports for the
plots), Ray's client (RAY_DRIVER_BYTES), the partition and the calibration token ids. The object
store holds the activations between shards, one hidden-state tensor per shard boundary in flight:
in parallel mode each busy worker's input plus the newest output (the next shard's input), workers
+ 1 at once; in sequential mode one shard's input and output.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import psutil
import torch
from safetensors import safe_open

from orchestrator.input_stats import expected_input_groups
from orchestrator.errors import UserError
from orchestrator.partition import Shard, load_config

FLOAT32 = 4
RAY_DRIVER_BYTES = 40_000_000  # what ray.init adds to the driver's resident set (measured: Ray 2.60, Linux)
# What a worker's resident set holds at its peak beyond the shard's own terms: the allocator's arenas and
# the heap's high-water mark, Ray's task buffers (measured on the planner test's 70 MB Llama, sequential:
# peaks 740-774 MB against 667 MB forecast without this term; Intel Xeon, 2 cores)
WORKER_OVERHEAD_BYTES = 60_000_000


@dataclass
class ShardForecast:
    index: int
    weight_bytes: int
    hessian_bytes: int
    activation_bytes: int
    factorisation_bytes: int
    peak_bytes: int  # the worker's predicted peak RSS while on this shard (base included)
    gflop: float


@dataclass
class Forecast:
    base_bytes: int  # one process with the libraries imported
    driver_bytes: int
    worker_bytes: int  # the largest shard's peak
    object_store_bytes: int  # activations in flight at once
    activation_traffic_bytes: int  # all hidden states passed between shards
    shards: list[ShardForecast]
    seconds: float  # estimated compression wall time
    gflops: float  # this machine's measured matmul throughput, one thread
    tokens: int = 0  # the calibration tokens it counts

    def summary(self) -> dict:
        return {"base_bytes": self.base_bytes, "driver_bytes": self.driver_bytes, "worker_bytes": self.worker_bytes,
                "object_store_bytes": self.object_store_bytes, "seconds": round(self.seconds, 1),
                "gflops": round(self.gflops, 1),
                "shards": [{"index": s.index, "peak_bytes": s.peak_bytes} for s in self.shards]}


def peak_rss() -> int:
    """The highest resident set of this process since it started, in bytes: the kernel's high-water mark
    (VmHWM), which sees every spike, the imports and the planning included.

    (Not getrusage's ru_maxrss: Linux carries that over from the parent across exec, so a driver started
    by a large process would report the parent's peak.)
    """
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))


def tensor_bytes(model_dir, keys: list[str], key_to_file: dict[str, str]) -> dict[str, int]:
    """Bytes of each named tensor, from the safetensors headers (no data read)."""
    sizes, by_file = {}, {}
    for k in keys:
        by_file.setdefault(key_to_file[k], []).append(k)
    for fname, names in by_file.items():
        with safe_open(f"{model_dir}/{fname}", framework="pt") as f:
            for k in names:
                s = f.get_slice(k)
                numel = 1
                for d in s.get_shape():
                    numel *= d
                sizes[k] = numel * {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}.get(s.get_dtype(), 4)
    return sizes


def matmul_gflops(seconds: float = 0.3) -> float:
    """Measured float32 matmul throughput of one thread on this machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    a @ b
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        n += 1
    torch.set_num_threads(threads)
    return n * 2 * 512**3 / (time.perf_counter() - start) / 1e9


def shard_forecast(shard: Shard, sizes: dict[str, int], base: int, calibrated: bool, tokens: int, batch_tokens: int,
                   hidden: int, output_bytes: int, routed_share: float = 1.0) -> ShardForecast:
    """output_bytes: what the shard's blocks hand on (the hidden states; a part's expert outputs);
    routed_share: the fraction of the tokens an expert sees on average (top-k / experts per block)."""
    weights = sum(sizes[k] for k in (*shard.tensor_keys, *shard.context_keys))
    rewritten = sum(sizes[layer.weight_key] for layer in shard.linears)
    allowance = weights  # the packed copy, the allocator's slack
    widest = max(shard.linears, key=lambda l: l.in_features * l.out_features)
    working = 6 * widest.in_features * widest.out_features * FLOAT32  # technique and packing temporaries
    hessians = activations = factorisation = 0
    flops = 0.0
    if calibrated:
        groups = expected_input_groups(shard.linears)
        widths = {group: members[0].in_features for group, members in groups.items()}
        seen = lambda layer: tokens * (routed_share if layer.expert else 1.0)  # the tokens a layer's input holds
        hessians = sum(w * w * FLOAT32 for w in widths.values())
        widest_ffn = max(l.out_features for l in shard.linears)
        activations = tokens * hidden * FLOAT32 + output_bytes + 4 * batch_tokens * widest_ffn * FLOAT32
        factorisation = 4 * max(l.in_features for l in shard.linears) ** 2 * FLOAT32
        flops += sum(2 * seen(l) * l.in_features * l.out_features for l in shard.linears)  # the forward pass
        flops += sum(2 * seen(groups[g][0]) * w * w for g, w in widths.items())  # X^T X
        flops += sum(2 * l.in_features**3 + 2 * l.out_features * l.in_features * 128 for l in shard.linears)
    else:
        flops += sum(10 * l.in_features * l.out_features for l in shard.linears)
    peak = base + WORKER_OVERHEAD_BYTES + weights + rewritten + allowance + working + hessians + activations \
        + factorisation
    return ShardForecast(shard.index, weights, hessians, activations, factorisation, peak, flops / 1e9)


def routed_bytes(partition, shard: Shard, tokens: int, hidden: int, top_k: int) -> int:
    """A part's expert outputs: each token's top_k outputs, the part's share of its block's experts."""
    held = shard.experts[1] - shard.experts[0]
    return int(tokens * top_k * held / partition.parts_of(shard)[-1].experts[1] * hidden * FLOAT32)


def forecast(recipe, model_dir, partition, tokens: int | None) -> Forecast:
    """The memory and time a run of `recipe` on these shards will take (see the module docstring).
    tokens: the calibration's token count (None: no stage calibrates)."""
    cfg = recipe.config
    keys = [k for s in partition.shards for k in s.tensor_keys] + list(partition.rest_keys)
    sizes = (partition.key_bytes if partition.key_bytes is not None  # planned from config.json alone
             else tensor_bytes(model_dir, keys, partition.key_to_file))
    rest = sum(sizes[k] for k in partition.rest_keys)  # copied (and used to embed) by one worker
    base = psutil.Process().memory_info().rss  # a worker imports the same libraries
    import orchestrator.plots  # noqa: F401  the driver's one more library (matplotlib), counted in its base
    driver_base = psutil.Process().memory_info().rss
    calibrated, tokens = tokens is not None, tokens or 0
    batch_tokens = cfg.data.calibration.batch_size * cfg.data.calibration.seq_len
    config = load_config(model_dir, cfg.model.trust_remote_code)
    hidden = getattr(config, "hidden_size", None) or config.n_embd  # the residual stream's width
    activation = tokens * hidden * FLOAT32
    top_k = getattr(config, "num_experts_per_tok", None) or 1
    experts = next((getattr(config, n) for n in ("num_local_experts", "n_routed_experts", "num_experts")
                    if getattr(config, n, None)), 1)  # per MoE block
    shards = [shard_forecast(s, sizes, base, calibrated, tokens, batch_tokens, hidden,
                             activation if s.experts is None else routed_bytes(partition, s, tokens, hidden, top_k),
                             min(1.0, top_k / experts))
              for s in partition.shards]
    # an expert-split block's output: its head run once more, every part's expert outputs replayed
    routed = tokens * top_k * hidden * FLOAT32 if any(s.experts for s in partition.shards) else 0
    combine = max((base + 2 * sum(sizes[k] for k in s.context_keys) + 2 * activation + routed
                   for s in partition.shards if s.context_keys), default=0)
    workers = min(cfg.cluster.workers, len(shards))
    in_flight = 2 if cfg.partition.calibration == "sequential" else workers + 1
    gflops = matmul_gflops()
    threads = max(1, int(cfg.cluster.cpus_per_worker))
    compute = sum(s.gflop for s in shards) / (gflops * threads * workers)
    return Forecast(
        base_bytes=base,
        driver_bytes=driver_base + RAY_DRIVER_BYTES + tokens * 8,  # the int64 calibration ids
        worker_bytes=max(*(s.peak_bytes for s in shards), base + rest + activation, combine),
        object_store_bytes=in_flight * activation + routed,  # + one split block's expert outputs
        activation_traffic_bytes=(len(shards) + 1) * activation + routed * len({s.blocks for s in partition.shards
                                                                               if s.experts}),
        shards=shards,
        seconds=compute + 10.0,  # + starting Ray and the workers
        gflops=gflops,
        tokens=tokens,
    )


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def needed_bytes(fc: Forecast, recipe) -> int:
    """The memory of the run's processes at once: the driver, every worker at its peak, the object store."""
    return fc.driver_bytes + min(recipe.config.cluster.workers, len(fc.shards)) * fc.worker_bytes + fc.object_store_bytes


def available_bytes(recipe) -> int:
    return int(recipe.config.cluster.memory_gb * 1e9) or psutil.virtual_memory().available


def fits(fc: Forecast, recipe) -> bool:
    """Whether the run fits this machine's memory (a cluster's nodes are Ray's scheduler's to judge)."""
    return bool(recipe.config.cluster.address) or needed_bytes(fc, recipe) <= available_bytes(recipe)


def check_fits(fc: Forecast, plan) -> None:
    """Refuse (UserError, exit 2) a plan whose processes cannot fit this machine's memory
    (`cluster.memory_gb`, or what is available now)."""
    cfg = plan.recipe.config
    if fits(fc, plan.recipe):
        return
    workers = min(cfg.cluster.workers, len(fc.shards))
    experts = " (experts already split as finely as they go)" if plan.partition.experts_per_shard == 1 else ""
    raise UserError(
        f"plan: this run needs about {gb(needed_bytes(fc, plan.recipe))} (driver {gb(fc.driver_bytes)} + {workers} "
        f"workers x {gb(fc.worker_bytes)} + object store {gb(fc.object_store_bytes)}) but "
        f"{gb(available_bytes(plan.recipe))} is available{experts}; lower partition.blocks_per_shard (now "
        f"{cfg.partition.blocks_per_shard}), cluster.workers (now {cfg.cluster.workers}), "
        f"data.calibration.num_samples (now {cfg.data.calibration.num_samples}) or data.calibration.seq_len "
        f"(now {cfg.data.calibration.seq_len})")


def forecast_table(fc: Forecast, plan) -> str:
    """The plan as `orchestrator plan` prints it."""
    p = plan.partition
    lines = [f"model: {plan.model_dir} ({p.architecture}, {p.num_params / 1e6:.1f}M parameters, {p.num_blocks} blocks)",
             *([f"sizes: from config.json alone (no weights in the folder), tensors of {p.dtype}"]
               if p.key_bytes is not None else []),
             *([f"calibration: {fc.tokens} tokens, data.calibration.num_samples x seq_len (no data read without "
                "weights)"] if plan.calibration is None and fc.tokens else []),
             f"shards: {len(p.shards)} of {plan.recipe.config.partition.blocks_per_shard} block(s); "
             f"workers: {plan.recipe.config.cluster.workers}",
             *([f"experts: {p.experts_per_shard} per shard in blocks with more ("
                + ("partition.experts_per_shard" if plan.recipe.config.partition.experts_per_shard else
                   "chosen by the planner: whole blocks do not fit") + ")"]
               if any(s.experts for s in p.shards) else []),
             "", "| shard | modules | weights | Hessians | activations | factorisation | predicted worker peak |",
             "|---|---|---|---|---|---|---|"]
    for s, shard in zip(fc.shards, p.shards):
        lines.append(f"| {s.index} | {shard.label} | {gb(s.weight_bytes)} | {gb(s.hessian_bytes)} | "
                     f"{gb(s.activation_bytes)} | {gb(s.factorisation_bytes)} | {gb(s.peak_bytes)} |")
    lines += ["",
              f"process base (libraries): {gb(fc.base_bytes)}",
              f"driver peak: {gb(fc.driver_bytes)} (no weights: index, config and calibration ids only)",
              f"worker peak: {gb(fc.worker_bytes)}",
              f"object store: {gb(fc.object_store_bytes)} in flight, {gb(fc.activation_traffic_bytes)} passed in all",
              *([] if plan.recipe.config.cluster.address else
                [f"memory: {gb(needed_bytes(fc, plan.recipe))} at once (driver, workers, object store); "
                 f"{gb(available_bytes(plan.recipe))} available"]),
              f"time: about {fc.seconds:.0f} s (this machine: {fc.gflops:.0f} GFLOP/s per thread)"]
    return "\n".join(lines)
