"""Section 6: memory. The driver holds no model; the planner's predicted worker peak against the measured one.

    .venv/bin/python benchmarks/memory.py [--smoke]

1. A 3.26 GB random Llama (hidden 2048, 12 blocks, FFN 8192, float32, four
   safetensors files), GPTQ W4 g128 with 32 x 128 calibration windows, ours
   against llm-compressor: compare_llmcompressor.py --timing-model (its own
   table: results/6-compare-3gb.md/.json), then `orchestrator plan` on the same
   model (results/6-plan-3gb.txt: the prediction's breakdown) and, from our
   run's report.json (`plan`, `memory`): results/6-memory-3gb.md/.json.
2. Predicted against measured worker peak, and the driver's absolute peak, at
   three sizes: the 116M timing model (GPTQ W4 g128, 32 x 128), a 600 MB Llama
   cut into 200 MB files (tests/test_planner.py's shape, RTN W4 g128), and the
   3.26 GB run of part 1: results/6-planner.md/.json.
Every orchestrator run here has its own evaluation off (data.eval.enabled=false).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from common import (BENCH, ROOT, SMOKE_MODEL, Bench, add_args, brief, clean_env, fmt, mb, parse_shape,
                    random_llama, resolve_model, run_cli, run_recipe, table)

BIG_SHAPE = "2048,12,8192,16"
SIZES = [  # (shape: hidden,layers,ffn,heads[,vocab[,max file size]], recipe, overrides)
    ("768,12,3072,12", "gptq-w4g128", ["data.calibration.num_samples=32"]),
    ("1024,8,4096,16,8192,200MB", "rtn-w4g128", []),
]
SMOKE_BIG = "128,2,256,2"
SMOKE_SIZES = [("128,2,256,2", "gptq-w4g128", ["data.calibration.num_samples=8"]),
               ("256,2,512,4,,1MB", "rtn-w4g128", [])]


def pct(a, b) -> str:
    return f"{100 * (a / b - 1):+.1f}%"


def planner_row(label: str, recipe: str, report: dict) -> list:
    plan, memory, model_bytes = report["plan"], report["memory"], report["size"]["dense_bytes"]
    predicted, measured = plan["worker_bytes"], memory["worker_peak_rss_bytes"]
    driver = memory["driver_peak_rss_bytes"]
    growth = driver - plan["base_bytes"]
    return [label, recipe, mb(predicted), mb(measured), fmt(measured / predicted),
            f"{mb(driver)} (+{mb(growth)}, {100 * growth / model_bytes:.1f}% of the model)",
            fmt(plan["seconds"], 1), fmt(report["timing"]["phases"]["compress"], 1)]


def size(n_bytes: int) -> str:
    return f"{n_bytes / 1e9:.2f} GB" if n_bytes >= 1e9 else f"{n_bytes / 1e6:.0f} MB"


def describe_model(report: dict, shape: dict) -> str:
    files = sorted(Path(report["model"]["dir"]).glob("*.safetensors"))
    return (f"{size(report['size']['dense_bytes'])} Llama (h{shape['hidden']}, {shape['layers']} blocks, "
            f"FFN {shape['ffn']}, {report['model']['params'] / 1e6:.1f}M params, {len(files)} file(s))")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_args(p, "6-memory")
    args = p.parse_args()
    work = args.work.resolve()
    big_shape, sizes = (SMOKE_BIG, SMOKE_SIZES) if args.smoke else (BIG_SHAPE, SIZES)
    with Bench() as bench:
        # 1. the big model, ours against the peer (the comparison script runs both and keeps our run folder)
        compare_md = args.results / "6-compare-3gb.md"
        cmd = [sys.executable, str(BENCH / "compare_llmcompressor.py"), "--timing-model", "--timing-shape", big_shape,
               "--work", str(work / "timing-3gb"), "--out", str(compare_md)] + (["--smoke"] if args.smoke else [])
        print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
        if subprocess.run(cmd, cwd=ROOT, env=clean_env()).returncode:
            raise SystemExit("compare_llmcompressor.py failed (its output is above)")
        row = json.loads(compare_md.with_suffix(".json").read_text())["data"]["rows"][0]
        ours, peer = row["ours"], row["peer"]
        report = json.loads(Path(ours["report"]).read_text())
        model_dir = Path(report["model"]["dir"])
        plan_log = work / "logs" / "plan-3gb.log"
        samples = report["calibration"]["num_samples"]
        run_cli(["plan", "recipes/gptq-w4g128.yaml", f"model.path={model_dir}",
                 f"data.calibration.num_samples={samples}"], plan_log)
        lines = plan_log.read_text().splitlines()
        plan_text = "\n".join(lines[min(i for i, line in enumerate(lines) if line.startswith("model: ")):])
        (args.results / "6-plan-3gb.txt").write_text(plan_text + "\n")

        plan, memory, model_bytes = report["plan"], report["memory"], report["size"]["dense_bytes"]
        driver = memory["driver_peak_rss_bytes"]
        worker, predicted = memory["worker_peak_rss_bytes"], plan["worker_bytes"]
        peer_mb = peer["peak_rss_mb"] * 2**20
        rows = [
            ["driver / main process peak RSS",
             f"**{mb(driver)} ({100 * driver / model_bytes:.1f}% of the model)**; {mb(plan['base_bytes'])} of it "
             f"is the imported libraries",
             f"{mb(peer_mb)} (one process holds the model: {peer_mb / model_bytes:.2f}x its size)"],
            ["each worker's peak RSS: measured / predicted",
             f"**{mb(worker)} / {mb(predicted)} ({pct(worker, predicted)})**", "-"],
            ["whole process tree, peak summed RSS (PSS)",
             f"{fmt(ours['peak_rss_mb'], 0)} MB ({fmt(ours['peak_pss_mb'], 0)} MB)",
             f"{fmt(peer['peak_rss_mb'], 0)} MB ({fmt(peer['peak_pss_mb'], 0)} MB)"],
            ["wall time, whole command", f"{fmt(ours['wall_s'], 1)} s", f"{fmt(peer['wall_s'], 1)} s"],
            ["compression (ours: compress phase; peer: oneshot) / planner's estimate",
             f"{fmt(ours['core_s'], 1)} s / {fmt(plan['seconds'], 1)} s", f"{fmt(peer['core_s'], 1)} s"],
        ]
        peer_version = peer["settings"]["versions"]["llmcompressor"]
        big_label = describe_model(report, parse_shape(big_shape))
        notes = (f"{big_label}, float32; GPTQ W4 g128, {samples} x {report['calibration']['seq_len']} calibration "
                 f"windows, 2 workers, parallel mode. Ours from report.json (`memory`: sampled driver RSS and each "
                 f"worker's ru_maxrss; `plan`: the prediction made before the run, broken down in 6-plan-3gb.txt); "
                 f"whole-tree figures from compare_llmcompressor.py's sampler (6-compare-3gb.md).")
        bench.write(args.results / "6-memory-3gb.md", f"Section 6: memory on a {size(model_bytes)} model",
                    table(["", "ours", f"llm-compressor {peer_version}"], rows),
                    {"model": str(model_dir), "compare_row": row, "report": brief(report), "plan_output": plan_text},
                    notes)

        # 2. predicted against measured at three sizes (the third: the run above)
        tokenizer = resolve_model(SMOKE_MODEL if args.smoke else "reference:tiny-lm")
        rows, runs = [], []
        for shape_text, recipe, overrides in sizes:
            shape = parse_shape(shape_text)
            folder, _ = random_llama(work / "models", tokenizer, **shape)
            name = f"{folder.name}-{recipe}"
            r = run_recipe(recipe, [f"model.path={folder}", "cluster.workers=2", "data.eval.enabled=false",
                                    *overrides], work, name)
            rows.append(planner_row(describe_model(r, shape), recipe, r))
            runs.append(brief(r))
        rows.append(planner_row(big_label, "gptq-w4g128", report))
        runs.append(brief(report))
        header = ["model", "recipe", "predicted worker peak", "measured worker peak", "measured / predicted",
                  "driver peak (growth over its libraries)", "predicted compress s", "measured compress s"]
        bench.write(args.results / "6-planner.md", "Section 6: the planner's predictions at three sizes",
                    table(header, rows), {"runs": runs},
                    "Random float32 Llamas (seed 0), 2 workers, evaluation off. A worker's measured peak is its "
                    "process's high-water mark over all its shards; the prediction is the largest shard plus the "
                    "embeddings and head one worker copies.")


if __name__ == "__main__":
    main()
