"""Run a set of recipes on the reference model and tabulate quality and time (markdown).

    .venv/bin/python benchmarks/quality_matrix.py [--out benchmarks/quality.md] [--model reference:tiny-lm]

Each case is `orchestrator run recipes/<recipe>.yaml [overrides]` in its own
process, as a user would run it; the numbers are read back from report.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

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


def run_case(recipe: str, overrides: list[str], model: str, out_dir: Path) -> dict:
    cmd = [sys.executable, "-m", "orchestrator.cli", "run", str(REPO / "recipes" / f"{recipe}.yaml"),
           f"model.path={model}", f"output.dir={out_dir}", "tracking.enabled=false", "--quiet", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{recipe} {overrides} failed:\n{proc.stderr[-3000:]}")
    run_dir = next(line.split(": ", 1)[1] for line in proc.stdout.splitlines() if line.startswith("run folder: "))
    return json.loads((Path(run_dir) / "report.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="reference:tiny-lm")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--only", nargs="*", help="recipe names to run (default: all cases)")
    args = parser.parse_args()
    rows = ["| recipe | calibration | dense ppl | compressed ppl | ppl increase | mean layer rel. error | "
            "sparsity | compress s | total s |", "|---|---|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for recipe, overrides in CASES:
            if args.only and recipe not in args.only:
                continue
            r = run_case(recipe, overrides, args.model, Path(tmp))
            dense, comp = r["quality"]["dense"]["perplexity"], r["quality"]["compressed"]["perplexity"]
            mode = r["calibration"]["mode"] if r.get("calibration") else "none"
            rows.append(f"| {recipe} | {mode} | {dense:.3f} | {comp:.3f} | {comp - dense:+.3f} | "
                        f"{r['compression']['mean_relative_error']:.4f} | {r['compression']['mean_sparsity']:.3f} | "
                        f"{r['timing']['phases']['compress']:.1f} | {r['timing']['total_s']:.1f} |")
            print(rows[-1], flush=True)
    table = "\n".join(rows) + "\n"
    if args.out:
        args.out.write_text(table)
    print(table)


if __name__ == "__main__":
    main()
