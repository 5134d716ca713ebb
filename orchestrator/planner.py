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
every part's routed outputs; those routed outputs sit in the object store until then (with the
block's input, and for the moment the combine returns, its output: 2 hidden states + routed outputs).
One worker also copies the tensors outside the blocks (embeddings, norms, head) and, for calibrated
stages, embeds the calibration ids with them: a step of its own, base + those tensors once (read
memory-mapped, written from the same pages) + the first block's input activations.
The driver holds no weights: its base (the same libraries, and matplotlib, which it imports for the
plots), Ray's client (RAY_DRIVER_BYTES), the partition and the calibration token ids. The object
store holds the activations between shards, one hidden-state tensor per shard boundary in flight:
in parallel mode each busy worker's input plus the newest output (the next shard's input), workers
+ 1 at once; in sequential mode one shard's input and output. Ray frees released objects in batches
(every second by default, its `free_objects_period_milliseconds`), so where a worker makes chunks
faster than that (a small model) the store briefly holds those chunks too: measured on the planner
test's 1.8 GB Llama (4 MB chunks), up to three chunks, 1.25x this figure.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import psutil
from safetensors import safe_open

from orchestrator.cost import Schedule, forecast_time
from orchestrator.input_stats import expected_input_groups
from orchestrator.errors import UserError
from orchestrator.partition import Shard, load_config

FLOAT32 = 4
RAY_DRIVER_BYTES = 40_000_000  # what ray.init adds to the driver's resident set (measured: Ray 2.60, Linux)
# what the driver's plots add to it (matplotlib: 25 MB measured, imported once the run is done, not here:
# its second of import time at plan time held up the run's start)
PLOTS_BYTES = 30_000_000
# What a worker's resident set holds at its peak beyond the shard's own terms: the allocator's arenas and
# the heap's high-water mark, Ray's task buffers (measured on the planner test's 70 MB Llama, sequential:
# peaks 740-774 MB against 667 MB forecast without this term; Intel Xeon, 2 cores)
WORKER_OVERHEAD_BYTES = 60_000_000
GPU_CONTEXT_BYTES = 1_000_000_000  # assumed: a CUDA context, cuBLAS/cuSOLVER workspaces, the allocator's reserve


@dataclass
class ShardForecast:
    index: int
    weight_bytes: int
    hessian_bytes: int
    activation_bytes: int
    factorisation_bytes: int
    peak_bytes: int  # the worker's predicted peak RSS while on this shard (base included)
    gpu_bytes: int = 0  # on a GPU: what sits in its memory (see gpu_bytes)


