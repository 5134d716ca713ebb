"""Section 10, part 2: the planner's expert split on a mixture-of-experts model, predicted against measured.

    .venv/bin/python benchmarks/moe_plan.py [--smoke]

The random Mixtral of section 10 (hidden 1024, 8 blocks of 8 experts of width 1792, float32, 1.5 GB),
GPTQ W4 g128 with 32 x 128 calibration windows, 2 workers, parallel mode, evaluation off. Three runs:
whole blocks (memory unlimited), then `cluster.memory_gb` set below what whole blocks need, twice, so
that the planner splits the experts itself (`partition.experts_per_shard` unset). For each:
`orchestrator plan`'s chosen split and predicted worker peak (results/10-moe-plan.txt: its output for
the first split), the measured worker peak (report.json `memory`: each worker's ru_maxrss), and
whether every exported tensor is byte-equal to the whole-block run's.
"""

from __future__ import annotations

import argparse
import hashlib
import re
from pathlib import Path

import torch
from safetensors import safe_open

from common import Bench, add_args, brief, fmt, mb, parse_shape, random_llama, resolve_model, run_cli, run_recipe, table

SHAPE, SMOKE_SHAPE = "1024,8,1792,16,2048", "128,2,256,2,2048"
EXPERTS = 8
SAMPLES = 32
SPLITS = (4, 2)  # experts per shard the planner is led to choose, by a memory limit just above their need
MARGIN_GB = 0.05  # above that need: the process base the planner measures varies by about 0.02 GB


def plan_text(recipe: str, overrides: list[str], log: Path) -> str:
    """`orchestrator plan`'s output from its "model:" line on (the log has the planner's info lines too)."""
    run_cli(["plan", f"recipes/{recipe}.yaml", *overrides], log)
    lines = log.read_text().splitlines()
    return "\n".join(lines[min(i for i, line in enumerate(lines) if line.startswith("model: ")):])


def needed_gb(text: str) -> float:
    """The plan's "memory: X GB at once" figure."""
    return float(re.search(r"^memory: ([0-9.]+) GB at once", text, re.M).group(1))


def tensor_digests(run_dir: Path) -> dict[str, str]:
    """sha256 of every tensor of the export (its files are cut by shard, so they differ with the split)."""
    digests = {}
    for path in sorted((run_dir / "model").glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                digests[key] = hashlib.sha256(f.get_tensor(key).contiguous().view(-1).view(torch.uint8).numpy()).hexdigest()
    return digests


def experts_per_shard(text: str) -> str:
    """The plan's "experts: N per shard" line, or whole blocks."""
    m = re.search(r"^experts: (\d+) per shard", text, re.M)
    return f"{m.group(1)} of {EXPERTS}" if m else "whole blocks"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_args(p, "10-moe-plan")
    args = p.parse_args()
    work = args.work.resolve()
    shape = parse_shape(SMOKE_SHAPE if args.smoke else SHAPE)
    recipe = "gptq-w4g128"
    with Bench() as bench:
        tokenizer = resolve_model("reference:micro-lm" if args.smoke else "reference:tiny-lm")
        folder, params = random_llama(work / "models", tokenizer, **shape, experts=EXPERTS)
        base = [f"model.path={folder}", "cluster.workers=2", f"data.calibration.num_samples={SAMPLES}",
                "data.eval.enabled=false"]
        limits = [None] + [needed_gb(plan_text(recipe, base + [f"partition.experts_per_shard={k}"],
                                               work / "logs" / f"plan-{k}-per-shard.log")) + MARGIN_GB for k in SPLITS]
        rows, runs, reference = [], [], None
        limits = [None if x is None else round(x, 2) for x in limits]
        args.results.mkdir(parents=True, exist_ok=True)
        for limit in limits:
            overrides = base + ([f"cluster.memory_gb={limit}"] if limit else [])
            name = "whole" if limit is None else f"limit-{limit}"
            text = plan_text(recipe, overrides, work / "logs" / f"plan-{name}.log")
            if limit == limits[1]:
                (args.results / "10-moe-plan.txt").write_text(text + "\n")
            report = run_recipe(recipe, overrides, work, name)
            digests = tensor_digests(work / name)
            reference = reference or digests
            predicted, measured = report["plan"]["worker_bytes"], report["memory"]["worker_peak_rss_bytes"]
            rows.append(["unlimited" if limit is None else f"{limit} GB",
                         experts_per_shard(text), len(report["shards"]), f"{needed_gb(text):.2f} GB", mb(predicted), mb(measured),
                         f"{100 * (measured / predicted - 1):+.1f}%", fmt(report["timing"]["phases"]["compress"], 1),
                         "yes" if digests == reference else "**no**"])
            runs.append({"memory_gb": limit, "experts_per_shard": experts_per_shard(text), "plan_output": text,
                         "same_tensors": digests == reference, "report": brief(report)})
        header = ["cluster.memory_gb", "experts per shard (planner)", "shards", "predicted need (all processes)",
                  "predicted worker peak", "measured worker peak", "measured vs predicted", "compress s",
                  "export tensors byte-equal to whole blocks'"]
        label = (f"random Mixtral (hidden {shape['hidden']}, {shape['layers']} blocks, {EXPERTS} experts of width "
                 f"{shape['ffn']}, 2 per token), {params / 1e6:.1f}M params, float32")
        bench.write(args.results / "10-moe-plan.md", "Section 10: the planner's expert split, predicted against measured",
                    table(header, rows), {"model": str(folder), "params": params, "runs": runs},
                    f"{label}; GPTQ W4 g128, {SAMPLES} x 128 calibration windows, 2 workers, parallel mode, evaluation "
                    f"off. `cluster.memory_gb` set {MARGIN_GB} GB above what {' and '.join(map(str, SPLITS))} experts per shard need "
                    f"(below what whole blocks need) leads the planner, with `partition.experts_per_shard` unset, "
                    f"to split each block's experts itself; a worker's measured peak is its process's "
                    f"high-water mark (ru_maxrss) over all its shards.")


if __name__ == "__main__":
    main()
