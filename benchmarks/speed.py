"""Section 16 (issue 18): our wall time against llm-compressor's and against this machine's matmul limit.

    .venv/bin/python benchmarks/speed.py [--repeats 3] [--models 91M,116M] [--smoke]

Per model (random Llamas built by common.random_llama, float32: "91M" hidden 768, 12 layers, ffn 2048,
12 heads, vocab 4096; "116M" section 3's timing model, ffn 3072, vocab 2048), GPTQ W4 g128 with act-order
(recipes/gptq-w4g128.yaml; the peer at its own defaults: W4A16 groups of 128, act-order static, min-max
observer), 128 x 256 calibration token ids computed once and given to both tools (their sha256 checked
against our report.json), three cases run one after another, --repeats times:
  ours, 1 worker   cluster.workers=1 cluster.cpus_per_worker=2 (one worker, both cores' threads)
  ours, 2 workers  cluster.workers=2 cluster.cpus_per_worker=1
  llm-compressor   benchmarks/.peer-venv, oneshot at its defaults (compare_llmcompressor.run_peer)
Each: whole-process wall time, peak summed RSS and PSS of its process tree (compare_llmcompressor.run_measured),
our report.json's timing phases, and where the cores' seconds went: the CPU seconds of the command's own
process, of our worker actors and of Ray's other processes, against wall x cores (the rest: idle);
medians and min-max over the repeats.

The matmul limit: the calibration work's floating-point operations (calibration_flops) divided by the
float32 matmul rate this machine reaches with 2 threads (matmul_rate, measured here before and after
the runs; the higher counts). Ray's fixed cost: a data-free run (RTN W4 g128 on reference:tiny-lm,
1 and 2 workers): the whole wall minus its compress phase, with the same CPU seconds by process, and the
wall time of a fresh Python process that only imports what a driver (a worker) imports.

Writes results/16-speed.md, 16-limit.md, 16-fixed-cost.md (each with its .json). The per-phase worker
profile is benchmarks/profile_worker.py (results/16-profile.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, Bench, add_args, clean_env, fmt, parse_shape, random_llama, resolve_model, spread, table
from compare_llmcompressor import (PEER_PYTHON, check_same_calibration, exclusive, ratio, run_ours, run_peer,
                                   save_calibration)

MODELS = {"91M": "768,12,2048,12,4096", "116M": "768,12,3072,12,2048"}
SMOKE_SHAPE = "128,2,256,2"
RECIPE = "gptq-w4g128"
CASES = {"ours, 1 worker": (1, 2), "ours, 2 workers": (2, 1), "llm-compressor": None}  # (workers, cpus each)
FIXED_RECIPE = "rtn-w4g128"  # data-free: what is left besides compress is the fixed cost


# ---------------------------------------------------------------- the limit

def matmul_rate(threads: int = 2, n: int = 2048, seconds: float = 1.0) -> float:
    """float32 FLOP/s of an n x n matmul on `threads` threads, timed for about `seconds`."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    c = a @ b  # warm-up
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        torch.mm(a, b, out=c)
        reps += 1
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


def block_linears(config: dict) -> list[tuple[str, int, int]]:
    """A Llama block's Linear layers as (name, in, out)."""
    d, f, heads = config["hidden_size"], config["intermediate_size"], config["num_attention_heads"]
    kv = d * config.get("num_key_value_heads", heads) // heads
    return [("q", d, d), ("k", d, kv), ("v", d, kv), ("o", d, d), ("gate", d, f), ("up", d, f), ("down", f, d)]


