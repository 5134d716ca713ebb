"""Measuring what compression bought and cost: eval, compare, plots, MLflow layout, encoder fidelity."""

import json

import pytest
from mlflow.tracking import MlflowClient

from tests.helpers import REPO, run_cli
from orchestrator.cli import main
from orchestrator.recipe import load_recipe

pytestmark = pytest.mark.slow

SMALL = ["data.calibration.num_samples=16", "data.calibration.seq_len=64", "data.eval.max_windows=8",
         "data.eval.speed_repeats=2"]
PNG = b"\x89PNG\r\n\x1a\n"


def run(recipe, tmp_path, model, uri, *extra) -> dict:
    overrides = [f"model.path={model}", f"output.dir={tmp_path / 'runs'}", f"tracking.uri={uri}", *SMALL, *extra]
    assert main(["run", str(REPO / "recipes" / f"{recipe}.yaml"), *overrides, "--quiet"]) == 0
    run_dir = tmp_path / "runs" / load_recipe(REPO / "recipes" / f"{recipe}.yaml", overrides).run_name
    return json.loads((run_dir / "report.json").read_text()) | {"dir": run_dir}


@pytest.fixture(scope="module")
def lm_runs(tmp_path_factory, micro_lm, shared_ray):
    tmp = tmp_path_factory.mktemp("measure")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    recipes = ["rtn-w4g128", "gptq-w4g128", "wanda-2of4", "sparsegpt-2of4-w4g128"]
    return tmp, uri, {r: run(r, tmp, micro_lm, uri) for r in recipes}


def test_run_reports_quality_speed_cost_and_plots(lm_runs):
    _, uri, runs = lm_runs
    for name, r in runs.items():
        q = r["quality"]
        assert q["kl_nats"] > 0 and q["compressed"]["perplexity"] > 1
        for which in ("dense", "compressed"):
            sp = r["speed"][which]
            assert set(sp["batch"]) == {"1", "8"} and sp["resident_bytes"] > 0
            for row in sp["batch"].values():
                assert row["latency_min_s"] <= row["latency_median_s"] <= row["latency_max_s"]
                assert row["tokens_per_s"] > 0
        cost = r["cost"]
        assert cost["worker_cpu_s"] > 0 and 0 < cost["worker_utilisation"] <= 1.5
        for shard in r["shards"]:
            assert shard["cpu_seconds"] > 0
            assert (shard["capture_seconds"] > 0) == (name != "rtn-w4g128")  # only calibrated runs capture
        for png in ("layer_error.png", "layer_sparsity.png", "shard_time.png"):
            assert (r["dir"] / "plots" / png).read_bytes().startswith(PNG)
    # a lossier method costs more KL: 2:4 pruning vs 4-bit GPTQ
    assert runs["wanda-2of4"]["quality"]["kl_nats"] > runs["gptq-w4g128"]["quality"]["kl_nats"]


def test_mlflow_run_layout(lm_runs):
    _, uri, runs = lm_runs
    client = MlflowClient(tracking_uri=uri)
    r = runs["sparsegpt-2of4-w4g128"]
    logged = client.get_run(r["mlflow"]["run_id"])
    m, tags, params = logged.data.metrics, logged.data.tags, logged.data.params
    assert m["quality.compressed.perplexity"] == pytest.approx(r["quality"]["compressed"]["perplexity"])
    assert m["quality.kl_nats_per_token"] == pytest.approx(r["quality"]["kl_nats"])
    assert m["size.bits_per_weight"] == pytest.approx(r["size"]["bits_per_weight"]["model"])
    assert "speed.compressed.batch8.tokens_per_s" in m and "cost.worker_cpu_s" in m
    assert tags["methods"] == "sparsegpt" and tags["bits"] == "4" and tags["pattern"] == "2:4"
    assert params["stages.0.method"] == "sparsegpt" and params["partition.calibration"] == "parallel"
    steps = client.get_metric_history(logged.info.run_id, "shard.seconds")
    assert sorted(s.step for s in steps) == [s["index"] for s in r["shards"]]
    artifacts = {a.path for a in client.list_artifacts(logged.info.run_id, "plots")}
    assert artifacts == {"plots/layer_error.png", "plots/layer_sparsity.png", "plots/shard_time.png"}


