"""PNG plots (matplotlib, no display): per run, and the size-versus-quality Pareto plot of `compare`."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PLOT_FILES = ("layer_error.png", "layer_sparsity.png", "shard_time.png")


def _layers(report: dict) -> list[dict]:
    return [layer for shard in report["shards"] for layer in shard["layers"]]


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})  # no version stamp: same report, same bytes
    plt.close(fig)


def _short(name: str) -> str:
    """model.layers.3.self_attn.q_proj -> 3.q_proj; model.layers.3.mlp.experts.7.gate_proj -> 3.e7.gate_proj"""
    parts = name.split(".")
    numbers = [p for p in parts if p.isdigit()]
    expert = f"e{numbers[1]}." if len(numbers) > 1 and "experts" in parts else ""
    return f"{numbers[0] if numbers else ''}.{expert}{parts[-1]}"


def run_plots(report: dict, folder: Path) -> list[Path]:
    """Per-layer relative error (with SQNR), per-layer sparsity and time per shard -> PNGs in folder."""
    folder.mkdir(parents=True, exist_ok=True)
    layers = _layers(report)
    names = [_short(layer["name"]) for layer in layers]
    x = range(len(layers))
    width = max(6.0, 0.22 * len(layers))

    fig, ax = plt.subplots(figsize=(width, 3.6))
    ax.bar(x, [layer["relative_error"] for layer in layers], color="tab:red")
    ax.set_ylabel("relative error ||W_hat - W|| / ||W||")
    ax.set_title(f"{report['run']['name']}: per-layer error")
    sqnr = ax.twinx()
    sqnr.plot(x, [min(layer["sqnr_db"], 99.0) for layer in layers], "k.", markersize=4)
    sqnr.set_ylabel("SQNR (dB, dots)")
    ax.set_xticks(list(x), names, rotation=90, fontsize=6)
    _save(fig, folder / "layer_error.png")

    fig, ax = plt.subplots(figsize=(width, 3.6))
    ax.bar(x, [layer["sparsity"] for layer in layers], color="tab:blue")
    ax.set_ylim(0, 1)
    ax.set_ylabel("fraction of zero weights")
    ax.set_title(f"{report['run']['name']}: per-layer sparsity")
    ax.set_xticks(list(x), names, rotation=90, fontsize=6)
    _save(fig, folder / "layer_sparsity.png")

    shards = report["shards"]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.5 * len(shards)), 3.4))
    idx = [s["index"] for s in shards]
    capture = [s.get("capture_seconds", 0.0) for s in shards]
    ax.bar(idx, capture, color="tab:gray", label="capture (calibration)")
    ax.bar(idx, [s["seconds"] for s in shards], bottom=capture, color="tab:green", label="compress")
    ax.set_xlabel("shard")
    ax.set_ylabel("seconds on its worker")
    ax.set_title(f"{report['run']['name']}: time per shard")
    ax.legend(fontsize=7)
    _save(fig, folder / "shard_time.png")
    return [folder / name for name in PLOT_FILES] + expert_token_plots(report, folder)


def expert_token_plots(report: dict, folder: Path) -> list[Path]:
    """MoE runs with calibration: per experts module, the calibration tokens the router sent to each expert,
    the under-calibrated ones in orange, with the threshold -> expert_tokens-<module>.png each."""
    moe = report.get("experts") or {}
    paths = []
    for module, routing in (moe.get("routing") or {}).items():
        tokens, low = routing["tokens"], set(routing["under_calibrated"])
        fig, ax = plt.subplots(figsize=(max(5.0, 0.18 * len(tokens)), 3.2))
        ax.bar(range(len(tokens)), tokens, color=["tab:orange" if e in low else "tab:blue" for e in range(len(tokens))])
        ax.axhline(routing["min_tokens"], color="k", linewidth=0.8, linestyle="--")
        ax.set_xlabel("expert")
        ax.set_ylabel("calibration tokens routed")
        ax.set_title(f"{module}: {len(low)} of {len(tokens)} experts under {routing['min_tokens']} tokens "
                     f"({moe['under_calibrated_policy']})", fontsize=8)
        path = folder / f"expert_tokens-{module}.png"
        _save(fig, path)
        paths.append(path)
    return paths


def pareto_plot(points: list[dict], dense: dict, quality_label: str, lower_is_better: bool, path: Path) -> Path:
    """points: {"label", "bits", "quality"} per run; dense: the same for the dense model -> PNG.

    x: effective bits per weight of the whole model (every stored byte counted);
    y: the quality measure. The Pareto front (no run both smaller and better) is drawn as a line.
    """
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ax.scatter([dense["bits"]], [dense["quality"]], marker="*", s=180, color="black", label="dense", zorder=3)
    for p in points:
        ax.scatter([p["bits"]], [p["quality"]], s=40, zorder=3)
        ax.annotate(p["label"], (p["bits"], p["quality"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    better = (lambda a, b: a < b) if lower_is_better else (lambda a, b: a > b)
    front, best = [], None
    sign = 1 if lower_is_better else -1  # at equal size, the better point first: it dominates the others
    for p in sorted([*points, dense], key=lambda p: (p["bits"], sign * p["quality"])):
        if best is None or better(p["quality"], best):
            front.append(p)
            best = p["quality"]
    ax.plot([p["bits"] for p in front], [p["quality"] for p in front], "--", color="gray", label="Pareto front")
    ax.set_xlabel("bits per weight (whole model, on disk)")
    values = [p["quality"] for p in [*points, dense]]
    if min(values) > 0 and max(values) / min(values) > 20:  # a collapsed run would flatten all the others
        ax.set_yscale("log")
    ax.set_ylabel(quality_label + (" (log scale)" if ax.get_yscale() == "log" else ""))
    ax.set_title("size versus quality")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)
    return path