def calibration_flops(config: dict, samples: int, seq_len: int, block_size: int = 128) -> dict:
    """The matmul work of calibrating and GPTQ-compressing every block once (FLOP, per kind):
    forward: 2 x tokens x the blocks' Linear weights, plus attention's QK^T and AV (4 x seq_len x hidden
      per token, the whole square: causal kernels may skip half);
    hessians: 2 x tokens x in^2 per distinct layer input (q/k/v share one, gate/up share one: 3 of
      hidden^2 and one of ffn^2 per block), the issue's count; H is symmetric, so half of it would do
      (the "symmetric H" limit; ours computes the blocks on and above the diagonal: hessian.add_gram);
    gptq: per distinct layer input the factorisation of H (Cholesky, Cholesky inverse, Cholesky: ~4/3 in^3;
      the layers reading one input share it) and per layer the sweep's updates (lazy batches out x in^2,
      inside the batches out x in x block_size).
    Left out: embeddings and head (not calibrated), norms, softmax, the observer's elementwise search."""
    tokens, layers, d = samples * seq_len, config["num_hidden_layers"], config["hidden_size"]
    linears = block_linears(config)
    forward = 2 * tokens * sum(i * o for _, i, o in linears) + 4 * tokens * seq_len * d
    distinct = {"qkv": d, "o": d, "gate/up": d, "down": config["intermediate_size"]}
    hessians = 2 * tokens * sum(i * i for i in distinct.values())
    gptq = sum(4 / 3 * i ** 3 for i in distinct.values()) + sum(o * i * (i + block_size) for _, i, o in linears)
    per = {"forward": forward * layers, "hessians": hessians * layers, "gptq": gptq * layers}
    return {**per, "total": sum(per.values()), "symmetric_total": sum(per.values()) - per["hessians"] / 2,
            "tokens": tokens,
            "block_params": layers * sum(i * o for _, i, o in linears)}


# ---------------------------------------------------------------- runs

def shard_work(report: dict) -> float:
    """The workers' own seconds on the shards (calibration capture + compression), summed over shards."""
    return sum(s.get("seconds", 0) + s.get("capture_seconds", 0) for s in report.get("shards", []))


def calibration_span(report: dict, started_at: float, wall_s: float) -> dict:
    """When the shards' calibration ran within the command's wall (the report's capture windows, epoch s):
    first_capture_s, from the command's start to the first shard's first chunk; after_capture_s, from
    the last shard's last chunk to the command's end (its compress, the export, the report, the exit)."""
    windows = [s["capture_window"] for s in report.get("shards", []) if s.get("capture_window")]
    if not windows:
        return {}
    first, last = min(w[0] for w in windows) - started_at, max(w[1] for w in windows) - started_at
    return {"first_capture_s": first, "after_capture_s": wall_s - last}


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def run_case(case: str, model_dir: Path, work: Path, calib: Path, digest: str, batch_size: int,
             overrides: list[str], name: str) -> dict:
    """One timed run of a case -> its record (wall, peak RSS/PSS, our phases or the peer's timing)."""
    if CASES[case] is None:
        m, peer, _ = run_peer(RECIPE, model_dir, calib, work, batch_size, extra=["--defaults"], name=name)
        core, phases, extra = peer["timing"]["oneshot_s"], peer["timing"], {"versions": peer["versions"]}
    else:
        workers, cpus = CASES[case]
        m, report, _ = run_ours(RECIPE, model_dir, work, [*overrides, f"cluster.cpus_per_worker={cpus}"],
                                workers, name)
        check_same_calibration(RECIPE, report, digest)
        phases = report["timing"]["phases"]
        core, extra = phases.get("compress"), {"cluster": report.get("cluster"), "work_s": shard_work(report),
                                               **calibration_span(report, m.started_at, m.wall_s)}
    return {"case": case, "wall_s": m.wall_s, "peak_rss_mb": m.peak_rss_mb, "peak_pss_mb": m.peak_pss_mb,
            "peak_procs": m.peak_procs, "core_s": core, "phases": phases, "cpu_s": m.cpu_s, "log": m.log, "cmd": m.cmd,
            **extra}


def prepare_model(label: str, shape: str, args, tokenizer: Path) -> dict:
    """Build the model (cached) and save its calibration ids -> what the runs and the tables need."""
    from orchestrator.recipe import load_recipe

    work = args.work.resolve()
    model_dir, params = random_llama(work / "models", tokenizer, **parse_shape(shape))
    cal_over = [f"data.calibration.num_samples={args.samples}", f"data.calibration.seq_len={args.seq_len}"]
    cal = load_recipe(ROOT / "recipes" / f"{RECIPE}.yaml", [f"model.path={model_dir}", *cal_over]).config.data.calibration
    calib = work / f"calib-{label}-{args.samples}x{args.seq_len}.safetensors"
    ids, digest = save_calibration(model_dir, cal, calib)
    return {"label": label, "dir": str(model_dir), "params": params, "shape": shape,
            "config": json.loads((model_dir / "config.json").read_text()),
            "overrides": [*cal_over, "data.eval.enabled=false"],
            "calibration": {"shape": list(ids.shape), "sha256": digest, "path": str(calib),
                            "batch_size": cal.batch_size}}


