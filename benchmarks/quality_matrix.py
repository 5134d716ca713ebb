"""Section 2: every method on the reference model, parallel and sequential calibration: quality and time.

    .venv/bin/python benchmarks/quality_matrix.py [--only RECIPE ...] [--model reference:tiny-lm] [--smoke]

Each case is `orchestrator run recipes/<recipe>.yaml [overrides]` in its own
process, as a user would run it; the numbers are read back from report.json.
Writes results/2-quality.md and its .json.
"""

from __future__ import annotations

from common import SMOKE_MODEL, SMOKE_OVERRIDES, Bench, brief, recipes_parser, resolve_model, run_recipe, table

CASES = [  # (recipe, overrides)
    ("rtn-w8", []),
    ("rtn-w4g128", []),
    ("gptq-w4g128", ["partition.calibration=parallel"]),
    ("gptq-w4g128", ["partition.calibration=sequential"]),
    ("rtn-w3g128", []),
    ("gptq-w3g128", ["partition.calibration=parallel"]),
    ("gptq-w3g128", ["partition.calibration=sequential"]),
    ("magnitude-50", []),
    ("wanda-50", []),
    ("sparsegpt-50", ["partition.calibration=parallel"]),
    ("sparsegpt-50", ["partition.calibration=sequential"]),
    ("magnitude-2of4", []),
    ("wanda-2of4", ["partition.calibration=parallel"]),
    ("wanda-2of4", ["partition.calibration=sequential"]),
    ("sparsegpt-2of4-w4g128", ["partition.calibration=parallel"]),
    ("sparsegpt-2of4-w4g128", ["partition.calibration=sequential"]),
]


def main() -> None:
    args = recipes_parser(__doc__, "2-quality").parse_args()
    model = SMOKE_MODEL if args.smoke else args.model
    base = [f"model.path={model}", "cluster.workers=2", *(SMOKE_OVERRIDES if args.smoke else [])]
    header = ["recipe", "calibration", "dense ppl", "compressed ppl", "ppl increase", "mean layer rel. error",
              "sparsity", "compress s", "total s"]
    rows, runs = [], []
    resolve_model(model)  # a reference model is built (minutes) before the first run is timed, not inside it
    with Bench() as bench:
        for recipe, overrides in CASES:
            if args.only and recipe not in args.only:
                continue
            name = recipe + "".join(f"-{o.split('=')[1]}" for o in overrides)
            r = run_recipe(recipe, base + overrides, args.work.resolve(), name)
            dense, comp = r["quality"]["dense"]["perplexity"], r["quality"]["compressed"]["perplexity"]
            mode = r["calibration"]["mode"] if r.get("calibration") else "none"
            rows.append([recipe, mode, f"{dense:.3f}", f"{comp:.3f}", f"{comp - dense:+.3f}",
                         f"{r['compression']['mean_relative_error']:.4f}", f"{r['compression']['mean_sparsity']:.3f}",
                         f"{r['timing']['phases']['compress']:.1f}", f"{r['timing']['total_s']:.1f}"])
            runs.append(brief(r))
            print(rows[-1], flush=True)
        notes = (f"`{model}`, 2 workers; \"compress s\" is the compression phase (calibration capture included), "
                 "\"total s\" the whole run (Ray start, dense and compressed evaluation included).")
        bench.write(args.results / "2-quality.md", "Section 2: every method on the reference model",
                    table(header, rows), {"model": model, "runs": runs}, notes)


if __name__ == "__main__":
    main()
