"""The planner says what a run will need before it starts, refuses what cannot fit, and the driver
never holds the model."""

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import REPO, run_cli

RECIPE = str(REPO / "recipes" / "gptq-w4g128.yaml")


def test_plan_prints_shards_memory_and_time(micro_lm, tmp_path):
    proc = run_cli("plan", RECIPE, f"model.path={micro_lm}", "data.calibration.num_samples=16", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "| 0 | model.layers.0 |" in out and "| 1 | model.layers.1 |" in out
    for line in ("driver peak:", "worker peak:", "object store:", "time: about"):
        assert line in out
    assert not list((tmp_path / "runs").glob("*"))  # planning writes no run (only checks the folder is writable)


def test_run_refuses_a_plan_that_cannot_fit_and_names_the_knobs(micro_lm, tmp_path):
    proc = run_cli("run", RECIPE, f"model.path={micro_lm}", "cluster.memory_gb=0.1", f"output.dir={tmp_path}/runs",
                   cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    message = proc.stderr.strip().splitlines()[-1]
    assert message.startswith("error: plan: this run needs about")
    for knob in ("partition.blocks_per_shard", "cluster.workers", "data.calibration.num_samples",
                 "data.calibration.seq_len"):
        assert knob in message
    assert not list((tmp_path / "runs").glob("*"))  # refused before any work: no run folder


@pytest.mark.slow
def test_the_driver_never_holds_the_model(tmp_path):
    """A 600 MB float32 Llama, sharded safetensors, 2 workers: the driver's memory grows by a small
    fraction of the model, and each worker stays near the planner's prediction."""
    config = LlamaConfig(vocab_size=8192, hidden_size=1024, intermediate_size=4096, num_hidden_layers=8,
                         num_attention_heads=16, num_key_value_heads=16, architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    model_dir = tmp_path / "llama-600m"
    LlamaForCausalLM(config).save_pretrained(model_dir, max_shard_size="200MB")
    model_bytes = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    assert model_bytes > 500e6 and (model_dir / "model.safetensors.index.json").exists()
    proc = run_cli("run", str(REPO / "recipes" / "rtn-w4g128.yaml"), f"model.path={model_dir}",
                   "cluster.workers=2", "data.eval.enabled=false", "tracking.enabled=false",
                   f"output.dir={tmp_path}/runs", "output.name=big", "--quiet", cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "runs" / "big" / "report.json").read_text())
    growth = report["memory"]["driver_peak_rss_bytes"] - report["plan"]["base_bytes"]
    assert growth < 0.25 * model_bytes, (growth, model_bytes, report["memory"], report["plan"]["base_bytes"])
    # a worker's measured peak is its process's high-water mark over all its shards so far; the plan's
    # worker figure is the largest shard plus the embeddings and head that one worker copies
    measured = report["memory"]["worker_peak_rss_bytes"]
    predicted = report["plan"]["worker_bytes"]
    assert 0.7 * predicted <= measured <= 1.3 * predicted, (measured, predicted)
