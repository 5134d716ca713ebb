"""Section 18, part 2: `orchestrator plan` for Llama-3.1-405B and DeepSeek-V3 (671B) on a described
cluster of 16 nodes x 8 H100 80 GB, from their config.json alone (cluster/plans/*/config.json).

    .venv/bin/python benchmarks/plans.py

Writes each command's output to results/18-plan-<model>.txt with a JSON beside it (commit, machine,
command, exit code); cluster/PLANS.md includes them (render.py). The GPU rates are the recipe's
described-cluster assumptions (cluster.gpu_tflops and cost.py's constants), not measurements.
"""

from __future__ import annotations

import argparse
import json
import shlex
import time
from pathlib import Path

from common import ROOT, Bench, add_args, run_cli

CLUSTER = ["cluster.nodes=16", "cluster.gpus_per_node=8", "cluster.gpu_memory_gb=80", "cluster.host_memory_gb=2048",
           "cluster.network_gbps=400", "cluster.read_gb_per_s=2", "cluster.gpu_tflops=400",
           "data.calibration.num_samples=128", "data.calibration.seq_len=2048"]
PLANS = {"llama-405b": ("cluster/plans/llama-3.1-405b", []),
         "deepseek-v3": ("cluster/plans/deepseek-v3", [])}


def plan_output(args: list[str], log: Path) -> tuple[int, str]:
    """`orchestrator plan`'s exit code and its output from its "model:" line on (the log has the planner's
    info lines before it), paths relative to the repository."""
    code, _ = run_cli(["plan", *args], log, check=False)
    lines = log.read_text().splitlines()
    text = "\n".join(lines[min(i for i, line in enumerate(lines) if line.startswith("model: ")):])
    return code, text.replace(str(ROOT) + "/", "")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_args(p, "18-plans")
    args = p.parse_args()
    with Bench() as bench:
        for name, (folder, extra) in PLANS.items():
            command = ["recipes/gptq-w4g128.yaml", f"model.path={folder}", *CLUSTER, *extra,
                       f"output.dir={args.work.resolve() / 'runs'}"]
            code, text = plan_output(command, args.work.resolve() / "logs" / f"{name}.log")
            args.results.mkdir(parents=True, exist_ok=True)
            (args.results / f"18-plan-{name}.txt").write_text(f"$ orchestrator plan {shlex.join(command[:-1])}\n"
                                                               f"{text}\n(exit {code})\n")
            prov = {**bench.provenance, **bench.load.snapshot(), "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            (args.results / f"18-plan-{name}.json").write_text(json.dumps(
                {"title": f"orchestrator plan: {name} on 16 x 8 GPUs (described)", "provenance": prov,
                 "data": {"command": ["orchestrator", "plan", *command], "exit_code": code}}, indent=2) + "\n")
            print(f"wrote results/18-plan-{name}.txt (exit {code})")


if __name__ == "__main__":
    main()
