"""MLflow: one run per compression, with the flattened recipe, the metrics and the reports.

If the tracking server cannot be reached the compression still succeeds: a
warning says so and the run folder keeps everything.
"""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path

from orchestrator.recipe import Recipe, as_dict, flatten


def metrics_of(report: dict) -> dict[str, float]:
    """Flat, unit-suffixed metric names, stable across runs for MLflow's compare view."""
    m = {
        "size.dense_bytes": report["size"]["dense_bytes"],
        "size.compressed_bytes": report["size"]["compressed_bytes"],
        "size.compression_ratio": report["size"]["compression_ratio"],
        "compression.mean_relative_error": report["compression"]["mean_relative_error"],
        "compression.mean_sparsity": report["compression"]["mean_sparsity"],
        "model.params": report["model"]["params"],
    }
    for which in ("dense", "compressed"):
        q = report["quality"].get(which)
        if q:
            m[f"quality.{which}.perplexity"] = q["perplexity"]
            m[f"quality.{which}.nll_nats"] = q["nll"]
    for phase, seconds in report["timing"]["phases"].items():
        m[f"timing.{phase}_s"] = seconds
    return {k: float(v) for k, v in m.items() if v is not None and math.isfinite(float(v))}


def log_run(recipe: Recipe, report: dict, run_folder: Path, write_report) -> dict | None:
    """Log one MLflow run; `write_report(report)` is called once the run id is known."""
    cfg = recipe.config.tracking
    if not cfg.enabled:
        write_report(report)
        return None
    try:
        import mlflow

        logging.getLogger("mlflow").setLevel(logging.WARNING)  # no INFO chatter about tables
        mlflow.set_tracking_uri(cfg.uri)
        mlflow.set_experiment(cfg.experiment)
        tags = {
            "model": report["model"]["path"],
            "architecture": report["model"]["architecture"],
            "methods": "+".join(s.technique.name for s in recipe.stages),
            "recipe_hash": recipe.hash,
        }
        if report.get("calibration"):
            tags["calibration_sha256"] = report["calibration"]["sha256"]
            tags["calibration_mode"] = report["calibration"]["mode"]
        for s in recipe.stages:
            for key in ("bits", "group_size", "sparsity", "pattern"):
                if hasattr(s.params, key):
                    tags[key] = str(getattr(s.params, key))
        with mlflow.start_run(run_name=recipe.run_name, tags=tags) as run:
            info = {"run_id": run.info.run_id, "experiment": cfg.experiment, "uri": cfg.uri}
            report["mlflow"] = info
            params = {k: str(v) for k, v in flatten(as_dict(recipe)).items()}
            mlflow.log_params(params)
            mlflow.log_metrics(metrics_of(report))
            for shard in report["shards"]:
                errors = list(shard["error"].values())
                mlflow.log_metric("shard.seconds", shard["seconds"], step=shard["index"])
                mlflow.log_metric("shard.mean_relative_error", sum(errors) / max(1, len(errors)), step=shard["index"])
            write_report(report)
            for name in ("recipe.yaml", "report.json", "report.md"):
                mlflow.log_artifact(str(run_folder / name))
            return info
    except Exception as e:  # tracking must never cost the user the compression
        warnings.warn(f"MLflow logging to {cfg.uri} failed ({type(e).__name__}: {e}); "
                      f"everything is kept in {run_folder.name}/")
        report["mlflow"] = None
        write_report(report)
        return None
