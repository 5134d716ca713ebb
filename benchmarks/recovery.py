"""Section 9: recovery by distillation (the recover stage), and the ZeRO stages and CPU offload checked.

    .venv/bin/python benchmarks/recovery.py [--smoke] [--zero-stages 1,2,3] [--no-offload]

1. `orchestrator run recipes/sparsegpt-2of4-w4g128-recover.yaml` (tiny-lm,
   SparseGPT 2:4 + W4 g128, then 200 steps of distillation, ZeRO-2, 2 Ray Train
   workers): perplexity dense / before / after recovery, the share of the gap
   closed, training loss (KL) means of the first and last 10 steps, KL of the
   final export against the dense model, wall times: results/9-recovery.md/.json.
2. The same recipe on micro-lm, 4 steps at lr 1e-2 (mechanics, not quality),
   with ZeRO stage 1, 2 and 3 (per-step losses side by side; they should agree),
   and once with recover.offload=true (ZeRO-2, optimizer on the CPU, DeepSpeedCPUAdam
   compiled on first use): results/9-zero-stages.md/.json.
"""

from __future__ import annotations

import argparse

from common import SMOKE_MODEL, Bench, add_args, brief, fmt, run_recipe, table

RECIPE = "sparsegpt-2of4-w4g128-recover"
# micro-lm, a few steps (tests/test_recover.py's settings)
SHORT = ["data.calibration.num_samples=16", "data.calibration.seq_len=64", "recover.steps=4", "recover.lr=0.01",
         "recover.num_samples=16", "recover.seq_len=64", "recover.batch_size=2", "recover.checkpoint_every=2",
         "data.eval.seq_len=64", "data.eval.max_windows=4", "data.eval.speed=false"]


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--zero-stages", default="1,2,3", help="part 2's ZeRO stages (default: %(default)s)")
    p.add_argument("--no-offload", action="store_true", help="skip part 2's offload run")
    add_args(p, "9-recovery")
    args = p.parse_args()
    work = args.work.resolve()
    micro = [f"model.path={SMOKE_MODEL}", *SHORT]
    with Bench() as bench:
        # 1. the recipe as shipped (smoke: micro-lm, 4 steps)
        r = run_recipe(RECIPE, micro if args.smoke else [], work, RECIPE)
        rec, q = r["recover"], r["quality"]
        dense, before, after = q["dense"]["perplexity"], rec["perplexity_before"], q["compressed"]["perplexity"]
        losses = rec["losses"]
        n = min(10, len(losses))
        settings = rec["settings"]
        rows = [["dense", fmt(dense, 3)], ["compressed, before recovery", fmt(before, 3)],
                ["after recovery", f"**{fmt(after, 3)}**"]]
        notes = (f"`{r['model']['path']}`, {r['calibration']['num_samples']} x {r['calibration']['seq_len']} "
                 f"calibration windows, {r['calibration']['mode']}; recover: {settings['steps']} steps, lr "
                 f"{settings['lr']}, batch {settings['batch_size']} x {settings['seq_len']} tokens per worker, "
                 f"{settings['workers']} Ray Train workers, ZeRO stage {settings['zero_stage']}, offload "
                 f"{settings['offload']}, {settings['num_samples']} training windows.")
        closed = (before - after) / (before - dense) if before != dense else None
        summary = (f"Recovery closed {fmt(closed and 100 * closed, 0)}% of the gap to the dense model "
                   f"({before - dense:+.2f} -> {after - dense:+.2f}). Training KL: {mean(losses[:n]):.3f} (mean of "
                   f"the first {n} steps) -> {mean(losses[-n:]):.3f} (last {n}); KL of the final export against the "
                   f"dense model on the held-out windows: {fmt(q.get('kl_nats'), 3)} nats/token. Wall time of the "
                   f"recover stage: {fmt(r['timing']['phases'].get('recover'), 0)} s (the training itself "
                   f"{fmt(rec['seconds'], 0)} s; the whole run {fmt(r['timing']['total_s'], 0)} s). Export: "
                   f"{r['size']['compressed_bytes'] / 1e6:.1f} MB, {r['size']['compression_ratio']:.2f}x.")
        header = ["", f"held-out perplexity ({q['dense']['windows']} windows, {q['dense']['tokens']} tokens)"]
        bench.write(args.results / "9-recovery.md", "Section 9: recovery by distillation",
                    table(header, rows) + "\n\n" + summary,
                    {"report": brief(r), "dense_ppl": dense, "ppl_before": before, "ppl_after": after,
                     "gap_closed": closed, "loss_first_mean": mean(losses[:n]),
                     "loss_last_mean": mean(losses[-n:]), "kl_nats": q.get("kl_nats")}, notes)

        # 2. ZeRO stages and offload on micro-lm: the mechanics
        cases = [(f"ZeRO {s}", [f"recover.zero_stage={s}"]) for s in args.zero_stages.split(",") if s]
        if not args.no_offload:
            cases.append(("ZeRO 2 + CPU offload", ["recover.zero_stage=2", "recover.offload=true", "recover.steps=3"]))
        rows, runs = [], []
        for label, extra in cases:
            rr = run_recipe(RECIPE, micro + extra, work, "micro-" + label.lower().replace(" ", "-").replace("+", ""))
            runs.append(brief(rr))
            rows.append([label, ", ".join(f"{x:.6f}" for x in rr["recover"]["losses"]),
                         fmt(rr["timing"]["phases"].get("recover"), 1),
                         fmt(rr["quality"]["compressed"]["perplexity"], 3)])
        bench.write(args.results / "9-zero-stages.md", "Section 9: ZeRO stages and CPU offload (micro-lm)",
                    table(["run", "per-step training loss", "recover stage s", "perplexity after"], rows),
                    {"runs": runs}, f"`{SMOKE_MODEL}`, {' '.join(SHORT)}: a learning rate far too high for "
                    "quality; this checks that the stages agree and that offload runs.")


if __name__ == "__main__":
    main()
