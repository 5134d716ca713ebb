"""Section 4: size on disk of the exported checkpoint: dense, W8, W4, 2:4, 2:4 + W4 on the reference model.

    .venv/bin/python benchmarks/export_sizes.py [--only RECIPE ...] [--smoke]

Runs `orchestrator run` once per recipe (in this order, one at a time) and reads
each report.json: bytes of model/ on disk, compression ratio against the dense
folder, effective bits per weight (every stored byte counted: packed integers,
scales, zero points, shapes) for the quantized layers and for the whole model,
and the perplexity the run measured. Writes results/4-export-sizes.md and its .json.
"""

from __future__ import annotations


from common import SMOKE_MODEL, SMOKE_OVERRIDES, Bench, recipes_parser, brief, run_recipe, table

CASES = [  # (label, recipe)
    ("W8 per channel", "rtn-w8"),
    ("W4 g128", "rtn-w4g128"),
    ("W4 g128 (GPTQ)", "gptq-w4g128"),
    ("2:4", "magnitude-2of4"),
    ("2:4 + W4 g128 (SparseGPT joint)", "sparsegpt-2of4-w4g128"),
]


def main() -> None:
    args = recipes_parser(__doc__, "4-export-sizes").parse_args()
    model = SMOKE_MODEL if args.smoke else args.model
    base = [f"model.path={model}", *(SMOKE_OVERRIDES if args.smoke else [])]
    with Bench() as bench:
        reports = [(label, recipe, run_recipe(recipe, base, args.work.resolve(), recipe))
                   for label, recipe in CASES if not args.only or recipe in args.only]
        dense = reports[0][2]
        rows = [["dense", "-", "safetensors float32", f"{dense['size']['dense_bytes']:,}", "1.00", "32", "32",
                 f"{dense['quality']['dense']['perplexity']:.3f}"]]
        for label, recipe, r in reports:
            size, bits = r["size"], r["size"]["bits_per_weight"]
            q = bits["quantized_layers"]
            rows.append([label, recipe, size["format"], f"{size['compressed_bytes']:,}",
                         f"{size['compression_ratio']:.2f}", "-" if q is None else q, bits["model"],
                         f"{r['quality']['compressed']['perplexity']:.3f}"])
        header = ["model", "recipe", "format", "bytes on disk", "ratio vs dense", "bits/weight, quantized layers",
                  "bits/weight, whole model", "perplexity"]
        notes = f"`{model}` ({dense['model']['params'] / 1e6:.2f}M parameters), each recipe run once."
        bench.write(args.results / "4-export-sizes.md", "Section 4: size on disk of the export", table(header, rows),
                    {"model": model, "runs": [brief(r) for _, _, r in reports]}, notes)


if __name__ == "__main__":
    main()
