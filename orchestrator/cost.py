"""The time a run will take: each shard's work in phases, each phase at a rate, and the schedule the
driver runs them in (planner.py asks; `orchestrator plan` prints it; report.json's `plan` keeps it).

Phases of one shard (a worker holds the shard for all of them):
- read: the shard's weight bytes from storage;
- forward: the calibration pass, 2 x params x tokens flop (an expert: its share of the tokens), plus the
  attention's 2 x tokens x seq_len x (q/k width + v width) per block;
- hessians: hessian.gram_flop per distinct input (input_stats.expected_input_groups): 2 x tokens x d^2,
  about half that for inputs wide enough to be computed by blocks;
- factorisation (GPTQ / SparseGPT, per input read: layers that share an input share it): Cholesky, its
  inverse, Cholesky again: 4/3 in^3 flop, counted at half the matmul rate (LAPACK's factorisations run
  slower than a matrix product);
- sweep: the lazy block updates, out x in^2 flop at the matmul rate; sweep overhead: the Python loop
  over the input columns (~10 small tensor ops each, their in-block matrix-vector update included):
  seconds per column plus seconds per column and output row (measured here on two tiny GPTQ calls);
- observer: the MSE observer (grid.fit_qparams) tries up to 80 shrinks, a pass of ~10 elementwise ops
  over the weight each: seconds per weight element per shrink (minmax: one pass), measured on a random
  weight, whose groups stop early about as often as a model's do;
- write: the packed export's bytes to storage;
- transfer: the shard's input hidden states (tokens x hidden x 4 bytes) from the previous shard's
  worker: an object-store copy, and the network's time on top when the two workers are on different nodes.

Schedule. Parallel calibration: the dense activations chain from shard to shard (shard k's forward needs
shard k-1's outputs), in `partition.chunks` chunks, so the chain's critical path is about
sum over blocks (forward + hessians + transfer) / chunks + the last shard's whole work; the run takes
max(total work / workers, critical path) + a fixed cost (Ray and the workers starting). Sequential
calibration: shard k waits for shard k-1's compression, so the critical path is every shard's work.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch

from orchestrator.techniques.hessian import gram_flop

FIXED_LOCAL_S = 10.5  # measured here (2 workers, tiny-lm, data-free): ray_start 3.9-4.6 s and ~6.3 s of the compress
# phase beyond the shards' work (two worker processes importing torch, Ray's task start-up)
FIXED_CLUSTER_S = 60.0  # assumed for a described cluster: actors starting on every node, a CUDA context each
GPU_COLUMN_S = 100e-6  # assumed: one GPTQ sweep column on a GPU, ~10 kernel launches from Python
GPU_ROW_S = 1e-13  # assumed: the in-block update per column and output row, 64 x 4 bytes at ~3 TB/s
GPU_ELEMENT_S = 3e-11  # assumed: one weight element, one MSE shrink on a GPU (~10 passes of 8 bytes at ~3 TB/s)
OBJECT_STORE_GB_S = 5.0  # assumed: a hidden-state tensor's put and get within one node
LOCAL_READ_GB_S = 2.0  # assumed for this machine: safetensors from the page cache or a local SSD
MSE_SHRINKS = 80  # grid.MSE_SHRINKS
FACTORISATION_EFFICIENCY = 0.5
# This machine's phases against its micro-benchmarks (hot 512 x 512 matmuls, tiny GPTQ calls): fitted once to
# one block of a random 91M Llama (hidden 768, ffn 2048) on one thread, quiet machine, 32768 tokens
# (benchmarks/profile_worker.py, two runs at 3d6fae0, results/16-profile.md in git history): forward 5.6-6.3 s,
# Hessians 2.6-3.0 s, factorisation + sweep 1.5-1.9 s, MSE observer 3.8 s, against 3.9 / 3.2 / 1.5 / 3.7 s
# from the rates measured then (124 GFLOP/s, 124 us per column, 6.5 ns per element and shrink). The sweep
# got faster since; its rate is measured at plan time on the code as it is, so the factors still apply
# (cluster/PLANS.md: the rerun). A described GPU's rates are taken as achieved rates
# already (efficiency 1).
CPU_EFFICIENCY = {"forward": 0.65, "hessians": 1.1, "factorisation": 0.85, "sweep": 0.85, "sweep_overhead": 0.85,
                  "observer": 0.98}
PHASES = ("read", "forward", "hessians", "factorisation", "sweep", "sweep_overhead", "observer", "write", "transfer")


@dataclass(frozen=True)
class Rates:
    matmul_flops: float  # one worker's float32 matmul rate, flop/s
    element_s: float  # one worker: seconds per weight element per MSE shrink
    column_s: float  # seconds per GPTQ sweep column, beyond its flops
    row_s: float  # seconds per output row per sweep column (the in-block matrix-vector updates)
    read_bytes_s: float  # one worker's share of its node's storage rate
    network_bytes_s: float  # between nodes
    local_bytes_s: float  # the object store within a node
    fixed_s: float
    gpus_per_node: int  # 0: this machine (every worker on one node)
    source: str
    efficiency: tuple = ()  # (phase, factor) pairs: a phase's seconds are divided by its factor


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


@functools.lru_cache(maxsize=None)
def measured_here() -> tuple[float, float, float, float]:
    """This machine's one-thread rates, measured now (under a second): (matmul flop/s, seconds per element
    per MSE shrink, seconds per GPTQ column, seconds per GPTQ column and output row: two tiny GPTQ calls,
    32 and 512 rows). Cached for the process (the planner may forecast many splits)."""
    from orchestrator.techniques.gptq import GPTQParams, gptq
    from orchestrator.techniques.grid import fit_qparams

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        flops = matmul_gflops(0.2) * 1e9
        w = torch.randn(512, 128)
        fit_qparams(w[:64], 4, True, observer="mse")  # warm up
        element_s = fastest(lambda: fit_qparams(w, 4, True, observer="mse"), 2) / (w.numel() * MSE_SHRINKS)
        x = torch.randn(1024, 256)
        H, p = 2 * x.T @ x / len(x), GPTQParams(bits=4, group_size=128, observer="minmax")
        gptq(torch.randn(32, 256), p, H)  # warm up
        seconds = [fastest(lambda: gptq(torch.randn(rows, 256), p, H), 3) / 256 for rows in (32, 512)]
    finally:
        torch.set_num_threads(threads)
    row_s = max(0.0, (seconds[1] - seconds[0]) / (512 - 32))
    return flops, element_s, seconds[0] - 32 * row_s, row_s


def fastest(call, times: int) -> float:
    """The least of `times` timings of call() (the others wait on a busy machine's other processes)."""
    best = float("inf")
    for _ in range(times):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best


def rates_for(cluster) -> Rates:
    """A described cluster's assumed rates (cluster.gpus_per_node > 0), or this machine's, measured."""
    if cluster.described:
        gpn = cluster.gpus_per_node
        return Rates(cluster.gpu_tflops * 1e12, GPU_ELEMENT_S, GPU_COLUMN_S, GPU_ROW_S, cluster.read_gb_per_s * 1e9 / gpn,
                     cluster.network_gbps / 8 * 1e9, OBJECT_STORE_GB_S * 1e9, FIXED_CLUSTER_S, gpn,
                     f"described cluster: {cluster.gpu_tflops:g} TFLOP/s per GPU, {GPU_COLUMN_S * 1e6:.0f} us per "
                     f"sweep column, {GPU_ELEMENT_S:.0e} s per element per shrink (assumed, not measured)")
    flops, element_s, column_s, row_s = measured_here()
    threads = max(1, int(cluster.cpus_per_worker))
    return Rates(flops * threads, element_s / threads, column_s, row_s, LOCAL_READ_GB_S * 1e9, OBJECT_STORE_GB_S * 1e9,
                 OBJECT_STORE_GB_S * 1e9, FIXED_LOCAL_S, 0,
                 f"this machine, measured now: {flops / 1e9:.0f} GFLOP/s per thread, {column_s * 1e6:.0f} us per "
                 f"sweep column, {element_s * 1e9:.1f} ns per element per shrink; efficiencies fitted once "
                 "(cost.CPU_EFFICIENCY)", tuple(CPU_EFFICIENCY.items()))


def attention_width(config) -> int:
    """q/k width + v width of one block's attention (multi-head latent attention's own head sizes)."""
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", 1)
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    qk = getattr(config, "qk_nope_head_dim", 0) + getattr(config, "qk_rope_head_dim", 0)
    v = getattr(config, "v_head_dim", 0)
    head = getattr(config, "head_dim", None) or hidden // heads
    return heads * ((qk or head) + (v or head))


@dataclass(frozen=True)
class Work:
    """What one shard's phases count, rate-free: flops, columns, elements, bytes."""
    forward_flop: float
    hessian_flop: float
    factorisation_flop: float
    sweep_flop: float
    columns: int
    column_rows: float  # sum of in x out over the swept layers
    observer_elements: float  # weight elements x shrinks
    read_bytes: float
    write_bytes: float
    transfer_bytes: float


def shard_work(shard, sizes: dict, stages, tokens: int, seq_len: int, routed_share: float, attention: int,
               hidden: int) -> Work:
    """One shard's work (see the module docstring); tokens 0: no stage calibrates."""
    from orchestrator.input_stats import expected_input_groups

    seen = lambda layer: tokens * (routed_share if layer.expert else 1.0)  # noqa: E731  the tokens a layer sees
    hit = [(l, st) for l in shard.linears for st in stages if st.applies_to(l.name, l.router)]
    solved = [(l, st) for l, st in hit if st.technique.name in ("gptq", "sparsegpt")]
    groups = expected_input_groups(shard.linears) if tokens else {}
    blocks = len(shard.blocks) if tokens else 0
    observer = sum(l.in_features * l.out_features * (MSE_SHRINKS if getattr(st.params, "observer", "") == "mse" else 1)
                   for l, st in hit if getattr(st.params, "bits", None))
    packed = 0.0
    for l, st in hit:  # a quantized layer: bits per weight and a bfloat16 scale per group
        bits, group = getattr(st.params, "bits", None), getattr(st.params, "group_size", -1)
        packed += (l.in_features * l.out_features * (bits / 8 + 2 / (l.in_features if group == -1 else group))
                   if bits else sizes[l.weight_key])
    rewritten = sum(sizes[l.weight_key] for l, _ in hit)
    return Work(
        forward_flop=sum(2 * seen(l) * l.in_features * l.out_features for l in shard.linears)
        + blocks * 2 * tokens * seq_len * attention,
        hessian_flop=sum(gram_flop(seen(members[0]), members[0].in_features) for members in groups.values()),
        factorisation_flop=sum(4 / 3 * l.in_features ** 3 for l in factorised(solved)),
        sweep_flop=sum(l.out_features * l.in_features ** 2 for l, _ in solved),
        columns=sum(l.in_features for l, _ in solved),
        column_rows=float(sum(l.in_features * l.out_features for l, _ in solved)),
        observer_elements=float(observer),
        read_bytes=float(sum(sizes[k] for k in (*shard.tensor_keys, *shard.context_keys))),
        write_bytes=sum(sizes[k] for k in shard.tensor_keys) - rewritten + packed,
        transfer_bytes=float(tokens * hidden * 4),
    )


def factorised(solved: list) -> list:
    """The layers whose H is factorised, one per factorisation: one per input read (hessian.shared_factors:
    q/k/v and gate/up share one) when each layer has one solving stage; one per (layer, stage) otherwise (the
    shared factor is the last H's only, so stages alternating on one layer each compute their own)."""
    from orchestrator.input_stats import expected_input_groups

    layers = [l for l, _ in solved]
    if len({l.name for l in layers}) < len(layers):
        return layers
    return [members[0] for members in expected_input_groups(layers).values()]


def phase_seconds(work: Work, rates: Rates, remote: bool) -> dict[str, float]:
    """One shard's seconds per phase; remote: its input comes from a worker on another node."""
    efficiency = dict(rates.efficiency)
    seconds = {"read": work.read_bytes / rates.read_bytes_s,
               "forward": work.forward_flop / rates.matmul_flops,
               "hessians": work.hessian_flop / rates.matmul_flops,
               "factorisation": work.factorisation_flop / (rates.matmul_flops * FACTORISATION_EFFICIENCY),
               "sweep": work.sweep_flop / rates.matmul_flops,
               "sweep_overhead": work.columns * rates.column_s + work.column_rows * rates.row_s,
               "observer": work.observer_elements * rates.element_s,
               "write": work.write_bytes / rates.read_bytes_s,
               "transfer": work.transfer_bytes / rates.local_bytes_s  # out of one object store, into the next
               + (work.transfer_bytes / rates.network_bytes_s if remote else 0.0)}
    return {phase: t / efficiency.get(phase, 1.0) for phase, t in seconds.items()}


BOTTLENECKS = {"compute (matmul)": ("forward", "hessians", "factorisation", "sweep"),
               "GPTQ sweep overhead": ("sweep_overhead",), "MSE observer (elementwise)": ("observer",),
               "weight loading": ("read", "write"), "network": ("transfer",)}
CHAIN = "activation chain (critical path)"


@dataclass(frozen=True)
class Schedule:
    wall_s: float
    work_s: float  # every shard's work, summed
    critical_path_s: float
    fixed_s: float
    phases: dict  # seconds per phase, summed over the shards
    bottleneck: str


def schedule(shards, phases: list[dict], workers: int, chunks: int, sequential: bool, rates: Rates) -> Schedule:
    """The run's wall time from its shards' phases: shard k on worker k mod workers, worker w on node
    w // gpus_per_node (a described cluster); every worker on one node here."""
    total = {p: sum(ph[p] for ph in phases) for p in PHASES}
    work = [sum(ph.values()) for ph in phases]
    if sequential:
        critical = sum(work)
    else:  # per block, its slowest part's calibration pass (parts of a split block run side by side)
        chain: dict[tuple, float] = {}
        for shard, ph in zip(shards, phases):
            chain[shard.blocks] = max(chain.get(shard.blocks, 0.0), ph["forward"] + ph["hessians"] + ph["transfer"])
        critical = sum(chain.values()) / max(1, chunks) + work[-1]
    spread = sum(work) / max(1, min(workers, len(shards)))
    if critical > spread:
        bottleneck = CHAIN
    else:
        bottleneck = max(BOTTLENECKS, key=lambda name: sum(total[p] for p in BOTTLENECKS[name]))
    return Schedule(max(spread, critical) + rates.fixed_s, sum(work), critical, rates.fixed_s, total, bottleneck)


def node_of(index: int, workers: int, gpus_per_node: int) -> int:
    return (index % workers) // gpus_per_node if gpus_per_node else 0


def forecast_time(recipe, partition, sizes: dict, config, tokens: int, routed_share: float) -> tuple[Schedule, Rates, float]:
    """The run's time (Schedule), the rates it used, and the bytes its hidden states send between nodes."""
    cfg = recipe.config
    rates = rates_for(cfg.cluster)
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    workers = min(cfg.cluster.planned_workers, len(partition.shards))
    attention, phases, network = attention_width(config), [], 0.0
    for k, shard in enumerate(partition.shards):
        work = shard_work(shard, sizes, recipe.stages, tokens, cfg.data.calibration.seq_len, routed_share,
                          attention, hidden)
        remote = node_of(k, workers, rates.gpus_per_node) != node_of(max(0, k - 1), workers, rates.gpus_per_node)
        network += work.transfer_bytes if remote else 0.0
        phases.append(phase_seconds(work, rates, remote))
    chunks = getattr(cfg.partition, "chunks", 1)  # partition.chunks: the batches travel in that many chunks
    timed = schedule(partition.shards, phases, workers, chunks, cfg.partition.calibration == "sequential", rates)
    return timed, rates, network
