"""Section 1: the reference model, built from scratch, and the data-free RTN W8 / W4 g128 runs on it.

    .venv/bin/python benchmarks/reference_model.py [--smoke]

Builds the model (`orchestrator reference build tiny-lm`) into an empty cache
(WORK/cache, as ORCHESTRATOR_CACHE), timing it, then runs the recipes with that
cache. Writes results/1-reference.md/.json (the model's facts from its
reference.json, and the perplexity of dense, W8 and W4 g128 on the evaluation
windows a run uses) and results/1-demo-output.txt: what `orchestrator run
recipes/rtn-w4g128.yaml` prints (the README's demo), tracking into a sqlite
store in the work folder.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

from common import SMOKE_MODEL, SMOKE_OVERRIDES, Bench, add_args, brief, fmt, run_cli, run_recipe, table

RUNS = [("rtn-w8", "RTN W8, per channel"), ("rtn-w4g128", "RTN W4, groups of 128")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_args(p, "1-reference")
    args = p.parse_args()
    model = SMOKE_MODEL if args.smoke else "reference:tiny-lm"
    overrides = [f"model.path={model}", *(SMOKE_OVERRIDES if args.smoke else [])]
    work = args.work.resolve()
    with Bench() as bench:
        name = model.split(":", 1)[1]
        shutil.rmtree(work / "cache", ignore_errors=True)
        os.environ["ORCHESTRATOR_CACHE"] = str(work / "cache")  # run_cli's processes inherit it
        log = work / "logs" / "reference-build.log"
        _, build_wall = run_cli(["reference", "build", name], log)
        folder = Path(log.read_text().strip().splitlines()[-1])
        ref = json.loads((folder / "reference.json").read_text())

        reports = {}
        for recipe, _ in RUNS:
            demo = recipe == "rtn-w4g128"  # the README's demo: tracked, as a user's first run is
            extra = ["tracking.enabled=true", f"tracking.uri=sqlite:///{work}/mlflow.db"] if demo else []
            reports[recipe] = run_recipe(recipe, overrides + extra, work, recipe)
        demo_log = Path(reports["rtn-w4g128"]["bench"]["log"]).read_text().splitlines()
        start = max(i for i, line in enumerate(demo_log) if line.split() == ["dense", "compressed"])
        args.results.mkdir(parents=True, exist_ok=True)
        (args.results / "1-demo-output.txt").write_text("\n".join(demo_log[start:]) + "\n")

        first = reports[RUNS[0][0]]
        dense = first["quality"]["dense"]
        header = ["model", f"perplexity ({dense['windows']} held-out windows, {dense['tokens']} tokens)"]
        rows = [["dense", fmt(first["quality"]["dense"]["perplexity"], 3)]]
        rows += [[label, fmt(reports[r]["quality"]["compressed"]["perplexity"], 3)] for r, label in RUNS]
        spec = ref["spec"]
        notes = (f"`{model}`: Llama, {spec['num_layers']} blocks, hidden {spec['hidden_size']}, FFN "
                 f"{spec['intermediate_size']}, vocab {spec['vocab_size']}, {ref['parameters'] / 1e6:.2f}M parameters; "
                 f"trained {spec['steps']} steps of {spec['batch_size']} x {spec['seq_len']} tokens, final train loss "
                 f"{ref['final_train_loss']:.3f}, held-out perplexity over the whole held-out split "
                 f"{ref['heldout_perplexity']:.2f}. "
                 f"Built from scratch by this script in {build_wall:.0f} s (`orchestrator reference build {name}`; "
                 f"{ref['build_seconds']:.0f} s of it tokenizer, training and evaluation).")
        data = {"model": model, "reference": ref, "folder": str(folder),
                "build_command_wall_s": round(build_wall, 1), "runs": {r: brief(rep) for r, rep in reports.items()}}
        bench.write(args.results / "1-reference.md", "Section 1: the reference model, data-free methods",
                    table(header, rows), data, notes)


if __name__ == "__main__":
    main()
