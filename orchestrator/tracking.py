"""MLflow: one run per compression, with the flattened recipe, the metrics and the reports.

If the tracking server cannot be reached the compression still succeeds: a
warning says so, the run folder keeps everything (mlflow-pending.json), and
`orchestrator sync RUN_DIR` logs it later.
"""

from __future__ import annotations

import json
import logging
import math
import os
import urllib.request
from pathlib import Path

from orchestrator.errors import UserError
from orchestrator.recipe import Recipe, as_dict, flatten
from orchestrator.files import write_json_atomic

log = logging.getLogger(__name__)


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
    bits = report["size"]["bits_per_weight"]
    m["size.bits_per_weight"] = bits["model"]
    m["size.quantized_layers_bits_per_weight"] = bits["quantized_layers"]
    m.update(quality_speed_metrics(report["quality"], report.get("speed")))
    for phase, seconds in report["timing"]["phases"].items():
        m[f"timing.{phase}_s"] = seconds
    for key, value in report["cost"].items():
        m[f"cost.{key}"] = value
    for key, value in (report.get("store") or {}).items():
        m[f"store.{key}"] = value
    if moe := report.get("experts"):
        m["experts.matrices_compressed"] = moe["expert_matrices_compressed"]
        m["experts.under_calibrated"] = moe["under_calibrated"]
        for key, value in (moe["tokens_per_expert"] or {}).items():
            m[f"experts.tokens_{key}"] = value
    if recover := report.get("recover"):
        m["recover.perplexity_before"] = recover["perplexity_before"]
        m["recover.perplexity_after"] = recover["perplexity_after"]
        m["recover.seconds"] = recover["seconds"]
        m["recover.final_loss"] = recover["losses"][-1] if recover["losses"] else None
    return {k: float(v) for k, v in m.items() if v is not None and math.isfinite(float(v))}


def quality_speed_metrics(q: dict, speed: dict | None) -> dict:
    """Quality and speed metric names shared by runs and `orchestrator eval`."""
    m = {"quality.kl_nats_per_token": q.get("kl_nats")}
    for which in ("dense", "compressed"):
        if q.get(which) and "perplexity" in q[which]:
            m[f"quality.{which}.perplexity"] = q[which]["perplexity"]
            m[f"quality.{which}.nll_nats"] = q[which]["nll"]
    if router := q.get("router"):
        m["quality.router.topk_agreement"] = router["topk_agreement"]
        m["quality.router.same_experts"] = router["same_experts"]
    fid = (q.get("compressed") or {}).get("fidelity")
    if fid:
        m["quality.fidelity.cosine_mean"] = fid["cosine_mean"]
        m[f"quality.fidelity.top{fid['k']}_agreement"] = fid["topk_agreement"]
    for which, sp in (speed or {}).items():
        m[f"speed.{which}.resident_bytes"] = sp["resident_bytes"]
        for b, row in sp["batch"].items():
            m[f"speed.{which}.batch{b}.latency_median_s"] = row["latency_median_s"]
            m[f"speed.{which}.batch{b}.tokens_per_s"] = row["tokens_per_s"]
    return m


PENDING = "mlflow-pending.json"  # what could not be logged, kept beside the run for `orchestrator sync`
PROBE_TIMEOUT_S = 5


def run_bundle(recipe: Recipe, report: dict) -> dict:
    """Everything one MLflow run holds, as plain data: it can be logged now or replayed later."""
    cfg = recipe.config.tracking
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
    steps = []  # [name, value, step]: per-shard curves
    for shard in report["shards"]:
        errors = list(shard["error"].values())
        steps += [["shard.seconds", shard["seconds"], shard["index"]],
                  ["shard.capture_seconds", shard["capture_seconds"], shard["index"]],
                  ["shard.mean_relative_error", sum(errors) / max(1, len(errors)), shard["index"]]]
    for step, loss in enumerate((report.get("recover") or {}).get("losses", []), start=1):
        steps.append(["recover.loss", loss, step])
    return {"uri": cfg.uri, "experiment": cfg.experiment, "run_name": recipe.run_name, "tags": tags,
            "params": {k: str(v) for k, v in flatten(as_dict(recipe)).items()},
            "metrics": metrics_of(report), "steps": steps}


def reachable(uri: str) -> str | None:
    """None if an MLflow server answers at `uri` (http/https; other stores are tried directly), else why not."""
    if not uri.startswith(("http://", "https://")):
        return None
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=PROBE_TIMEOUT_S)
        return None
    except (OSError, ValueError) as e:
        return f"{type(e).__name__}: {getattr(e, 'reason', e)}"


