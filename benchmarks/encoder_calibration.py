"""Section 14: an encoder calibrated as it is used: MiniLM on whole sentences against token windows.

    .venv/bin/python benchmarks/encoder_calibration.py [--smoke]

`reference:minilm`, GPTQ (our defaults: act-order, MSE grid) and RTN at 4 and 3 bits, groups of 128,
128 calibration samples: each GPTQ case once with `data.calibration.shape=windows` (128-token windows
cut from the concatenated text, no special tokens, as before) and once with `sentences` (whole lines
with the tokenizer's [CLS] / [SEP], padded, padding out of the Hessians: the default for encoders now).
Fidelity on 512 held-out sentences (mean-pooled, L2-normalised embeddings): mean cosine to the dense
model's and top-10 nearest-neighbour agreement, read from each run's report.json.
"""

from __future__ import annotations

import argparse

from common import Bench, add_args, brief, fmt, run_recipe, table

CASES = [  # (recipe, calibration shape or None for RTN)
    ("rtn-w4g128", None), ("gptq-w4g128", "windows"), ("gptq-w4g128", "sentences"),
    ("rtn-w3g128", None), ("gptq-w3g128", "windows"), ("gptq-w3g128", "sentences"),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sentences", type=int, default=512, help="held-out sentences scored (data.eval.sentences)")
    add_args(p, "14-encoder")
    args = p.parse_args()
    cases = CASES[:3] if args.smoke else CASES
    base = ["model.path=reference:minilm", "cluster.workers=2", f"data.eval.sentences={args.sentences}",
            "data.eval.speed=false", "data.calibration.num_samples=128", "data.calibration.seq_len=128"]
    if args.smoke:
        base += ["data.calibration.num_samples=16", "data.eval.sentences=64"]
    rows, runs = [], []
    with Bench() as bench:
        for recipe, shape in cases:
            name = recipe if shape is None else f"{recipe}-{shape}"
            report = run_recipe(recipe, base + ([f"data.calibration.shape={shape}"] if shape else []),
                                args.work.resolve(), name)
            fidelity = report["quality"]["compressed"]["fidelity"]
            calibration = report.get("calibration") or {}
            rows.append([recipe, shape or "none (RTN)", calibration.get("tokens", calibration.get("num_samples", 0)
                                                                        * calibration.get("seq_len", 0)) or "n/a",
                         fmt(fidelity["cosine_mean"], 4), fmt(fidelity["topk_agreement"], 3),
                         fmt(report["timing"]["phases"].get("compress"), 1)])
            runs.append({"name": name, "recipe": recipe, "shape": shape, "report": brief(report)})
            print(f"[{name}] cosine {fidelity['cosine_mean']:.4f}, top-10 {fidelity['topk_agreement']:.3f}", flush=True)
        header = ["recipe", "calibration", "calibration tokens", "cosine to dense (mean)", "top-10 agreement",
                  "compress s"]
        notes = ("`reference:minilm`, groups of 128, 128 calibration samples, 2 workers; fidelity on "
                 f"{args.sentences} held-out sentences of the reference corpus.")
        bench.write(args.results / "14-minilm-calibration.md", "Section 14: MiniLM calibrated on sentences",
                    table(header, rows), {"runs": runs}, notes)


if __name__ == "__main__":
    main()