def test_compare_prints_the_table_and_writes_the_pareto_plot(lm_runs, tmp_path):
    _, uri, runs = lm_runs
    folders = [str(r["dir"]) for r in runs.values()]
    proc = run_cli("compare", *folders, "--out", str(tmp_path / "cmp"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "cmp" / "pareto.png").read_bytes().startswith(PNG)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert lines[1].startswith("| dense ") and len(lines) == 2 + len(runs)
    for line, r in zip(lines[2:], runs.values()):  # the numbers are each report's own
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == r["run"]["name"]
        assert cells[3] == f"{r['size']['compression_ratio']:.2f}"
        assert cells[6] == f"{r['quality']['compressed']['perplexity']:.4f}"
        assert cells[7] == f"{r['quality']['kl_nats']:.4f}"
    # the same through MLflow run ids
    ids = [r["mlflow"]["run_id"] for r in runs.values()]
    by_id = run_cli("compare", *ids, "--tracking-uri", uri, "--out", str(tmp_path / "ids"), cwd=tmp_path)
    assert by_id.returncode == 0, by_id.stderr[-2000:]
    assert (tmp_path / "ids" / "compare.md").read_text() == (tmp_path / "cmp" / "compare.md").read_text()


def test_eval_reproduces_the_run_and_is_repeatable(lm_runs, tmp_path):
    _, _, runs = lm_runs
    r = runs["gptq-w4g128"]
    reports = []
    for i in range(2):
        out = tmp_path / f"eval{i}.json"
        proc = run_cli("eval", str(r["dir"] / "model"), "--baseline", r["model"]["dir"], "--max-windows", "8",
                       "--no-speed", "--threads", "1", "--out", str(out),
                       "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
        reports.append(json.loads(out.read_text()))
    first, second = reports
    timeless = lambda q: {k: {m: v for m, v in d.items() if m != "seconds"} if isinstance(d, dict) else d
                          for k, d in q.items()}
    assert timeless(first["quality"]) == timeless(second["quality"]) and first["layers"] == second["layers"]
    assert first["quality"]["compressed"]["perplexity"] == pytest.approx(r["quality"]["compressed"]["perplexity"],
                                                                        rel=1e-9)
    assert first["quality"]["kl_nats"] == pytest.approx(r["quality"]["kl_nats"], rel=1e-6)
    by_name = {layer["name"]: layer for layer in first["layers"]}
    for layer in (l for s in r["shards"] for l in s["layers"]):  # per-layer error as the workers measured it
        assert by_name[layer["name"]]["relative_error"] == pytest.approx(layer["relative_error"], rel=1e-4)
    assert first["mlflow_run_id"] and first["size"]["compression_ratio"] == pytest.approx(
        r["size"]["compression_ratio"], rel=1e-3)


def test_minilm_fidelity_in_reports_and_mlflow(tmp_path, shared_ray):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    extra = ["data.eval.sentences=128", "data.eval.speed=false"]
    runs = {name: run(recipe, tmp_path, "reference:minilm", uri, f"output.name={name}", *args, *extra)
            for name, recipe, args in [("w8", "rtn-w8", []), ("rtn-w4", "rtn-w4g128", []),
                                       ("gptq-w4", "gptq-w4g128", ["data.calibration.num_samples=32"])]}
    client = MlflowClient(tracking_uri=uri)
    cos = {}
    for name, r in runs.items():
        fid = r["quality"]["compressed"]["fidelity"]
        assert fid["sentences"] == 128 and fid["k"] == 10 and 0 < fid["topk_agreement"] <= 1
        cos[name] = fid["cosine_mean"]
        metrics = client.get_run(r["mlflow"]["run_id"]).data.metrics
        assert metrics["quality.fidelity.cosine_mean"] == pytest.approx(fid["cosine_mean"])
        assert metrics["quality.fidelity.top10_agreement"] == pytest.approx(fid["topk_agreement"])
    assert cos["w8"] > 0.995 and 0.9 < cos["rtn-w4"] < cos["w8"]
    assert cos["gptq-w4"] > cos["rtn-w4"]  # calibration helps on the real encoder too