def replay(bundle: dict, uri: str, report: dict, run_folder: Path) -> dict:
    """Log `bundle` as one MLflow run at `uri`, with the report (report.json, report.md, holding the run's
    id), the run folder's recipe and plots. -> the report's "mlflow" entry."""
    import mlflow

    from orchestrator.report import markdown, to_json

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # no INFO chatter about tables
    for var, value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2"), ("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")):
        os.environ.setdefault(var, value)  # a server that dies mid-run costs seconds, not many minutes
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(bundle["experiment"])
    with mlflow.start_run(run_name=bundle["run_name"], tags=bundle["tags"]) as run:
        info = {"run_id": run.info.run_id, "experiment": bundle["experiment"], "uri": uri}
        mlflow.log_params(bundle["params"])
        mlflow.log_metrics(bundle["metrics"])
        for name, value, step in bundle["steps"]:
            mlflow.log_metric(name, value, step=step)
        logged = report | {"mlflow": info}  # the report as the run folder will hold it
        mlflow.log_text(to_json(logged), "report.json")
        mlflow.log_text(markdown(logged), "report.md")
        mlflow.log_artifact(str(run_folder / "recipe.yaml"))
        if (run_folder / "plots").is_dir():
            mlflow.log_artifacts(str(run_folder / "plots"), artifact_path="plots")
    return info


def log_run(recipe: Recipe, report: dict, run_folder: Path) -> dict | None:
    """Log one MLflow run; -> the report's "mlflow" entry (None when tracking is off). If MLflow cannot
    be reached the compression still succeeds: a warning says so, and what would have been logged is
    kept in the run folder (mlflow-pending.json) for `orchestrator sync`."""
    cfg = recipe.config.tracking
    if not cfg.enabled:
        return None
    bundle = run_bundle(recipe, report)
    problem = reachable(cfg.uri)
    if problem is None:
        try:
            return replay(bundle, cfg.uri, report, run_folder)
        except Exception as e:  # tracking must never cost the user the compression
            problem = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    write_json_atomic(run_folder / PENDING, bundle)
    log.warning("MLflow at %s could not be reached (%s); the metrics and artifacts are kept in %s/%s: "
                "`orchestrator sync RUN_DIR` logs them once MLflow is back", cfg.uri, problem, run_folder.name,
                PENDING)
    return {"run_id": None, "pending": PENDING, "uri": cfg.uri}


def sync(run_dir: Path, uri: str | None) -> dict:
    """Replay a run's pending MLflow logging (`orchestrator sync`). -> report["mlflow"]."""
    from orchestrator import report as reports

    pending = run_dir / PENDING
    bundle = json.loads(pending.read_text())
    uri = uri or bundle["uri"]
    if (problem := reachable(uri)) is not None:
        raise UserError(f"--tracking-uri: MLflow at {uri} cannot be reached ({problem})")
    data = json.loads((run_dir / "report.json").read_text())
    data["mlflow"] = replay(bundle, uri, data, run_dir)
    reports.write(run_dir, data)
    pending.unlink()
    return data["mlflow"]


def eval_metrics(data: dict) -> dict[str, float]:
    """An eval report's metrics, under the same names as a run's where they mean the same."""
    size = data["size"]
    m = {"size.compressed_bytes": size["bytes"], "size.compression_ratio": size["compression_ratio"],
         "size.bits_per_weight": size["bits_per_weight"], "compression.mean_sparsity": size["sparsity"],
         **quality_speed_metrics(data["quality"], data.get("speed"))}
    return {k: float(v) for k, v in m.items() if v is not None and math.isfinite(float(v))}


def log_eval(data: dict, report_path: Path, uri: str, experiment: str) -> str | None:
    """One MLflow run (tag kind=eval) for `orchestrator eval`; -> its id, or None (with a warning) on failure."""
    try:
        import mlflow

        logging.getLogger("mlflow").setLevel(logging.WARNING)
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(experiment)
        tags = {"kind": "eval", "model": data["model_dir"], "baseline": data["baseline_dir"] or ""}
        with mlflow.start_run(run_name=f"eval-{Path(data['model_dir']).parent.name}", tags=tags) as run:
            mlflow.log_params({f"eval.{k}": str(v) for k, v in data["eval"].items()}
                              | {"model_dir": data["model_dir"], "baseline_dir": str(data["baseline_dir"])})
            mlflow.log_metrics(eval_metrics(data))
            for i, layer in enumerate(data["layers"]):
                mlflow.log_metric("layer.sparsity", layer["sparsity"], step=i)
                if "relative_error" in layer:
                    mlflow.log_metric("layer.relative_error", layer["relative_error"], step=i)
            mlflow.log_artifact(str(report_path))
            return run.info.run_id
    except Exception as e:
        log.warning("MLflow logging to %s failed (%s: %s); the report is in %s", uri, type(e).__name__, e, report_path)
        return None
