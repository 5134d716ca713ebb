"""`orchestrator compare`: several runs side by side, and where each sits between size and quality."""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

from orchestrator.errors import UserError
from orchestrator.plots import pareto_plot
from orchestrator.report import human_bytes


def load_report(run: str, tracking_uri: str) -> dict:
    """A run folder (its report.json) or an MLflow run id (its report.json artifact)."""
    folder = Path(run).expanduser()
    if folder.is_dir():
        path = folder / "report.json"
        if not path.is_file():
            raise UserError(f"RUN: {folder} has no report.json (not a finished run folder)")
        return json.loads(path.read_text())
    if not re.fullmatch(r"[0-9a-f]{32}", run):  # MLflow run ids: 32 hex digits; ask no store about others
        raise UserError(f"RUN: {run} is neither a run folder nor an MLflow run id")
    try:
        import mlflow

        path = mlflow.artifacts.download_artifacts(run_id=run, artifact_path="report.json",
                                                   dst_path=tempfile.mkdtemp(), tracking_uri=tracking_uri)
    except Exception as e:
        raise UserError(f"RUN: {run} is neither a run folder nor an MLflow run id in {tracking_uri} "
                        f"({type(e).__name__})") from None
    return json.loads(Path(path).read_text())


def quality_of(report: dict, which: str) -> float | None:
    """Perplexity (causal LMs) or mean embedding cosine (encoders) of the dense or compressed model."""
    q = (report.get("quality") or {}).get(which) or {}
    if "perplexity" in q:
        return q["perplexity"]
    return (q.get("fidelity") or {}).get("cosine_mean")


def method_label(report: dict) -> str:
    """What was done, from the per-layer records: methods, bits, group size."""
    layers = [layer for s in report["shards"] for layer in s["layers"]]
    methods = sorted({"+".join(layer["methods"]) for layer in layers})
    bits = sorted({layer["bits"] for layer in layers if layer["bits"]})
    return ", ".join(methods) + (f" W{'/'.join(map(str, bits))}" if bits else "")


def compare(runs: list[str], tracking_uri: str, out: Path) -> str:
    """-> the markdown table (also written to out/compare.md); out/pareto.png is the plot."""
    reports = [load_report(run, tracking_uri) for run in runs]
    encoder = quality_of(reports[0], "compressed") is not None and "perplexity" not in reports[0]["quality"]["compressed"]
    label = "embedding cosine (mean)" if encoder else "perplexity"
    first = reports[0]
    dense_bits = first["model"].get("dense_bits", 32)
    header = ["run", "what", "size on disk", "ratio", "bits/weight", "sparsity", label,
              "top-k agreement" if encoder else "KL nats/token", "compress s", "total s"]
    rows = [["dense", first["model"]["path"], human_bytes(first["size"]["dense_bytes"]), "1.00", str(dense_bits),
             "0", _fmt(quality_of(first, "dense")), "1" if encoder else "0", "-", "-"]]
    points = []
    for r in reports:
        q = r["quality"]
        extra = (q.get("compressed") or {}).get("fidelity", {}).get("topk_agreement") if encoder else q.get("kl_nats")
        bits = r["size"]["bits_per_weight"]["model"]
        rows.append([r["run"]["name"], method_label(r), human_bytes(r["size"]["compressed_bytes"]),
                     f"{r['size']['compression_ratio']:.2f}", f"{bits:.2f}",
                     f"{r['compression']['mean_sparsity']:.3f}", _fmt(quality_of(r, "compressed")), _fmt(extra),
                     f"{r['timing']['phases'].get('compress', 0):.1f}", f"{r['timing']['total_s']:.1f}"])
        if quality_of(r, "compressed") is not None:
            points.append({"label": r["run"]["name"], "bits": bits, "quality": quality_of(r, "compressed")})
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    table = "\n".join(lines)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.md").write_text(table + "\n")
    if points and quality_of(first, "dense") is not None:
        dense = {"label": "dense", "bits": dense_bits, "quality": quality_of(first, "dense")}
        pareto_plot(points, dense, label, lower_is_better=not encoder, path=out / "pareto.png")
    return table


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)
