"""The time cost model (cost.py) and the plan for a described cluster: its structure, not this machine's
speed (the measured comparison is benchmarks/plans.py's, not a timed unit test)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from orchestrator.cost import CHAIN, PHASES, Rates, schedule
from orchestrator.plan import make_plan
from orchestrator.recipe import load_recipe
from tests.helpers import REPO, run_cli

RECIPE = str(REPO / "recipes" / "gptq-w4g128.yaml")
RATES = Rates(matmul_flops=1e11, element_s=1e-9, column_s=1e-4, row_s=1e-7, read_bytes_s=1e9, network_bytes_s=1e9,
              local_bytes_s=5e9, fixed_s=9.0, gpus_per_node=0, source="test")


def phases(**seconds) -> dict:
    return {p: float(seconds.get(p, 0.0)) for p in PHASES}


def shards(n: int) -> list:
    return [SimpleNamespace(blocks=(k,)) for k in range(n)]


def test_sequential_calibration_predicts_more_than_parallel():
    work = [phases(forward=2, hessians=1, sweep_overhead=3, read=1)] * 8
    parallel = schedule(shards(8), work, workers=4, chunks=1, sequential=False, rates=RATES)
    sequential = schedule(shards(8), work, workers=4, chunks=1, sequential=True, rates=RATES)
    assert sequential.critical_path_s == pytest.approx(8 * 7)
    assert sequential.wall_s > parallel.wall_s


def test_more_workers_predict_less_until_the_chain_bounds_it():
    work = [phases(forward=1, sweep_overhead=20)] * 16
    walls = [schedule(shards(16), work, workers=w, chunks=4, sequential=False, rates=RATES).wall_s for w in (1, 2, 4)]
    assert walls[0] > walls[1] > walls[2]
    many = schedule(shards(16), work, workers=16, chunks=4, sequential=False, rates=RATES)
    assert many.bottleneck == CHAIN and many.wall_s == pytest.approx(16 / 4 + 21 + RATES.fixed_s)


def test_chunks_shorten_the_critical_path():
    work = [phases(forward=4, hessians=2, transfer=2, observer=1)] * 10
    paths = [schedule(shards(10), work, 10, chunks, False, RATES).critical_path_s for chunks in (1, 2, 4)]
    assert paths == pytest.approx([80 + 9, 40 + 9, 20 + 9])


def test_split_parts_of_one_block_run_side_by_side_in_the_chain():
    parts = [SimpleNamespace(blocks=(0,)), SimpleNamespace(blocks=(0,)), SimpleNamespace(blocks=(1,))]
    work = [phases(forward=3), phases(forward=5), phases(forward=2)]
    assert schedule(parts, work, 3, 1, False, RATES).critical_path_s == pytest.approx(5 + 2 + 2)


@pytest.mark.parametrize("dominant, name", [("sweep_overhead", "GPTQ sweep overhead"), ("read", "weight loading"),
                                            ("hessians", "compute (matmul)"), ("transfer", "network"),
                                            ("observer", "MSE observer (elementwise)")])
def test_the_bottleneck_names_the_dominant_term(dominant, name):
    work = [phases(**{"forward": 0.01, "write": 0.5, "sweep": 0.5, dominant: 10})] * 8
    assert schedule(shards(8), work, workers=1, chunks=4, sequential=False, rates=RATES).bottleneck == name


def config_only(micro_lm, tmp_path):
    folder = tmp_path / "config-only"
    folder.mkdir()
    (folder / "config.json").write_text((micro_lm / "config.json").read_text())
    return folder


def plan_for(folder, tmp_path, *overrides):
    recipe = load_recipe(RECIPE, [f"model.path={folder}", f"output.dir={tmp_path / 'runs'}",
                                  "data.calibration.num_samples=16", "data.calibration.seq_len=64", *overrides])
    return make_plan(recipe, progress=False, need_weights=False, refuse=False)


def test_described_gpus_plan_one_worker_per_gpu_and_the_gpus_memory(micro_lm, tmp_path):
    folder = config_only(micro_lm, tmp_path)
    here = plan_for(folder, tmp_path).forecast
    cluster = plan_for(folder, tmp_path, "cluster.nodes=2", "cluster.gpus_per_node=4", "cluster.gpu_tflops=100").forecast
    assert here.gpu_bytes == 0 and here.time.fixed_s < cluster.time.fixed_s
    assert cluster.gflops == 100_000  # the described rate, not this machine's
    assert 0 < max(s.gpu_bytes for s in cluster.shards) == cluster.gpu_bytes
    more = plan_for(folder, tmp_path, "cluster.nodes=2", "cluster.gpus_per_node=4", "data.calibration.num_samples=64").forecast
    assert more.gpu_bytes == cluster.gpu_bytes  # the calibration set's hidden states stay on the host ...
    assert more.host_bytes > cluster.host_bytes and more.worker_bytes > cluster.worker_bytes  # ... and grow there
    assert cluster.host_bytes > cluster.worker_bytes  # a node holds several workers and the object store
    summary = cluster.summary()
    assert summary["bottleneck"] == cluster.time.bottleneck and set(summary["phases_s"]) == set(PHASES)
    assert summary["gpu_bytes"] == cluster.gpu_bytes and "gpu_bytes" not in here.summary()


def test_plan_prints_a_described_cluster_and_refuses_a_shard_too_big_for_a_gpu(micro_lm, tmp_path):
    folder = config_only(micro_lm, tmp_path)
    args = ["plan", RECIPE, f"model.path={folder}", "cluster.nodes=2", "cluster.gpus_per_node=2",
            "data.calibration.num_samples=16"]
    proc = run_cli(*args, "cluster.gpu_memory_gb=80", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for line in ("cluster (described): 2 nodes x 2 GPUs = 4 workers, one per GPU", "per GPU:", "per host:",
                 "fits the GPU's 80 GB", "bottleneck:", "phases (seconds, summed over shards): read"):
        assert line in proc.stdout
    refused = run_cli(*args, "cluster.gpu_memory_gb=0.01", cwd=tmp_path)
    assert refused.returncode == 2 and "DOES NOT FIT the GPU's 0.01 GB" in refused.stdout  # printed, then refused
    assert "cluster.gpu_memory_gb is 0.01" in refused.stderr.strip().splitlines()[-1]


def test_the_written_plans_configs_load_as_their_families():
    from transformers import AutoConfig

    for name, family in (("llama-3.1-405b", "llama"), ("deepseek-v3", "deepseek_v3")):
        folder = REPO / "cluster" / "plans" / name
        assert AutoConfig.from_pretrained(folder).model_type == family
        assert "quantization_config" not in json.loads((folder / "config.json").read_text())


def test_a_gpu_holds_the_larger_of_a_shards_two_phases_and_the_405b_block_fits_80_gb(tmp_path):
    """Llama-3.1-405B from its config.json alone: a block's GPU memory is its compression phase (all four
    Hessians plus down_proj's factorisation, four [53248, 53248] float32), not the sum of both phases."""
    from orchestrator.planner import GPU_CONTEXT_BYTES

    cluster = ["cluster.nodes=16", "cluster.gpus_per_node=8", "cluster.gpu_memory_gb=80",
               "data.calibration.num_samples=128", "data.calibration.seq_len=2048"]
    recipe = load_recipe(RECIPE, [f"model.path={REPO / 'cluster/plans/llama-3.1-405b'}", f"output.dir={tmp_path}",
                                  *cluster])
    plan = make_plan(recipe, overwrite=True, progress=False, need_weights=False, refuse=False)
    s = plan.forecast.shards[0]
    down = 53248 ** 2 * 4
    assert s.factorisation_bytes == 4 * down
    assert s.gpu_bytes >= GPU_CONTEXT_BYTES + s.hessian_bytes + 4 * down  # the compression phase at least
    assert s.gpu_bytes < s.weight_bytes + s.hessian_bytes + s.factorisation_bytes + GPU_CONTEXT_BYTES + 10e9
    assert plan.forecast.gpu_bytes <= 80e9
