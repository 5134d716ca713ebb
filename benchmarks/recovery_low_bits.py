"""Section 15: what the recover stage closes after GPTQ at 3 and 2 bits on a real pretrained model.

    .venv/bin/python benchmarks/recovery_low_bits.py [--smoke] [--bits 3,2] [--steps 100] [--train scales] [--lr 1e-4]

SmolLM2-135M (reference:smollm2), GPTQ g64 at its defaults (act-order, MSE grid, parallel calibration;
64 x 256 calibration windows, seed 0), then the recover stage: distillation against the dense model
(KL on next-token distributions, ZeRO-2, 2 Ray Train workers), training either the latent weights on
their fixed grid (`--train weights`, the default) or the scales with the integers fixed (`--train scales`). Each bit width is one `orchestrator run` whose
report.json holds the perplexity before recovery and after (64 x 256 held-out tokens, the windows of
sections 11-13). results/15-recovery-smollm2.md/.json.
"""

from __future__ import annotations

import argparse
import json
import sys

from common import SMOKE_MODEL, SMOKE_OVERRIDES, Bench, add_args, brief, fmt, run_recipe, table

MODEL = "reference:smollm2"
DATA = ["data.calibration.num_samples=64", "data.calibration.seq_len=256", "data.eval.seq_len=256",
        "data.eval.max_windows=64", "data.eval.speed=false"]


def recover_settings(steps: int, train: str, lr: float) -> list[str]:
    """Short windows and small batches: a step of a 135M model and its teacher on one CPU core each."""
    return ["recover.enabled=true", f"recover.train={train}", f"recover.steps={steps}", f"recover.lr={lr}",
            "recover.batch_size=2", "recover.seq_len=128", "recover.num_samples=256", "recover.zero_stage=2",
            "recover.workers=2", f"recover.checkpoint_every={max(1, steps // 4)}"]


def row(bits: int, group: int, r: dict) -> list:
    rec, q = r["recover"], r["quality"]
    dense, before, after = q["dense"]["perplexity"], rec["perplexity_before"], q["compressed"]["perplexity"]
    closed = (before - after) / (before - dense) if before != dense else None
    losses = rec["losses"]
    n = min(10, len(losses))
    return [f"GPTQ W{bits} g{group}", fmt(dense, 3), f"{fmt(before, 3)} ({before - dense:+.3f})",
            f"**{fmt(after, 3)}** ({after - dense:+.3f})", fmt(closed and 100 * closed, 0) + "%",
            f"{sum(losses[:n]) / n:.3f} -> {sum(losses[-n:]) / n:.3f}", fmt(q.get("kl_nats"), 3),
            fmt(r["timing"]["phases"].get("compress"), 0), fmt(rec["seconds"], 0)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bits", default="3,2", help="GPTQ bit widths (recipes gptq-w{b}g128 with groups of 64)")
    p.add_argument("--steps", type=int, default=100, help="recover steps (default: %(default)s)")
    p.add_argument("--train", default="weights", choices=["weights", "scales"],
                   help="what recovery trains (recover.train; default: %(default)s)")
    p.add_argument("--lr", type=float, default=1e-4, help="recover.lr (default: %(default)s)")
    p.add_argument("--table", default="15-recovery-smollm2", help="name of the table in --results")
    p.add_argument("--reuse", action="store_true",
                   help="take a case's finished run folder (its report.json) instead of running it again")
    add_args(p, "15-recovery-smollm2")
    args = p.parse_args()
    work = args.work.resolve()
    model, data, steps = (SMOKE_MODEL, SMOKE_OVERRIDES, 4) if args.smoke else (MODEL, DATA, args.steps)
    group = 32 if args.smoke else 64
    rows, runs = [], []
    with Bench() as bench:
        for bits in map(int, args.bits.split(",")):
            name = f"gptq-w{bits}g{group}-recover-{args.train}-lr{args.lr:g}"
            overrides = [f"model.path={model}", f"stages.0.group_size={group}", *data,
                         *recover_settings(steps, args.train, args.lr)]
            report = work / name / "report.json"
            if args.reuse and report.is_file():
                print(f"[{name}] reusing {report}", file=sys.stderr)
                r = json.loads(report.read_text())
            else:
                r = run_recipe(f"gptq-w{bits}g128", overrides, work, name)
            rows.append(row(bits, group, r))
            runs.append(brief(r))
        s = runs[0]["recover"]["settings"]
        header = ["case", "dense ppl", "before recovery (increase)", "after recovery (increase)", "gap closed",
                  "training KL, first -> last 10 steps", "KL after, nats/token", "compress s", "recover s"]
        bench.write(args.results / f"{args.table}.md",
                    "Section 15: recovery after GPTQ at 3 and 2 bits (SmolLM2-135M)", table(header, rows),
                    {"runs": runs},
                    f"`{model}`, GPTQ groups of {group} at its defaults, {runs[0]['calibration']['num_samples']} x "
                    f"{runs[0]['calibration']['seq_len']} calibration windows (seed 0); recover: training the {s['train']}, "
                    f"{s['steps']} steps, "
                    f"lr {s['lr']}, batch {s['batch_size']} x {s['seq_len']} tokens per worker, {s['workers']} Ray "
                    f"Train workers, ZeRO stage {s['zero_stage']}, {s['num_samples']} training windows; perplexity "
                    f"on the held-out windows of the run's evaluation, before and after.")


if __name__ == "__main__":
    main()
