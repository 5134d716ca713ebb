"""Before any work: what a run will need (memory per process, object-store volume, time), and a refusal
when it cannot fit.

Memory model of one worker compressing one shard (everything it holds at its peak):
- base: the process with torch, transformers, Ray and this package imported (measured: this
  driver process's resident set, which has imported the same);
- weights: the shard's tensors as read (stored dtype), the compressed copies of the layers it
  rewrites, and an allowance of the shard's size again for the packed copy and what the allocator
  keeps between a worker's shards (fitted to measured peaks: safetensors writes from the tensors'
  own memory, without a serialisation buffer); float32 temporaries of the widest layer (the
  technique's and the packing check's, about six copies);
- Hessians (calibrated stages): one [in, in] float32 matrix per group of layers sharing an input;
- activations (calibrated stages): the shard's input and output hidden states,
  num_samples x seq_len x hidden x 4 bytes each, plus one batch's intermediate activations;
- the GPTQ / SparseGPT factorisation of the widest layer: about four [in, in] float32 matrices.
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

from orchestrator.capture import expected_input_groups
from orchestrator.errors import UserError
from orchestrator.partition import Shard, load_config

FLOAT32 = 4
RAY_DRIVER_BYTES = 40_000_000  # what ray.init adds to the driver's resident set (measured: Ray 2.60, Linux)


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
                   hidden: int) -> ShardForecast:
    weights = sum(sizes[k] for k in shard.tensor_keys)
    rewritten = sum(sizes[layer.weight_key] for layer in shard.linears)
    allowance = weights  # the packed copy, the allocator's slack
    widest = max(shard.linears, key=lambda l: l.in_features * l.out_features)
    working = 6 * widest.in_features * widest.out_features * FLOAT32  # technique and packing temporaries
    hessians = activations = factorisation = 0
    flops = 0.0
    if calibrated:
        widths = {group: members[0].in_features for group, members in expected_input_groups(shard.linears).items()}
        hessians = sum(w * w * FLOAT32 for w in widths.values())
        widest_ffn = max(l.out_features for l in shard.linears)
        activations = 2 * tokens * hidden * FLOAT32 + 4 * batch_tokens * widest_ffn * FLOAT32
        factorisation = 4 * max(l.in_features for l in shard.linears) ** 2 * FLOAT32
        params = sum(l.in_features * l.out_features for l in shard.linears)
        flops += 2 * tokens * params  # the forward pass
        flops += sum(2 * tokens * w * w for w in widths.values())  # X^T X
        flops += sum(2 * l.in_features**3 + 2 * l.out_features * l.in_features * 128 for l in shard.linears)
    else:
        flops += sum(10 * l.in_features * l.out_features for l in shard.linears)
    peak = base + weights + rewritten + allowance + working + hessians + activations + factorisation
    return ShardForecast(shard.index, weights, hessians, activations, factorisation, peak, flops / 1e9)


def forecast(plan) -> Forecast:
    """The memory and time a plan will take (see the module docstring for the model)."""
    cfg = plan.recipe.config
    partition = plan.partition
    keys = [k for s in partition.shards for k in s.tensor_keys] + list(partition.rest_keys)
    sizes = tensor_bytes(plan.model_dir, keys, partition.key_to_file)
    rest = sum(sizes[k] for k in partition.rest_keys)  # copied (and used to embed) by one worker
    base = psutil.Process().memory_info().rss  # a worker imports the same libraries
    import orchestrator.plots  # noqa: F401  the driver's one more library (matplotlib), counted in its base
    driver_base = psutil.Process().memory_info().rss
    calibrated = plan.calibration is not None
    tokens = int(plan.calibration.input_ids.numel()) if calibrated else 0
    batch_tokens = cfg.data.calibration.batch_size * cfg.data.calibration.seq_len
    config = load_config(plan.model_dir, cfg.model.trust_remote_code)
    hidden = getattr(config, "hidden_size", None) or config.n_embd  # the residual stream's width
    shards = [shard_forecast(s, sizes, base, calibrated, tokens, batch_tokens, hidden) for s in partition.shards]
    activation = tokens * hidden * FLOAT32
    workers = min(cfg.cluster.workers, len(shards))
    in_flight = 2 if cfg.partition.calibration == "sequential" else workers + 1
    gflops = matmul_gflops()
    threads = max(1, int(cfg.cluster.cpus_per_worker))
    compute = sum(s.gflop for s in shards) / (gflops * threads * workers)
    return Forecast(
        base_bytes=base,
        driver_bytes=driver_base + RAY_DRIVER_BYTES + tokens * 8,  # the int64 calibration ids
        worker_bytes=max(*(s.peak_bytes for s in shards), base + rest + activation),
        object_store_bytes=in_flight * activation,
        activation_traffic_bytes=(len(shards) + 1) * activation,
        shards=shards,
        seconds=compute + 10.0,  # + starting Ray and the workers
        gflops=gflops,
    )


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def check_fits(fc: Forecast, plan) -> None:
    """Refuse (UserError, exit 2) a plan whose processes cannot fit this machine's memory
    (`cluster.memory_gb`, or what is available now)."""
    cfg = plan.recipe.config
    if cfg.cluster.address:  # a cluster's nodes are not this machine; Ray's scheduler decides there
        return
    available = int(cfg.cluster.memory_gb * 1e9) or psutil.virtual_memory().available
    workers = min(cfg.cluster.workers, len(fc.shards))
    need = fc.driver_bytes + workers * fc.worker_bytes + fc.object_store_bytes
    if need > available:
        c = cfg
        raise UserError(
            f"plan: this run needs about {gb(need)} (driver {gb(fc.driver_bytes)} + {workers} workers x "
            f"{gb(fc.worker_bytes)} + object store {gb(fc.object_store_bytes)}) but {gb(available)} is available; "
            f"lower partition.blocks_per_shard (now {c.partition.blocks_per_shard}), cluster.workers (now "
            f"{c.cluster.workers}), data.calibration.num_samples (now {c.data.calibration.num_samples}) or "
            f"data.calibration.seq_len (now {c.data.calibration.seq_len})")


def forecast_table(fc: Forecast, plan) -> str:
    """The plan as `orchestrator plan` prints it."""
    p = plan.partition
    lines = [f"model: {plan.model_dir} ({p.architecture}, {p.num_params / 1e6:.1f}M parameters, {p.num_blocks} blocks)",
             f"shards: {len(p.shards)} of {plan.recipe.config.partition.blocks_per_shard} block(s); "
             f"workers: {plan.recipe.config.cluster.workers}",
             "", "| shard | modules | weights | Hessians | activations | factorisation | predicted worker peak |",
             "|---|---|---|---|---|---|---|"]
    for s, shard in zip(fc.shards, p.shards):
        lines.append(f"| {s.index} | {', '.join(shard.modules)} | {gb(s.weight_bytes)} | {gb(s.hessian_bytes)} | "
                     f"{gb(s.activation_bytes)} | {gb(s.factorisation_bytes)} | {gb(s.peak_bytes)} |")
    lines += ["",
              f"process base (libraries): {gb(fc.base_bytes)}",
              f"driver peak: {gb(fc.driver_bytes)} (no weights: index, config and calibration ids only)",
              f"worker peak: {gb(fc.worker_bytes)}",
              f"object store: {gb(fc.object_store_bytes)} in flight, {gb(fc.activation_traffic_bytes)} passed in all",
              f"time: about {fc.seconds:.0f} s (this machine: {fc.gflops:.0f} GFLOP/s per thread)"]
    return "\n".join(lines)