def run_model(m: dict, args, runs: list[dict], on_run) -> None:
    """Every case on the model, --repeats times, one after another (appending to runs, on_run after each)."""
    label, cal = m["label"], m["calibration"]
    for repeat in range(args.repeats):
        for case in args.cases:
            name = f"{label}-{'peer' if CASES[case] is None else f'ours-w{CASES[case][0]}'}-r{repeat}"
            print(f"[{label} {case} #{repeat + 1}] ...", file=sys.stderr, flush=True)
            rec = run_case(case, Path(m["dir"]), args.work.resolve(), Path(cal["path"]), cal["sha256"],
                           cal["batch_size"], m["overrides"], name)
            runs.append({"model": label, "repeat": repeat, **rec})
            print(f"[{label} {case} #{repeat + 1}] {rec['wall_s']:.1f} s, {rec['peak_rss_mb']:.0f} MB",
                  file=sys.stderr, flush=True)
            on_run()


def fixed_cost(args, tokenizer_model: Path) -> list[dict]:
    """Data-free runs of reference:tiny-lm: how much of a run is not compressing."""
    work, out = args.work.resolve() / "fixed", []
    for repeat in range(args.repeats):
        for workers, cpus in ((2, 1),) if args.smoke else ((1, 2), (2, 1)):
            m, report, _ = run_ours(FIXED_RECIPE, tokenizer_model, work,
                                    ["data.eval.enabled=false", f"cluster.cpus_per_worker={cpus}"], workers,
                                    f"w{workers}-r{repeat}")
            out.append({"workers": workers, "repeat": repeat, "wall_s": m.wall_s, "peak_rss_mb": m.peak_rss_mb,
                        "phases": report["timing"]["phases"], "work_s": shard_work(report), "cpu_s": m.cpu_s})
    return out


IMPORTS = {"driver": "import orchestrator.plan, orchestrator.driver",  # what `orchestrator run` imports
           "worker": "import orchestrator.worker"}  # what each worker actor imports


def import_seconds(repeats: int) -> dict[str, list[float]]:
    """Wall seconds of a fresh Python process that only imports what a driver / a worker imports."""
    out: dict[str, list[float]] = {}
    for _ in range(repeats):
        for name, code in IMPORTS.items():
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=clean_env(), check=True)
            out.setdefault(name, []).append(time.perf_counter() - t0)
    return out


# ---------------------------------------------------------------- tables

CPU_KINDS = {"command": "the command's own process s (ours: the driver)", "workers": "worker actors s",
             "ray": "Ray's other processes s"}
CORES = len(os.sched_getaffinity(0))
CPU_NOTE = ("each process's user + system CPU seconds at its last sample, every 0.1 s, summed by kind; idle: "
            "wall x cores less all of them")


def cores_table(runs: list[dict], group, first: str) -> str:
    """Where the cores' seconds went, per group of runs (group(run) -> its label; medians): wall x cores
    against each kind of process's CPU seconds (compare_llmcompressor.process_kind); idle is what no
    process of the run used."""
    rows = []
    for key in dict.fromkeys(map(group, runs)):
        rs = [r for r in runs if group(r) == key]
        idle = [r["wall_s"] * CORES - sum(r["cpu_s"].values()) for r in rs]
        rows.append([key, fmt(median([r["wall_s"] for r in rs]), 1), fmt(median([r["wall_s"] * CORES for r in rs]), 1),
                     *(fmt(median([r["cpu_s"].get(k, 0.0) for r in rs]), 1) for k in CPU_KINDS),
                     fmt(median([r.get("work_s") for r in rs]), 1), fmt(median(idle), 1)])
    return table([first, "wall s", f"wall x {CORES} cores s", *CPU_KINDS.values(),
                  "of the workers': shards' work s", "idle s"], rows)


def speed_table(models: list[dict], runs: list[dict], limits: dict) -> str:
    rows = []
    for m in models:
        mine = [r for r in runs if r["model"] == m["label"]]
        peer_wall = median([r["wall_s"] for r in mine if CASES[r["case"]] is None])
        for case in CASES:
            rs = [r for r in mine if r["case"] == case]
            if not rs:
                continue
            wall = median([r["wall_s"] for r in rs])
            rows.append([m["label"], case, len(rs), spread([r["wall_s"] for r in rs]),
                         spread([r["peak_rss_mb"] for r in rs], 0), spread([r["peak_pss_mb"] for r in rs], 0),
                         spread([r["core_s"] for r in rs]), fmt(ratio(wall, peer_wall)),
                         fmt(ratio(wall, limits[m["label"]]["limit_s"])),
                         fmt(ratio(median([r["core_s"] for r in rs]), limits[m["label"]]["limit_s"]))])
    return table(["model", "case", "runs", "wall s", "peak RSS MB", "peak PSS MB",
                  "core s (ours: compress phase; peer: oneshot)", "wall / peer wall", "wall / limit",
                  "core / limit"], rows)


