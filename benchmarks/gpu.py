"""Section 7: GPU workers against CPU workers, GPTQ W4 g128 on the 116M timing model. Needs CUDA.

    .venv/bin/python benchmarks/gpu.py [--smoke]

Without a CUDA device (torch.cuda.is_available() false) it measures nothing and
writes results/7-gpu.md/.json saying so. With one, it runs `orchestrator run
recipes/gptq-w4g128.yaml` on the random 116M Llama (32 x 128 calibration
windows, 2 workers, evaluation on) with cluster.gpus_per_worker=auto (the GPU,
shared by the workers when there are fewer GPUs) and with 0 (CPU), and
tabulates the compression time, the whole run and the perplexity of each.
"""

from __future__ import annotations

import argparse

from common import SMOKE_MODEL, SMOKE_OVERRIDES, Bench, add_args, brief, fmt, parse_shape, random_llama, \
    resolve_model, run_recipe, table

SHAPE = "768,12,3072,12"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_args(p, "7-gpu")
    args = p.parse_args()
    import torch

    with Bench() as bench:
        title = "Section 7: GPU workers"
        if not torch.cuda.is_available():
            bench.write(args.results / "7-gpu.md", title,
                        "**Not measured:** no CUDA device on this machine (torch.cuda.is_available() is False, "
                        f"torch {torch.__version__}).", {"measured": False, "torch": torch.__version__})
            print("section 7: not measured (no CUDA device)")
            return
        work = args.work.resolve()
        if args.smoke:
            model, extra = resolve_model(SMOKE_MODEL), SMOKE_OVERRIDES
        else:
            model, _ = random_llama(work / "models", resolve_model("reference:tiny-lm"), **parse_shape(SHAPE))
            extra = ["data.calibration.num_samples=32"]
        rows, runs = [], []
        for label, gpus in (("GPU", "auto"), ("CPU", "0")):
            r = run_recipe("gptq-w4g128", [f"model.path={model}", "cluster.workers=2",
                                           f"cluster.gpus_per_worker={gpus}", *extra], work, f"gptq-{label.lower()}")
            runs.append(brief(r))
            rows.append([label, r["cluster"]["gpus_per_worker"], fmt(r["timing"]["phases"]["compress"], 1),
                         fmt(r["timing"]["total_s"], 1), fmt(r["quality"]["compressed"]["perplexity"], 3)])
        bench.write(args.results / "7-gpu.md", title,
                    table(["workers on", "GPUs per worker", "compress s", "total s", "perplexity"], rows),
                    {"measured": True, "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
                     "runs": runs}, f"`{model}`, GPTQ W4 g128, 2 workers.")


if __name__ == "__main__":
    main()
