"""Size on disk of the exported checkpoint: dense, W8, W4, 2:4, 2:4 + W4 on the reference model.

    .venv/bin/python benchmarks/export_sizes.py --out benchmarks/results-export-sizes.md

Runs `orchestrator run` once per recipe (in this order, one at a time) and reads
each report.json: bytes of model/ on disk, compression ratio against the dense
folder, effective bits per weight (every stored byte counted: packed integers,
scales, zero points, shapes) for the quantized layers and for the whole model,
and the perplexity the run measured.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CASES = [  # (label, recipe)
    ("W8 per channel", "rtn-w8"),
    ("W4 g128", "rtn-w4g128"),
    ("W4 g128 (GPTQ)", "gptq-w4g128"),
    ("2:4", "magnitude-2of4"),
    ("2:4 + W4 g128 (SparseGPT joint)", "sparsegpt-2of4-w4g128"),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="reference:tiny-lm")
    p.add_argument("--work", default=str(REPO / "benchmarks" / ".work" / "export-sizes"))
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results-export-sizes.md"))
    args = p.parse_args()
    rows = []
    for label, recipe in CASES:
        cmd = [sys.executable, "-m", "orchestrator.cli", "run", str(REPO / "recipes" / f"{recipe}.yaml"),
               f"model.path={args.model}", f"output.dir={args.work}", f"output.name={recipe}",
               "tracking.enabled=false", "--overwrite", "--quiet"]
        print(f"[{recipe}] {' '.join(cmd[2:])}", file=sys.stderr)
        subprocess.run(cmd, check=True)
        report = json.loads((Path(args.work) / recipe / "report.json").read_text())
        rows.append((label, recipe, report))
    dense = rows[0][2]
    lines = [
        f"# Export sizes: {args.model} ({dense['model']['params'] / 1e6:.2f}M parameters)", "",
        "Command: `.venv/bin/python benchmarks/export_sizes.py`", "",
        "| model | recipe | format | bytes on disk | ratio vs dense | bits/weight, quantized layers "
        "| bits/weight, whole model | perplexity |",
        "|---|---|---|---|---|---|---|---|",
        f"| dense | - | safetensors float32 | {dense['size']['dense_bytes']:,} | 1.00 | 32 | 32 "
        f"| {dense['quality']['dense']['perplexity']:.3f} |",
    ]
    for label, recipe, r in rows:
        size, bits = r["size"], r["size"]["bits_per_weight"]
        q = bits["quantized_layers"]
        lines.append(f"| {label} | {recipe} | {size['format']} | {size['compressed_bytes']:,} | "
                     f"{size['compression_ratio']:.2f} | {q if q is not None else '-'} | {bits['model']} | "
                     f"{r['quality']['compressed']['perplexity']:.3f} |")
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
