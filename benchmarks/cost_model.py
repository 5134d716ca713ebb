"""Section 18, part 1: the planner's time cost model (orchestrator/cost.py) against measured runs here.

    .venv/bin/python benchmarks/cost_model.py [--repeats 3] [--smoke]

Three small causal LMs, GPTQ W4 g128 (act-order, MSE observer) with 32 x 256 calibration windows, 2
workers, parallel mode, evaluation off: tiny-lm, and random Llamas of about 30M and 91M parameters, each
run --repeats times (the models in turn). For each run: the plan it made (report.json `plan`: predicted
seconds, its phases, its bottleneck; the rates measured at plan time) against the measured
`timing.phases` (ray_start + compress: what the forecast covers, its fixed cost included). The table:
per model, median (min-max) over the repeats; the phases are the median run's.
"""

from __future__ import annotations

import argparse

from common import Bench, add_args, brief, random_llama, resolve_model, run_recipe, spread, table

SHAPES = {"random-llama-30m": dict(hidden=512, layers=8, ffn=1408, heads=8, vocab=4096),
          "random-llama-91m": dict(hidden=768, layers=12, ffn=2048, heads=12, vocab=4096)}
SAMPLES, SEQ_LEN = 32, 256


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_args(p, "18-cost-model")
    p.add_argument("--repeats", type=int, default=3, help="runs of each model (default: %(default)s)")
    args = p.parse_args()
    work = args.work.resolve()
    common = ["cluster.workers=2", f"data.calibration.num_samples={8 if args.smoke else SAMPLES}",
              f"data.calibration.seq_len={SEQ_LEN}", "data.eval.enabled=false", "partition.calibration=parallel"]
    runs = []
    with Bench() as bench:
        tokenizer = resolve_model("reference:tiny-lm")
        models = {"tiny-lm": (str(tokenizer), None)}
        for name, shape in SHAPES.items():
            folder, params = random_llama(work / "models", tokenizer, **shape)
            models[name] = (str(folder), params)
        models = dict(list(models.items())[:1 if args.smoke else None])
        for repeat in range(1 if args.smoke else args.repeats):
            for name, (path, params) in models.items():
                report = run_recipe("gptq-w4g128", [f"model.path={path}", *common], work, f"{name}-r{repeat}")
                phases = report["timing"]["phases"]
                runs.append({"model": name, "repeat": repeat, "params": params, "report": brief(report),
                             "measured_s": phases.get("ray_start", 0.0) + phases["compress"]})
        rows = [row(name, [r for r in runs if r["model"] == name]) for name in models]
        header = ["model", "params", "runs", "predicted s", "measured s (ray_start + compress)", "measured / predicted",
                  "predicted s without the fixed cost", "measured compress s", "predicted bottleneck",
                  "predicted phases (s, summed over shards)"]
        bench.write(args.results / "18-cost-model.md", "Section 18: the time cost model against measured runs",
                    table(header, rows), {"runs": runs},
                    f"GPTQ W4 g128 (act-order, MSE observer), {SAMPLES} x {SEQ_LEN} calibration tokens, 2 workers of one "
                    "thread, parallel calibration, evaluation off; median (min-max) over the runs. Predicted: "
                    "report.json `plan` (the forecast each run made, with the rates it measured at plan time; the "
                    "first run's: " + runs[0]["report"]["plan"]["rates"] + "). Measured: `timing.phases` ray_start + "
                    "compress.")


def row(name: str, runs: list[dict]) -> list:
    """One model's table row: median (min-max) over its runs; the phases and bottleneck of its median run."""
    plans = [r["report"]["plan"] for r in runs]
    ratios = [r["measured_s"] / p["seconds"] for r, p in zip(runs, plans)]
    middle = plans[sorted(range(len(runs)), key=ratios.__getitem__)[len(runs) // 2]]
    return [name, f"{runs[0]['report']['model']['params'] / 1e6:.1f}M", len(runs),
            spread([p["seconds"] for p in plans]), spread([r["measured_s"] for r in runs]), spread(ratios, 2),
            spread([p["seconds"] - p["fixed_s"] for p in plans]),
            spread([r["report"]["timing"]["phases"]["compress"] for r in runs]), middle["bottleneck"],
            ", ".join(f"{k} {v:.1f}" for k, v in middle["phases_s"].items() if v >= 0.05)]


if __name__ == "__main__":
    main()
