"""report.py on its own (no Ray): report.json's content from one RunResult, its files, the summaries."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest

from orchestrator import report
from orchestrator.plan import make_plan
from orchestrator.recipe import build_recipe

LAYER = {"name": "model.layers.0.mlp.up_proj", "relative_error": 0.1, "sqnr_db": 20.0, "sparsity": 0.5, "bits": 4,
         "group_size": 128, "methods": ["rtn"], "stats": {}}


def shard(index: int, seconds: float) -> dict:
    return {"index": index, "modules": [f"model.layers.{index}"], "seconds": seconds, "capture_seconds": 1.0,
            "cpu_seconds": seconds, "attempts": 1, "worker": {"device": "cpu", "peak_rss_bytes": 7_000_000},
            "error": {LAYER["name"]: 0.1}, "layers": [LAYER], "reused": False}


@pytest.fixture
def result(tmp_path, micro_lm):
    recipe = build_recipe({"model": {"path": str(micro_lm)}, "stages": [{"method": "rtn", "bits": 4}],
                           "output": {"dir": str(tmp_path / "runs")}, "cluster": {"workers": 2}})
    plan = make_plan(recipe)
    (plan.store.folder / "model").mkdir(parents=True)
    (plan.store.folder / "model" / "model.safetensors").write_bytes(b"\0" * 1000)
    compressed = SimpleNamespace(shards=[shard(0, 3.0), shard(1, 5.0)], reused=1, computed=1)
    sizes = {"format": "pack-quantized", "tensor_bytes": 800, "quantized_layer_bytes": 500, "quantized_weights": 1000,
             "load_check": {"loaded": True}}
    quality = {"dense": {"perplexity": 10.0, "nll": 2.3}, "compressed": {"perplexity": 11.0, "nll": 2.4}, "kl_nats": 0.01}
    return report.RunResult(plan=plan, compressed=compressed, quality=quality, speed=None, sizes=sizes,
                            recovery={"settings": {}, "losses": [1.0], "seconds": 2.0, "perplexity_before": 12.0},
                            gpus_per_worker=0.0, phases={"plan": 1.0, "compress": 8.0}, started=time.time(),
                            driver_peak_rss=plan.forecast.base_bytes + 5_000_000, retries=2)


def test_one_run_result_makes_the_whole_report(result):
    data = report.build(result)
    assert data["size"]["compressed_bytes"] == 1000
    assert data["size"]["compression_ratio"] == pytest.approx(data["size"]["dense_bytes"] / 1000, abs=1e-4)
    assert data["size"]["bits_per_weight"] == {"quantized_layers": 4.0,
                                               "model": round(8 * 800 / result.plan.partition.num_params, 4)}
    assert data["cost"]["worker_compress_s"] == 8.0 and data["cost"]["worker_utilisation"] == 0.625  # 10 s of 2 x 8 s
    assert data["memory"] == {"driver_peak_rss_bytes": result.driver_peak_rss, "driver_growth_bytes": 5_000_000,
                              "worker_peak_rss_bytes": 7_000_000}
    assert data["store"] == {"shards_reused": 1, "shards_computed": 1, "retries": 2}
    assert data["recover"]["perplexity_after"] == 11.0 and data["recover"]["perplexity_before"] == 12.0
    assert data["cluster"] == {"address": "local", "workers": 2, "cpus_per_worker": 1.0, "gpus_per_worker": 0.0}
    assert data["calibration"] is None and data["timing"] == {"total_s": None, "phases": result.phases}


def test_the_report_files_and_the_summary(result, tmp_path):
    data = report.build(result) | {"timing": {"total_s": 9.5, "phases": result.phases}}
    report.write(tmp_path, data)
    assert (tmp_path / "report.json").read_text() == report.to_json(data)
    assert json.loads((tmp_path / "report.json").read_text())["store"]["retries"] == 2
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic writes left no temporary file
    md = (tmp_path / "report.md").read_text()
    assert "| perplexity (held-out) | 10.000 | 11.000 |" in md and "| model.layers.0.mlp.up_proj | rtn | 4 |" in md
    summary = report.summary_table(data)
    assert "wall time: 9.5 s  (plan 1.0s, compress 8.0s)" in summary
    assert report.human_bytes(1862977) == "1.9 MB" and report.human_bytes(999) == "999 B"
