"""Section 12: what each quality option adds, one at a time, on a model: perplexity increase and time.

    .venv/bin/python benchmarks/ablation.py --model reference:smollm2 --group-size 64 --bits 4,3 --seeds 0,1,2 \
        --calib-samples 64 --calib-seq-len 256 --eval-seq-len 256 --eval-max-windows 64

Each variant is `orchestrator run recipes/<recipe>.yaml` with the overrides
listed in VARIANTS (every option the comparison depends on is set explicitly,
so a change of defaults does not change what a row means), with its own
evaluation off; the export is then evaluated here with
orchestrator.evaluate.perplexity on the same held-out windows as the dense
model (evaluated once). Calibrated variants run once per calibration seed
(data.calibration.seed): the table gives the mean increase and the spread
(max - min); RTN reads no calibration data and runs once.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

from common import SMOKE_MODEL, Bench, add_args, brief, fmt, resolve_model, run_recipe, table

# every GPTQ variant starts from a symmetric grid without asymmetric calibration, whatever its recipe says
# (gptq-w2g128 sets both since issue 17), and adds what its name says
PLAIN = ["stages.0.symmetric=true", "stages.0.asymmetric=0.0"]
OLD = PLAIN + ["stages.0.act_order=false", "stages.0.observer=minmax"]  # GPTQ's settings before issue 17
NEW = PLAIN + ["stages.0.act_order=true", "stages.0.observer=mse"]  # its W4 / W3 defaults since
PARALLEL, SEQUENTIAL = ["partition.calibration=parallel"], ["partition.calibration=sequential"]
ROTATED = ["rotation.enabled=true"]
AWQ = ["stages.0.awq=true"]
ZERO_POINT = ["stages.0.symmetric=false"]  # an asymmetric grid: a zero point per group
VARIANTS = [  # (id, name, recipe with {bits}, overrides, calibrated)
    ("rtn", "RTN", "rtn-w{bits}g128", ["stages.0.observer=minmax"], False),
    ("rtn-mse", "RTN + MSE grid", "rtn-w{bits}g128", ["stages.0.observer=mse"], False),
    ("gptq-old", "GPTQ (act-order off, min-max grid, parallel: defaults before issue 17)", "gptq-w{bits}g128",
     OLD + PARALLEL, True),
    ("gptq-ao", "GPTQ + act-order", "gptq-w{bits}g128",
     PLAIN + ["stages.0.act_order=true", "stages.0.observer=minmax"] + PARALLEL, True),
    ("gptq-ao-mse", "GPTQ + act-order + MSE grid (the W4 / W3 defaults now)", "gptq-w{bits}g128", NEW + PARALLEL, True),
    ("gptq-ao-seq", "GPTQ + act-order + sequential", "gptq-w{bits}g128",
     PLAIN + ["stages.0.act_order=true", "stages.0.observer=minmax"] + SEQUENTIAL, True),
    ("gptq-ao-mse-seq", "GPTQ + act-order + MSE grid + sequential", "gptq-w{bits}g128", NEW + SEQUENTIAL, True),
    ("gptq-ao-mse-seq-asym", "GPTQ + act-order + MSE grid + sequential + asymmetric (0.25)", "gptq-w{bits}g128",
     NEW + SEQUENTIAL + ["stages.0.asymmetric=0.25"], True),
    ("gptq-ao-mse-seq-asym1", "GPTQ + act-order + MSE grid + sequential + asymmetric (1.0)", "gptq-w{bits}g128",
     NEW + SEQUENTIAL + ["stages.0.asymmetric=1.0"], True),
    ("rtn-awq", "RTN + AWQ", "rtn-w{bits}g128", ["stages.0.observer=minmax"] + AWQ, True),
    ("rtn-mse-awq", "RTN + MSE grid + AWQ", "rtn-w{bits}g128", ["stages.0.observer=mse"] + AWQ, True),
    ("gptq-ao-mse-awq", "GPTQ + act-order + MSE grid + AWQ", "gptq-w{bits}g128", NEW + PARALLEL + AWQ, True),
    ("rtn-rot", "RTN + rotation", "rtn-w{bits}g128", ["stages.0.observer=minmax"] + ROTATED, False),
    ("gptq-ao-mse-rot", "GPTQ + act-order + MSE grid + rotation", "gptq-w{bits}g128", NEW + PARALLEL + ROTATED,
     True),
    ("gptq-ao-mse-zp", "GPTQ + act-order + MSE grid with zero points", "gptq-w{bits}g128", NEW + PARALLEL + ZERO_POINT,
     True),
    ("gptq-ao-mse-zp-rot", "GPTQ + act-order + MSE grid with zero points + rotation", "gptq-w{bits}g128",
     NEW + PARALLEL + ZERO_POINT + ROTATED, True),
    ("gptq-ao-mse-zp-seq", "GPTQ + act-order + MSE grid with zero points + sequential", "gptq-w{bits}g128",
     NEW + SEQUENTIAL + ZERO_POINT, True),
    ("gptq-ao-mse-zp-seq-asym", "GPTQ + act-order + MSE grid with zero points + sequential + asymmetric (0.25)",
     "gptq-w{bits}g128", NEW + SEQUENTIAL + ZERO_POINT + ["stages.0.asymmetric=0.25"], True),
    ("gptq-ao-mse-zp-rot-seq-asym", "GPTQ + act-order + MSE grid with zero points + rotation + sequential + "
     "asymmetric (0.25)", "gptq-w{bits}g128", NEW + SEQUENTIAL + ZERO_POINT + ROTATED + ["stages.0.asymmetric=0.25"],
     True),
]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="reference:tiny-lm")
    p.add_argument("--bits", default="4,3", help="comma-separated bit widths (recipes rtn-w{b}g128, gptq-w{b}g128)")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--seeds", default="0,1,2", help="calibration seeds of the calibrated variants")
    p.add_argument("--only", nargs="*", help=f"variant ids to run (default: all of {' '.join(v[0] for v in VARIANTS)})")
    p.add_argument("--calib-samples", type=int)
    p.add_argument("--calib-seq-len", type=int)
    p.add_argument("--eval-seq-len", type=int)
    p.add_argument("--eval-max-windows", type=int)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads for evaluation")
    p.add_argument("--table", default="12-ablation-smollm2", help="name of the table in --results (default: %(default)s)")
    add_args(p, "12-ablation")  # --results, --work, --smoke (micro-lm, W4, one seed, two variants, short windows)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.smoke:
        args.model, args.bits, args.seeds, args.only = SMOKE_MODEL, "4", "0", ["rtn", "gptq-ao-mse"]
        args.calib_samples, args.calib_seq_len, args.eval_seq_len, args.eval_max_windows = 16, 64, 64, 4
    from orchestrator.evaluate import perplexity
    from orchestrator.recipe import EvalDataConfig

    model_dir = resolve_model(args.model)  # built before anything is timed
    base = [f"model.path={model_dir}", f"cluster.workers={args.workers}", "data.eval.enabled=false"]
    for key, value in [("data.calibration.num_samples", args.calib_samples),
                       ("data.calibration.seq_len", args.calib_seq_len)]:
        if value is not None:
            base.append(f"{key}={value}")
    ecfg = EvalDataConfig(speed=False)
    if args.eval_seq_len is not None:
        ecfg.seq_len = args.eval_seq_len
    if args.eval_max_windows is not None:
        ecfg.max_windows = args.eval_max_windows
    work = args.work.resolve()
    seeds = [int(s) for s in args.seeds.split(",")]
    header = ["bits", "id", "variant", "perplexity increase (mean)", "spread (max - min)", "runs", "compress s (mean)"]
    rows, data = [], {"model": args.model, "group_size": args.group_size, "eval": vars(ecfg), "variants": []}
    with Bench() as bench:
        dense = perplexity(model_dir, ecfg, threads=args.threads).perplexity
        data["dense_ppl"] = dense
        print(f"dense perplexity {dense:.3f}", file=sys.stderr, flush=True)
        for bits in [int(b) for b in args.bits.split(",")]:
            for vid, name, recipe, overrides, calibrated in VARIANTS:
                if args.only and vid not in args.only:
                    continue
                runs = []
                for seed in seeds if calibrated else seeds[:1]:
                    tag = f"w{bits}-{vid}-seed{seed}"
                    report = run_recipe(recipe.format(bits=bits), base + overrides + [
                        f"stages.0.group_size={args.group_size}", f"data.calibration.seed={seed}"], work, tag)
                    ppl = perplexity(work / tag / "model", ecfg, threads=args.threads).perplexity
                    runs.append({"seed": seed, "perplexity": ppl, "increase": ppl - dense,
                                 "compress_s": report["timing"]["phases"]["compress"], "report": brief(report)})
                    print(f"[{tag}] {name}: {ppl:.3f} ({ppl - dense:+.3f}), compress "
                          f"{runs[-1]['compress_s']:.1f} s", file=sys.stderr, flush=True)
                increases = [r["increase"] for r in runs]
                rows.append([bits, vid, name, f"{statistics.mean(increases):+.3f}",
                             fmt(max(increases) - min(increases), 3) if len(runs) > 1 else "n/a", len(runs),
                             f"{statistics.mean(r['compress_s'] for r in runs):.1f}"])
                data["variants"].append({"bits": bits, "id": vid, "name": name, "recipe": recipe,
                                         "overrides": overrides, "runs": runs})
        notes = (f"`{args.model}`, groups of {args.group_size}, {args.workers} workers; dense perplexity "
                 f"{dense:.3f} on {ecfg.max_windows} held-out windows of {ecfg.seq_len} tokens; calibrated "
                 f"variants over seeds {args.seeds}.")
        bench.write(args.results / f"{args.table}.md", f"Section 12: ablation on {args.model}", table(header, rows), data, notes)


if __name__ == "__main__":
    main()