@dataclass
class Forecast:
    base_bytes: int  # one process with the libraries imported
    driver_bytes: int
    worker_bytes: int  # the largest shard's peak
    object_store_bytes: int  # activations in flight at once
    activation_traffic_bytes: int  # all hidden states passed between shards
    shards: list[ShardForecast]
    seconds: float  # estimated compression wall time
    gflops: float  # one worker's matmul rate (GFLOP/s): this machine's, measured; or a described GPU's
    tokens: int = 0  # the calibration tokens it counts
    time: Schedule | None = None  # seconds per phase, critical path, bottleneck (cost.py)
    rates: str = ""  # where the rates come from
    gpu_bytes: int = 0  # a described cluster: the largest shard's GPU memory
    host_bytes: int = 0  # a described cluster: one node's host memory at its peak
    network_bytes: int = 0  # a described cluster: hidden states passed between nodes
    activation_bytes: int = 0  # one shard boundary's hidden states

    def summary(self) -> dict:
        t = self.time
        return {"base_bytes": self.base_bytes, "driver_bytes": self.driver_bytes, "worker_bytes": self.worker_bytes,
                "object_store_bytes": self.object_store_bytes, "seconds": round(self.seconds, 1),
                "gflops": round(self.gflops, 1),
                **({"phases_s": {k: round(v, 2) for k, v in t.phases.items()}, "work_s": round(t.work_s, 1),
                    "critical_path_s": round(t.critical_path_s, 1), "fixed_s": t.fixed_s, "bottleneck": t.bottleneck,
                    "rates": self.rates} if t else {}),
                **({"gpu_bytes": self.gpu_bytes, "host_bytes": self.host_bytes, "network_bytes": self.network_bytes}
                   if self.gpu_bytes else {}),
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


def shard_forecast(shard: Shard, sizes: dict[str, int], base: int, calibrated: bool, tokens: int, batch_tokens: int,
                   hidden: int, output_bytes: int) -> ShardForecast:
    """output_bytes: what the shard's blocks hand on (the hidden states; a part's expert outputs)."""
    weights = sum(sizes[k] for k in (*shard.tensor_keys, *shard.context_keys))
    rewritten = sum(sizes[layer.weight_key] for layer in shard.linears)
    allowance = weights  # the packed copy, the allocator's slack
    widest = max(shard.linears, key=lambda l: l.in_features * l.out_features)
    working = 6 * widest.in_features * widest.out_features * FLOAT32  # technique and packing temporaries
    hessians = activations = factorisation = batch = 0
    if calibrated:
        groups = expected_input_groups(shard.linears)
        hessians = sum(members[0].in_features ** 2 * FLOAT32 for members in groups.values())
        batch = 4 * batch_tokens * max(l.out_features for l in shard.linears) * FLOAT32  # one batch's intermediates
        activations = tokens * hidden * FLOAT32 + output_bytes + batch
        factorisation = 4 * max(l.in_features for l in shard.linears) ** 2 * FLOAT32
    peak = base + WORKER_OVERHEAD_BYTES + weights + rewritten + allowance + working + hessians + activations \
        + factorisation
    gpu = GPU_CONTEXT_BYTES + gpu_phase_peak(shard, weights, hessians, batch + 2 * batch_tokens * hidden * FLOAT32
                                             if calibrated else 0, calibrated)
    return ShardForecast(shard.index, weights, hessians, activations, factorisation, peak, gpu)


def gpu_phase_peak(shard: Shard, weights: int, hessians: int, batch: int, calibrated: bool) -> int:
    """What one GPU holds at the larger of a shard's two phases (assumed from the code's order, not measured:
    no GPU was lent). The calibration pass: the blocks' weights, the Hessians and one batch (intermediates,
    input, output: the calibration set's hidden states stay in host memory, streamed batch by batch). Then
    compression, layer by layer (the blocks are gone, each compressed layer goes back to the host): the
    Hessians and, for the layer needing most, the larger of its factorisation (its float32 copy and the
    prepared one, four [in, in]: measured on the CPU, techniques/hessian.py) and its sweep (six float32 copies
    of the layer beside the prepared H and its factor U)."""
    square = lambda l: l.in_features ** 2 * FLOAT32 if calibrated else 0  # noqa: E731  one [in, in] float32
    layer = lambda l: l.in_features * l.out_features * FLOAT32  # noqa: E731  one float32 copy of the layer
    compress = max(max(2 * layer(l) + 4 * square(l), 6 * layer(l) + 2 * square(l)) for l in shard.linears)
    return max(weights + hessians + batch, hessians + compress)


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
    driver_base = base + PLOTS_BYTES
    calibrated, tokens = tokens is not None, tokens or 0
    batch_tokens = cfg.data.calibration.batch_size * cfg.data.calibration.seq_len
    config = load_config(model_dir, cfg.model.trust_remote_code)
    hidden = getattr(config, "hidden_size", None) or config.n_embd  # the residual stream's width
    activation = tokens * hidden * FLOAT32
    top_k = getattr(config, "num_experts_per_tok", None) or 1
    experts = next((getattr(config, n) for n in ("num_local_experts", "n_routed_experts", "num_experts")
                    if getattr(config, n, None)), 1)  # per MoE block
    shards = [shard_forecast(s, sizes, base, calibrated, tokens, batch_tokens, hidden,
                             activation if s.experts is None else routed_bytes(partition, s, tokens, hidden, top_k))
              for s in partition.shards]
    # an expert-split block's output: its head run once more, every part's expert outputs replayed
    routed = tokens * top_k * hidden * FLOAT32 if any(s.experts for s in partition.shards) else 0
    combine = max((base + 2 * sum(sizes[k] for k in s.context_keys) + 2 * activation + routed
                   for s in partition.shards if s.context_keys), default=0)
    workers = min(cfg.cluster.planned_workers, len(shards))
    in_flight = 2 if cfg.partition.calibration == "sequential" else workers + 1
    timed, rates, network = forecast_time(recipe, partition, sizes, config, tokens, min(1.0, top_k / experts))
    fc = Forecast(
        base_bytes=base,
        driver_bytes=driver_base + RAY_DRIVER_BYTES + tokens * 8,  # the int64 calibration ids
        worker_bytes=max(*(s.peak_bytes for s in shards), base + rest + activation, combine),
        object_store_bytes=max(in_flight * activation, 2 * activation + routed),  # 2 + routed: a combine returning
        activation_traffic_bytes=(len(shards) + 1) * activation + routed * len({s.blocks for s in partition.shards
                                                                               if s.experts}),
        shards=shards, seconds=timed.wall_s, gflops=rates.matmul_flops / 1e9, tokens=tokens, time=timed,
        rates=rates.source, activation_bytes=activation)
    return described(fc, cfg, partition, sizes, activation, network) if cfg.cluster.described else fc


def described(fc: Forecast, cfg, partition, sizes: dict[str, int], activation: int, network: float) -> Forecast:
    """A described cluster's figures: the largest shard's GPU memory; one node's host memory at its peak
    (its workers' host side: process, the shard's weights as read, its input and output hidden states for
    the whole calibration set; the object store's share of the activations in flight; the driver)."""
    gpn = cfg.cluster.gpus_per_node
    host_worker = max(fc.base_bytes + WORKER_OVERHEAD_BYTES + s.weight_bytes + s.activation_bytes for s in fc.shards)
    in_flight = 2 if cfg.partition.calibration == "sequential" else min(gpn, len(fc.shards)) + 1
    host = fc.driver_bytes + min(gpn, len(fc.shards)) * host_worker + in_flight * activation
    return dataclasses.replace(fc, gpu_bytes=max(s.gpu_bytes for s in fc.shards), host_bytes=host,
                               network_bytes=int(network))


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def needed_bytes(fc: Forecast, recipe) -> int:
    """The memory of the run's processes at once: the driver, every worker at its peak, the object store."""
    return fc.driver_bytes + min(recipe.config.cluster.workers, len(fc.shards)) * fc.worker_bytes + fc.object_store_bytes


def available_bytes(recipe) -> int:
    return int(recipe.config.cluster.memory_gb * 1e9) or psutil.virtual_memory().available


def fits(fc: Forecast, recipe) -> bool:
    """Whether the run fits: a described cluster's GPUs and hosts (host memory when given), else this
    machine's memory (a cluster's nodes Ray joins are Ray's scheduler's to judge)."""
    c = recipe.config.cluster
    if c.described:
        return fc.gpu_bytes <= c.gpu_memory_gb * 1e9 and not (c.host_memory_gb and fc.host_bytes > c.host_memory_gb * 1e9)
    return bool(c.address) or needed_bytes(fc, recipe) <= available_bytes(recipe)


def check_fits(fc: Forecast, plan) -> None:
    """Refuse (UserError, exit 2) a plan whose processes cannot fit this machine's memory
    (`cluster.memory_gb`, or what is available now), or a described cluster's GPUs or hosts."""
    cfg = plan.recipe.config
    if fits(fc, plan.recipe):
        return
    experts = " (experts already split as finely as they go)" if plan.partition.experts_per_shard == 1 else ""
    if cfg.cluster.described:
        raise UserError(described_refusal(fc, plan, experts))
    workers = min(cfg.cluster.workers, len(fc.shards))
    raise UserError(
        f"plan: this run needs about {gb(needed_bytes(fc, plan.recipe))} (driver {gb(fc.driver_bytes)} + {workers} "
        f"workers x {gb(fc.worker_bytes)} + object store {gb(fc.object_store_bytes)}) but "
        f"{gb(available_bytes(plan.recipe))} is available{experts}; lower partition.blocks_per_shard (now "
        f"{cfg.partition.blocks_per_shard}), cluster.workers (now {cfg.cluster.workers}), "
        f"data.calibration.num_samples (now {cfg.data.calibration.num_samples}) or data.calibration.seq_len "
        f"(now {cfg.data.calibration.seq_len})")


def described_refusal(fc: Forecast, plan, experts: str) -> str:
    """Why a described cluster cannot hold the run: the largest shard on one GPU, or one node's host memory."""
    c = plan.recipe.config.cluster
    if fc.gpu_bytes > c.gpu_memory_gb * 1e9:
        s, shard = max(zip(fc.shards, plan.partition.shards), key=lambda pair: pair[0].gpu_bytes)
        return (f"plan: shard {s.index} ({shard.label}) needs about {gb(s.gpu_bytes)} on one GPU (weights "
                f"{gb(s.weight_bytes)}, Hessians {gb(s.hessian_bytes)}, factorisation {gb(s.factorisation_bytes)}) "
                f"but cluster.gpu_memory_gb is {c.gpu_memory_gb:g}{experts}; the widest layer's Hessian and "
                "factorisation do not shrink with fewer blocks per shard: a GPU with more memory is needed")
    return (f"plan: one node needs about {gb(fc.host_bytes)} of host memory but cluster.host_memory_gb is "
            f"{c.host_memory_gb:g}; lower data.calibration.num_samples (now "
            f"{plan.recipe.config.data.calibration.num_samples}) or data.calibration.seq_len")


def cluster_lines(fc: Forecast, plan) -> list[str]:
    """A described cluster's memory per GPU, per host, and the network (forecast_table)."""
    c, cfg = plan.recipe.config.cluster, plan.recipe.config
    s = max(fc.shards, key=lambda s: s.gpu_bytes)
    fit = "fits" if s.gpu_bytes <= c.gpu_memory_gb * 1e9 else "DOES NOT FIT"
    host = (f"{'fits' if fc.host_bytes <= c.host_memory_gb * 1e9 else 'DOES NOT FIT'} the node's "
            f"{c.host_memory_gb:g} GB" if c.host_memory_gb else "host memory not given (cluster.host_memory_gb)")
    return [f"cluster (described): {c.nodes} nodes x {c.gpus_per_node} GPUs = {c.planned_workers} workers, one per GPU; "
            f"{c.gpu_memory_gb:g} GB per GPU; {c.network_gbps:g} Gbit/s between nodes; {c.read_gb_per_s:g} GB/s "
            "storage per node",
            f"per GPU: {gb(s.gpu_bytes)} at most (shard {s.index}, the larger of its calibration pass (weights "
            f"{gb(s.weight_bytes)}, Hessians {gb(s.hessian_bytes)}, one batch) and its compression (Hessians, then "
            f"layer by layer its factorisation, up to {gb(s.factorisation_bytes)}, or sweep temporaries); CUDA "
            f"context {gb(GPU_CONTEXT_BYTES)}): {fit} the GPU's {c.gpu_memory_gb:g} GB",
            f"per host: {gb(fc.host_bytes)} at its peak ({min(c.gpus_per_node, len(fc.shards))} workers' host side: "
            "process, shard weights as read, the shard's input and output hidden states; the object store's "
            f"activations in flight; the driver): {host}",
            f"hidden states stay in host memory and the object store ({gb(fc.activation_bytes)} per shard boundary, "
            f"{cfg.data.calibration.num_samples} x {cfg.data.calibration.seq_len} tokens); a worker streams them to "
            "its GPU one batch at a time",
            f"network: {gb(fc.network_bytes)} of hidden states between nodes"]


def time_lines(fc: Forecast, plan) -> list[str]:
    """The predicted wall time, its phases and its bottleneck (cost.py)."""
    t, cfg = fc.time, plan.recipe.config
    workers = min(cfg.cluster.planned_workers, len(fc.shards))
    hours = f" = {fc.seconds / 3600:.1f} h" if fc.seconds >= 3600 else ""
    return [f"time: about {fc.seconds:.0f} s{hours} = max(work / workers, critical path) + fixed cost",
            "  phases (seconds, summed over shards): " + ", ".join(f"{k} {v:.1f}" for k, v in t.phases.items()),
            f"  work {t.work_s:.0f} s over {workers} workers = {t.work_s / workers:.0f} s; critical path "
            f"{t.critical_path_s:.0f} s ({cfg.partition.calibration} calibration, "
            f"{getattr(cfg.partition, 'chunks', 1)} chunk(s)); fixed cost {t.fixed_s:.0f} s",
            f"  bottleneck: {t.bottleneck}",
            f"  rates: {fc.rates}"]


def forecast_table(fc: Forecast, plan) -> str:
    """The plan as `orchestrator plan` prints it."""
    p, gpu = plan.partition, plan.recipe.config.cluster.described
    lines = [f"model: {plan.model_dir} ({p.architecture}, {p.num_params / 1e6:.1f}M parameters, {p.num_blocks} blocks)",
             *([f"sizes: from config.json alone (no weights in the folder), tensors of {p.dtype}"]
               if p.key_bytes is not None else []),
             *([f"calibration: {fc.tokens} tokens, data.calibration.num_samples x seq_len (no data read without "
                "weights)"] if plan.calibration is None and fc.tokens else []),
             f"shards: {len(p.shards)} of {plan.recipe.config.partition.blocks_per_shard} block(s); "
             f"workers: {plan.recipe.config.cluster.planned_workers}",
             *([f"experts: {p.experts_per_shard} per shard in blocks with more ("
                + ("partition.experts_per_shard" if plan.recipe.config.partition.experts_per_shard else
                   "chosen by the planner: whole blocks do not fit") + ")"]
               if any(s.experts for s in p.shards) else []),
             "", "| shard | modules | weights | Hessians | activations | factorisation | predicted worker peak |"
             + (" GPU |" if gpu else ""), "|---|---|---|---|---|---|---|" + ("---|" if gpu else "")]
    seen, hidden = set(), 0
    for s, shard in zip(fc.shards, p.shards):
        sizes = (s.weight_bytes, s.hessian_bytes, s.activation_bytes, s.factorisation_bytes, s.peak_bytes)
        if len(p.shards) > 32 and sizes in seen:  # a large model: one row per distinct shard
            hidden += 1
            continue
        seen.add(sizes)
        lines.append(f"| {s.index} | {shard.label} | {gb(s.weight_bytes)} | {gb(s.hessian_bytes)} | "
                     f"{gb(s.activation_bytes)} | {gb(s.factorisation_bytes)} | {gb(s.peak_bytes)} |"
                     + (f" {gb(s.gpu_bytes)} |" if gpu else ""))
    lines += [f"({hidden} more shards of the same sizes as a row above)"] if hidden else []
    lines += ["",
              f"process base (libraries): {gb(fc.base_bytes)}",
              f"driver peak: {gb(fc.driver_bytes)} (no weights: index, config and calibration ids only)",
              f"worker peak: {gb(fc.worker_bytes)}" + (" (a worker process's host side, were it all on the host)"
                                                        if gpu else ""),
              f"object store: {gb(fc.object_store_bytes)} in flight, {gb(fc.activation_traffic_bytes)} passed in all",
              *(cluster_lines(fc, plan) if plan.recipe.config.cluster.described else
                [] if plan.recipe.config.cluster.address else
                [f"memory: {gb(needed_bytes(fc, plan.recipe))} at once (driver, workers, object store); "
                 f"{gb(available_bytes(plan.recipe))} available"]),
              *time_lines(fc, plan)]
    return "\n".join(lines)