def phases_table(runs: list[dict]) -> str:
    ours = [r for r in runs if CASES[r["case"]] is not None]
    names = list(dict.fromkeys(k for r in ours for k in r["phases"]))
    rows = []
    for key in dict.fromkeys((r["model"], r["case"]) for r in ours):
        rs = [r for r in ours if (r["model"], r["case"]) == key]
        rest = median([r["wall_s"] - sum(r["phases"].values()) for r in rs])
        span = [r["wall_s"] - r["first_capture_s"] - r["after_capture_s"] for r in rs if "first_capture_s" in r]
        per_worker = [r["work_s"] / r["cluster"]["workers"] for r in rs]
        rows.append([*key, *(fmt(median([r["phases"].get(n) for r in rs]), 1) for n in names), fmt(rest, 1),
                     fmt(median([r.get("work_s") for r in rs]), 1),
                     *(fmt(median([r.get(k) for r in rs]), 1) for k in ("first_capture_s", "after_capture_s")),
                     fmt(median(span), 1), fmt(median(per_worker), 1)])
    return table(["model", "case", *(f"{n} s" for n in names), "outside the phases s",
                  "shards' work s (workers' own seconds, summed)", "first shard's calibration began at s",
                  "from the last calibration chunk to the end s", "between them s", "shards' work per worker s"],
                 rows)


def limit_table(models: list[dict], limits: dict) -> str:
    rows = []
    for m in models:
        f, lim = limits[m["label"]]["flops"], limits[m["label"]]
        rows.append([m["label"], f"{m['params'] / 1e6:.1f}M", f"{f['block_params'] / 1e6:.1f}M", f["tokens"],
                     *(fmt(f[k] / 1e9, 0) for k in ("forward", "hessians", "gptq", "total")),
                     fmt(lim["rate"] / 1e9, 1), fmt(lim["limit_s"], 1),
                     fmt(f["symmetric_total"] / lim["rate"], 1)])
    return table(["model", "params", "in blocks (Linear)", "tokens", "forward GFLOP", "Hessians GFLOP",
                  "GPTQ GFLOP", "total GFLOP", "matmul GFLOP/s (2 threads)", "limit s",
                  "limit s, symmetric H (half the Hessians)"], rows)


def fixed_table(runs: list[dict]) -> str:
    rows = []
    for workers in (1, 2):
        rs = [r for r in runs if r["workers"] == workers]
        if not rs:
            continue
        ph = lambda n: [r["phases"].get(n) for r in rs]  # noqa: E731
        rows.append([workers, len(rs), spread([r["wall_s"] for r in rs]), spread(ph("plan")), spread(ph("ray_start")),
                     spread(ph("compress")), spread([r["work_s"] for r in rs], 2), spread(ph("export")),
                     spread([r["wall_s"] - sum(r["phases"].values()) for r in rs]),
                     spread([r["wall_s"] - (r["phases"].get("compress") or 0) for r in rs]),
                     spread([r["peak_rss_mb"] for r in rs], 0)])
    return table(["workers", "runs", "wall s", "plan s", "ray_start s", "compress s", "shards' work s", "export s",
                  "outside the phases s", "fixed cost s (wall - compress)", "peak RSS MB"], rows)


# ---------------------------------------------------------------- main

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated, from %(default)s")
    p.add_argument("--cases", default=",".join(c.replace(", ", ":") for c in CASES),
                   help="comma-separated, from %(default)s (':' for ', ')")
    p.add_argument("--samples", type=int, default=128, help="calibration windows (both tools)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per calibration window")
    p.add_argument("--no-fixed", action="store_true", help="skip the fixed-cost runs")
    add_args(p, "16-speed")
    args = p.parse_args(argv)
    args.cases = [c.replace(":", ", ") for c in args.cases.split(",")]
    shapes = {m: MODELS[m] for m in args.models.split(",")}
    if args.smoke:
        args.repeats, args.samples, args.seq_len, shapes = 1, 8, 64, {"smoke": SMOKE_SHAPE}
        args.cases = [c for c in args.cases if c != "ours, 2 workers"]  # the same code path as 1 worker
    if any(CASES[c] is None for c in args.cases) and not PEER_PYTHON.exists():
        raise SystemExit(f"{PEER_PYTHON} not found: run benchmarks/setup_peer.sh first")
    lock = exclusive()  # noqa: F841
    with Bench() as bench:
        return measure(args, shapes, bench)


