"""tracking.py on its own (no Ray): what one run logs to a real MLflow store, and a run kept for later
when MLflow cannot be reached, then synced."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from mlflow.tracking import MlflowClient

from orchestrator import report as reports
from orchestrator import tracking
from orchestrator.recipe import build_recipe
from tests.helpers import free_port

REPORT = {
    "run": {"name": "r", "recipe_hash": "0" * 64},
    "model": {"path": "m", "architecture": "LlamaForCausalLM", "params": 1000, "blocks": 1, "dense_bits": 32},
    "size": {"dense_bytes": 4000, "compressed_bytes": 1000, "compression_ratio": 4.0, "format": "pack-quantized",
             "bits_per_weight": {"model": 8.0, "quantized_layers": None}},
    "compression": {"mean_relative_error": 0.1, "mean_sparsity": 0.0},
    "quality": {"dense": {"perplexity": 10.0, "nll": 2.3}, "compressed": {"perplexity": float("inf"), "nll": 9.9},
                "kl_nats": 0.01},
    "speed": None, "timing": {"total_s": 3.0, "phases": {"compress": 2.0}}, "cost": {"worker_utilisation": None},
    "shards": [{"index": 0, "modules": ["model.layers.0"], "seconds": 1.5, "capture_seconds": 0.5, "attempts": 1,
                "worker": {"device": "cpu"}, "error": {"a": 0.1, "b": 0.3}, "layers": []}],
    "store": {"retries": 1}, "calibration": None, "mlflow": None,
}


def recipe(uri: str):
    return build_recipe({"model": {"path": "m"}, "stages": [{"method": "rtn", "bits": 4}],
                         "tracking": {"uri": uri, "experiment": "unit"}})


def run_folder(tmp_path):
    (tmp_path / "recipe.yaml").write_text("name: r\n")
    return tmp_path


def test_metrics_are_flat_finite_and_named_by_unit():
    metrics = tracking.metrics_of(REPORT)
    assert metrics["size.compression_ratio"] == 4.0 and metrics["timing.compress_s"] == 2.0
    assert metrics["store.retries"] == 1.0 and metrics["quality.dense.perplexity"] == 10.0
    assert "quality.compressed.perplexity" not in metrics  # inf is not a metric
    assert "cost.worker_utilisation" not in metrics and "size.quantized_layers_bits_per_weight" not in metrics


def test_a_run_is_logged_with_its_report_as_the_folder_will_hold_it(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    info = tracking.log_run(recipe(uri), REPORT, run_folder(tmp_path))
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(info["run_id"])
    assert run.data.params["stages.0.bits"] == "4" and run.data.tags["methods"] == "rtn"
    assert run.data.metrics["size.compression_ratio"] == 4.0
    assert [m.value for m in client.get_metric_history(run.info.run_id, "shard.mean_relative_error")] == [0.2]
    (tmp_path / "dl").mkdir()
    logged = json.loads(Path(client.download_artifacts(run.info.run_id, "report.json", str(tmp_path / "dl"))).read_text())
    assert logged["mlflow"] == info == {"run_id": run.info.run_id, "experiment": "unit", "uri": uri}
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"recipe.yaml", "report.json", "report.md"}


def test_an_unreachable_server_keeps_the_run_for_sync(tmp_path, caplog):
    dead = f"http://127.0.0.1:{free_port()}"
    folder = run_folder(tmp_path)
    with caplog.at_level(logging.WARNING, logger="orchestrator"):
        info = tracking.log_run(recipe(dead), REPORT, folder)
    assert info == {"run_id": None, "pending": tracking.PENDING, "uri": dead}
    assert "could not be reached" in caplog.text and "orchestrator sync" in caplog.text
    reports.write(folder, REPORT | {"mlflow": info})
    live = f"sqlite:///{tmp_path}/later.db"
    synced = tracking.sync(folder, live)
    assert not (folder / tracking.PENDING).exists()
    assert json.loads((folder / "report.json").read_text())["mlflow"] == synced
    assert MlflowClient(tracking_uri=live).get_run(synced["run_id"]).data.metrics["store.retries"] == 1.0
