"""Section 18, part 1: the planner's time cost model (orchestrator/cost.py) against measured runs here.

    .venv/bin/python benchmarks/cost_model.py [--smoke]

Three small causal LMs, GPTQ W4 g128 (act-order, MSE observer) with 32 x 256 calibration windows, 2
workers, parallel mode, evaluation off: tiny-lm, and random Llamas of about 30M and 91M parameters. For
each: the plan the run made (report.json `plan`: predicted seconds, its phases, its bottleneck; the rates
measured at plan time) against the measured `timing.phases` (ray_start + compress: what the forecast
covers, its fixed cost included).
"""

from __future__ import annotations

import argparse

from common import Bench, add_args, brief, random_llama, resolve_model, run_recipe, table

SHAPES = {"random-llama-30m": dict(hidden=512, layers=8, ffn=1408, heads=8, vocab=4096),
          "random-llama-91m": dict(hidden=768, layers=12, ffn=2048, heads=12, vocab=4096)}
SAMPLES, SEQ_LEN = 32, 256


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_args(p, "18-cost-model")
    args = p.parse_args()
    work = args.work.resolve()
    common = ["cluster.workers=2", f"data.calibration.num_samples={8 if args.smoke else SAMPLES}",
              f"data.calibration.seq_len={SEQ_LEN}", "data.eval.enabled=false", "partition.calibration=parallel"]
    rows, runs = [], []
    with Bench() as bench:
        tokenizer = resolve_model("reference:tiny-lm")
        models = {"tiny-lm": (str(tokenizer), None)}
        for name, shape in SHAPES.items():
            folder, params = random_llama(work / "models", tokenizer, **shape)
            models[name] = (str(folder), params)
        for name, (path, params) in list(models.items())[:1 if args.smoke else None]:
            report = run_recipe("gptq-w4g128", [f"model.path={path}", *common], work, name)
            plan, phases = report["plan"], report["timing"]["phases"]
            measured = phases.get("ray_start", 0.0) + phases["compress"]
            rows.append([name, f"{report['model']['params'] / 1e6:.1f}M", f"{plan['seconds']:.1f}", f"{measured:.1f}",
                         f"{measured / plan['seconds']:.2f}", f"{plan['seconds'] - plan['fixed_s']:.1f}",
                         f"{phases['compress']:.1f}", plan["bottleneck"],
                         ", ".join(f"{k} {v:.1f}" for k, v in plan["phases_s"].items() if v >= 0.05)])
            runs.append({"model": name, "params": params, "report": brief(report)})
        header = ["model", "params", "predicted s", "measured s (ray_start + compress)", "measured / predicted",
                  "predicted s without the fixed cost", "measured compress s", "predicted bottleneck",
                  "predicted phases (s, summed over shards)"]
        bench.write(args.results / "18-cost-model.md", "Section 18: the time cost model against measured runs",
                    table(header, rows), {"runs": runs},
                    f"GPTQ W4 g128 (act-order, MSE observer), {SAMPLES} x {SEQ_LEN} calibration tokens, 2 workers of one "
                    "thread, parallel calibration, evaluation off. Predicted: report.json `plan` (the forecast the run "
                    "made, with the rates it measured at plan time: " + (runs[0]["report"]["plan"]["rates"] if runs else "")
                    + "). Measured: `timing.phases` ray_start + compress.")


if __name__ == "__main__":
    main()
