"""Section 5: measuring effectiveness with `orchestrator compare`: the reference model, and the MiniLM encoder.

    .venv/bin/python benchmarks/effectiveness.py [--smoke]

1. `orchestrator run` of rtn-w4g128, gptq-w4g128, wanda-2of4 and
   sparsegpt-2of4-w4g128 on the reference model, then `orchestrator compare` of
   the four run folders: results/5-compare.md/.json (the table compare prints:
   size, ratio, bits per weight, sparsity, perplexity, KL, times) and
   results/5-compare-pareto.png.
2. The same for the pretrained MiniLM encoder (model.path=reference:minilm) with
   rtn-w8, rtn-w4g128 and gptq-w4g128 (embedding cosine and top-10 agreement on
   held-out sentences): results/5-minilm.md/.json and results/5-minilm-pareto.png.
"""

from __future__ import annotations

import argparse
import shutil

from common import SMOKE_MODEL, SMOKE_OVERRIDES, Bench, add_args, brief, run_cli, run_recipe

CAUSAL = ["rtn-w4g128", "gptq-w4g128", "wanda-2of4", "sparsegpt-2of4-w4g128"]
ENCODER = ["rtn-w8", "rtn-w4g128", "gptq-w4g128"]


def compare_runs(bench: Bench, args, name: str, title: str, model: str, recipes: list[str],
                 overrides: list[str], notes: str) -> None:
    work = args.work.resolve() / name
    reports = [run_recipe(r, [f"model.path={model}", "cluster.workers=2", *overrides], work, r) for r in recipes]
    out = work / "compare"
    log = work / "logs" / "compare.log"
    run_cli(["compare", *(work / r for r in recipes), "--out", out], log)
    args.results.mkdir(parents=True, exist_ok=True)
    if (out / "pareto.png").exists():
        shutil.copy(out / "pareto.png", args.results / f"{name}-pareto.png")
    command = "orchestrator compare " + " ".join(f"{r}" for r in recipes)
    bench.write(args.results / f"{name}.md", title, (out / "compare.md").read_text(),
                {"model": model, "compare_command": command, "compare_table": (out / "compare.md").read_text(),
                 "runs": [brief(r) for r in reports]}, notes)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_args(p, "5-effectiveness")
    args = p.parse_args()
    smoke = SMOKE_OVERRIDES if args.smoke else []
    with Bench() as bench:
        model = SMOKE_MODEL if args.smoke else "reference:tiny-lm"
        compare_runs(bench, args, "5-compare", "Section 5: orchestrator compare on the reference model", model,
                     CAUSAL[:2] if args.smoke else CAUSAL, smoke,
                     f"`{model}`, 2 workers, each recipe run once with its defaults, then `orchestrator compare` "
                     "of the run folders (the table is compare's own output).")
        compare_runs(bench, args, "5-minilm", "Section 5: the MiniLM encoder, embedding fidelity",
                     "reference:minilm", ENCODER[:1] if args.smoke else ENCODER, smoke,
                     "`reference:minilm` (sentence-transformers/all-MiniLM-L6-v2, 22.7M parameters), 2 workers; "
                     "fidelity on held-out sentences of the reference corpus (mean-pooled, L2-normalised "
                     "embeddings; top-10 nearest neighbours by cosine).")


if __name__ == "__main__":
    main()