def measure(args, shapes: dict, bench: Bench) -> int:
    tiny = resolve_model("reference:tiny-lm")
    rates = [matmul_rate()]
    models, runs, fixed = [], [], []
    limits: dict = {}

    def write() -> None:
        rate = max(rates)
        for m in models:
            c = m["calibration"]["shape"]
            flops = calibration_flops(m["config"], c[0], c[1])
            limits[m["label"]] = {"flops": flops, "rate": rate, "rates": rates, "limit_s": flops["total"] / rate}
        facts = "; ".join(f"{m['label']}: `{m['dir']}`, {m['params'] / 1e6:.1f}M parameters, calibration "
                          f"{m['calibration']['shape'][0]} x {m['calibration']['shape'][1]} (sha256 "
                          f"{m['calibration']['sha256'][:16]}..., the same ids for both tools)" for m in models)
        notes = (f"GPTQ W4 g128, act-order (recipes/{RECIPE}.yaml, our evaluation off); the peer at its defaults "
                 f"(W4A16, act-order static, min-max observer). {facts}. Median (min-max) over the runs; memory: "
                 "peak of the summed RSS (PSS) of the process tree. Limit: results/16-limit.md (wall / limit and "
                 "core / limit divide by it). Issue 18's goals, for reading the ratios: ours with 2 workers <= 0.6x "
                 "the peer's wall, with 1 worker <= 1.0x, and <= 1.5x the limit.")
        data = {"models": models, "runs": runs, "limits": limits, "repeats": args.repeats}
        bench.write(args.results / "16-speed.md", "Speed against the peer and the matmul limit",
                    speed_table(models, runs, limits) + "\n\nOur report.json's phases (medians):\n\n"
                    + phases_table(runs) + f"\n\nWhere the cores' seconds went (medians; {CPU_NOTE}):\n\n"
                    + cores_table(runs, lambda r: f"{r['model']}, {r['case']}", "model, case"), data, notes)
        bench.write(args.results / "16-limit.md", "The matmul limit of the calibration work",
                    limit_table(models, limits), data, calibration_flops.__doc__.split("\n", 1)[1].replace("\n    ", "\n")
                    + f"\nMatmul rate: 2048 x 2048 float32, 2 threads, ~1 s, measured {len(rates)} times "
                      f"({', '.join(fmt(r / 1e9, 1) for r in rates)} GFLOP/s); the highest counts.")

    for label, shape in shapes.items():
        models.append(prepare_model(label, shape, args, tiny))
        run_model(models[-1], args, runs, write)  # the tables rewritten after every run
    rates.append(matmul_rate())
    write()
    if not args.no_fixed:
        fixed = fixed_cost(args, tiny)
        imports = import_seconds(args.repeats)
        bench.write(args.results / "16-fixed-cost.md", "Ray's fixed cost per run",
                    fixed_table(fixed) + f"\n\nWhere the cores' seconds went (medians; {CPU_NOTE}):\n\n"
                    + cores_table(fixed, lambda r: f"{r['workers']}", "workers") + "\n\nA fresh Python process that only imports "
                    "what one process of a run imports (torch, transformers' model classes, Ray), wall s: "
                    + ", ".join(f"the {k}'s `{IMPORTS[k]}` {spread(v)}" for k, v in imports.items()) + ".",
                    {"runs": fixed, "imports_s": imports},
                    f"`orchestrator run recipes/{FIXED_RECIPE}.yaml` on reference:tiny-lm (data-free, evaluation "
                    "off), 1 worker with 2 CPUs and 2 workers with 1 each; median (min-max). The fixed cost is "
                    "the whole wall minus the compress phase (which itself includes starting the worker actors: "
                    "'shards' work' is the workers' own seconds on the shards, summed); 'outside the phases' is "
                    "the CLI's start (imports), then the report, plots and exit (Ray stops beside the report).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
