"""End to end, as a user runs it: CLI -> local Ray (2 workers) -> checkpoint -> perplexity -> MLflow."""

import json
import subprocess
import sys
import textwrap

import pytest
from tests.helpers import REPO, run_cli

from orchestrator.checkpoint import file_sha256

pytestmark = pytest.mark.slow

RECIPE = """
name: e2e
model: {path: MODEL}
stages:
  - {method: magnitude, sparsity: 0.25, ignore: ['down_proj']}
  - {method: rtn, bits: 4, group_size: 64, symmetric: false}
data:
  eval: {max_windows: 16}
tracking: {uri: "sqlite:///TMP/mlflow.db", experiment: e2e}
output: {dir: TMP/runs}
"""


@pytest.fixture(scope="module")
def runs(micro_lm, tmp_path_factory):
    """The same recipe with 2 workers and with 1 worker."""
    tmp = tmp_path_factory.mktemp("e2e")
    recipe = tmp / "recipe.yaml"
    recipe.write_text(textwrap.dedent(RECIPE).replace("MODEL", str(micro_lm)).replace("TMP", str(tmp)))
    out = {}
    for workers in (2, 1):
        proc = run_cli("run", str(recipe), f"cluster.workers={workers}", f"output.name=w{workers}", cwd=tmp)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[workers] = (tmp / "runs" / f"w{workers}", proc)
    return tmp, recipe, out


def test_report_has_the_contract_keys(runs):
    _, _, out = runs
    run_dir, proc = out[2]
    report = json.loads((run_dir / "report.json").read_text())
    assert report["model"]["params"] > 100_000
    assert report["size"]["dense_bytes"] > 0 and report["size"]["compressed_bytes"] > 0
    assert report["size"]["compressed_bytes"] == sum(p.stat().st_size for p in (run_dir / "model").iterdir())
    assert report["size"]["compression_ratio"] == pytest.approx(
        report["size"]["dense_bytes"] / report["size"]["compressed_bytes"], rel=1e-3)
    dense, compressed = report["quality"]["dense"]["perplexity"], report["quality"]["compressed"]["perplexity"]
    assert 1 < dense < 512 and 1 < compressed < 512 and compressed != dense  # 512: micro-lm's vocabulary
    assert report["timing"]["total_s"] > 0
    assert [s["index"] for s in report["shards"]] == [0, 1]
    for shard in report["shards"]:
        assert shard["modules"] and shard["seconds"] >= 0 and shard["attempts"] == 1
        assert len(shard["error"]) == 7 and all(0 < e < 1 for e in shard["error"].values())
        down = [l for l in shard["layers"] if l["name"].endswith("down_proj")][0]
        assert down["methods"] == ["rtn"]  # ignored by the pruning stage
    assert report["mlflow"]["run_id"]
    for name in ("recipe.yaml", "report.md", "model/config.json", "model/model.safetensors.index.json"):
        assert (run_dir / name).is_file()
    assert "perplexity" in proc.stdout and "size on disk" in proc.stdout  # the summary table


def test_export_loads_in_a_fresh_process_with_the_evaluated_logits(runs):
    _, _, out = runs
    run_dir = out[2][0]
    code = textwrap.dedent(f"""
        import torch
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM
        sample = load_file("{run_dir}/eval/sample_logits.safetensors")
        model = AutoModelForCausalLM.from_pretrained("{run_dir}/model").eval()
        with torch.no_grad():
            logits = model(input_ids=sample["input_ids"][None]).logits[0].float()
        err = ((logits - sample["compressed"]).norm() / sample["compressed"].norm()).item()
        dense_gap = ((logits - sample["dense"]).norm() / sample["dense"].norm()).item()
        print(err, dense_gap)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    err, dense_gap = map(float, proc.stdout.split())
    assert err < 1e-5
    assert dense_gap > 1e-3  # and it really is the compressed model, not the dense one


def worker_pids(run_dir) -> set[int]:
    """The processes that compressed the run's shards (each shard record names its worker's pid)."""
    return {s["worker"]["pid"] for s in json.loads((run_dir / "report.json").read_text())["shards"]}


def test_one_and_two_workers_give_identical_bytes(runs):
    _, _, out = runs
    assert len(worker_pids(out[2][0])) == 2 and len(worker_pids(out[1][0])) == 1  # really 2 actors, and 1
    files = sorted(p.name for p in (out[2][0] / "model").glob("*.safetensors"))
    assert len(files) == 3  # embeddings/head + 2 shards
    for name in files:
        assert file_sha256(out[1][0] / "model" / name) == file_sha256(out[2][0] / "model" / name), name


def test_mlflow_run_has_params_metrics_artifacts(runs):
    from mlflow.tracking import MlflowClient

    tmp, _, out = runs
    report = json.loads((out[2][0] / "report.json").read_text())
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db")
    run = client.get_run(report["mlflow"]["run_id"])
    assert run.data.params["stages.1.bits"] == "4" and run.data.params["stages.0.method"] == "magnitude"
    assert run.data.params["cluster.workers"] == "2"
    assert run.data.metrics["quality.compressed.perplexity"] == pytest.approx(
        report["quality"]["compressed"]["perplexity"])
    assert run.data.metrics["size.compressed_bytes"] == report["size"]["compressed_bytes"]
    assert run.data.tags["methods"] == "magnitude+rtn"
    series = client.get_metric_history(run.info.run_id, "shard.seconds")
    assert sorted(m.step for m in series) == [0, 1]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"recipe.yaml", "report.json", "report.md"} <= artifacts


def test_complete_run_is_not_overwritten_without_flag(runs):
    tmp, recipe, out = runs
    run_dir = out[1][0]
    before = file_sha256(run_dir / "report.json")
    proc = run_cli("run", str(recipe), "cluster.workers=1", "output.name=w1", cwd=tmp, timeout=120)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr
    assert file_sha256(run_dir / "report.json") == before


def test_a_run_has_stopped_the_ray_it_started_when_it_returns(micro_lm, tmp_path):
    """Ray stops beside the report and plots (driver.run), and is gone when the run returns: no Ray
    process is left behind, in the process or under it."""
    import psutil
    import ray

    from orchestrator.cli import main

    assert not ray.is_initialized()
    rtn = str(REPO / "recipes" / "rtn-w4g128.yaml")
    assert main(["run", rtn, f"model.path={micro_lm}", f"output.dir={tmp_path}", "tracking.enabled=false",
                 "data.eval.enabled=false", "--quiet"]) == 0
    left = [p.name() for p in psutil.Process().children(recursive=True)
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not ray.is_initialized() and not left, left
