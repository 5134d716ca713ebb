"""Several Ray nodes (ray.cluster_utils.Cluster) and declared GPUs, on one CPU machine."""

import json

import pytest
import ray
from ray.cluster_utils import Cluster

from tests.helpers import REPO, free_port
from orchestrator.checkpoint import file_sha256
from orchestrator.cli import main

pytestmark = pytest.mark.slow
RECIPE = str(REPO / "recipes" / "gptq-w4g128.yaml")
SMALL = ["data.calibration.num_samples=16", "data.calibration.seq_len=64", "data.eval.enabled=false",
         "tracking.enabled=false"]


def run(micro_lm, out, name, *extra) -> dict:
    assert main(["run", RECIPE, f"model.path={micro_lm}", f"output.dir={out}", f"output.name={name}", *SMALL,
                 *extra, "--quiet"]) == 0
    return json.loads((out / name / "report.json").read_text())


def model_hashes(folder) -> dict:
    return {p.name: file_sha256(p) for p in sorted(folder.glob("*.safetensors"))}


def test_shards_spread_over_nodes_with_the_bytes_of_one_node(micro_lm, tmp_path):
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    try:
        ray.init(address=cluster.address, logging_level="WARNING")
        spread = run(micro_lm, tmp_path, "three-nodes", "cluster.workers=3")
    finally:
        ray.shutdown()
        cluster.shutdown()
    nodes = {s["worker"]["node"] for s in spread["shards"]}
    assert len(nodes) >= 2, nodes  # micro-lm has 2 shards: each on its own node
    ray.init(address="local", num_cpus=2, logging_level="WARNING")
    try:
        single = run(micro_lm, tmp_path, "one-node", "cluster.workers=1")
    finally:
        ray.shutdown()
    assert len({s["worker"]["node"] for s in single["shards"]}) == 1
    assert model_hashes(tmp_path / "three-nodes" / "model") == model_hashes(tmp_path / "one-node" / "model")


def test_workers_given_a_gpu_fall_back_to_the_cpu_with_a_warning(micro_lm, tmp_path, capfd):
    ray.init(address="local", num_cpus=4, num_gpus=1, logging_level="WARNING")  # a declared GPU, no CUDA
    try:
        report = run(micro_lm, tmp_path, "gpu", "cluster.workers=2")  # gpus_per_worker: auto
    finally:
        ray.shutdown()
    assert report["cluster"]["gpus_per_worker"] == 0.5  # auto: one GPU, two workers -> half each
    for shard in report["shards"]:
        assert shard["worker"]["gpu_ids"] == ["0"]  # Ray granted the (fractional) GPU
        assert shard["worker"]["device"] == "cpu"  # but there is no CUDA: computed on the CPU
    err = capfd.readouterr().err
    assert "granted this worker GPU 0 but CUDA is not available" in err and "compressing on the CPU" in err


def test_recovery_workers_on_two_nodes_give_the_bytes_of_one_node(micro_lm, tmp_path):
    recipe = str(REPO / "recipes" / "sparsegpt-2of4-w4g128-recover.yaml")
    args = ["run", recipe, f"model.path={micro_lm}", f"output.dir={tmp_path}", *SMALL, "recover.steps=3",
            "recover.lr=0.01", "recover.num_samples=8", "recover.seq_len=32", "recover.batch_size=2", "--quiet"]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": True,
                                                          "dashboard_port": free_port()})  # 8265 may be taken
    cluster.add_node(num_cpus=1)  # one CPU per node: the two training workers must use both
    try:
        ray.init(address=cluster.address, logging_level="WARNING")
        assert main([*args, "output.name=two-nodes"]) == 0
    finally:
        ray.shutdown()
        cluster.shutdown()
    ray.init(address="local", num_cpus=3, include_dashboard=True, logging_level="WARNING")
    try:
        assert main([*args, "output.name=one-node"]) == 0
    finally:
        ray.shutdown()
    two = json.loads((tmp_path / "two-nodes" / "report.json").read_text())["recover"]
    one = json.loads((tmp_path / "one-node" / "report.json").read_text())["recover"]
    assert len(set(two["nodes"])) == 2 and len(set(one["nodes"])) == 1
    assert model_hashes(tmp_path / "two-nodes" / "model") == model_hashes(tmp_path / "one-node" / "model")
