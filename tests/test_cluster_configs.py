"""GPU settings and the cluster/ configs: checked against Ray's own schema and our recipe loader."""

import re
import shlex

import pytest
import ray
import torch
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from tests.helpers import REPO
from orchestrator.driver import gpus_per_worker
from orchestrator.recipe import load_recipe
from orchestrator.worker import compute_device

CLUSTER = REPO / "cluster"


@pytest.mark.parametrize("setting,workers,cluster_gpus,wanted", [
    ("auto", 2, 0, 0.0),  # no GPUs: CPU workers
    ("auto", 2, 8, 1.0),  # enough GPUs: one each
    ("auto", 2, 2, 1.0),
    ("auto", 4, 1, 0.25),  # fewer GPUs than workers: an equal share each, so all can start
    ("auto", 3, 2, 0.6666),
    ("0", 2, 8, 0.0),  # explicit settings win
    ("0.5", 2, 0, 0.5),
    ("2", 1, 8, 2.0),
])
def test_gpus_per_worker_resolves_auto_against_the_cluster(setting, workers, cluster_gpus, wanted):
    assert gpus_per_worker(setting, workers, cluster_gpus) == wanted


def test_a_worker_computes_on_cuda_only_when_granted_a_gpu_and_cuda_works(caplog):
    assert compute_device(["0"], cuda_available=True) == torch.device("cuda")
    assert compute_device([], cuda_available=True) == torch.device("cpu")
    assert not caplog.records
    assert compute_device([3], cuda_available=False) == torch.device("cpu")
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "granted this worker GPU 3 but CUDA is not available" in caplog.records[0].getMessage()


def test_cluster_launcher_yaml_passes_rays_schema():
    config = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    validate_config(prepare_config(config))  # raises on unknown or mistyped keys
    workers = [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]
    assert workers and all(t["node_config"]["InstanceType"].startswith(("g", "p")) for t in workers)  # GPU types
    commands = " ".join(config["setup_commands"] + config["head_start_ray_commands"])
    assert "scripts/setup.sh" in commands and "--dashboard-host=127.0.0.1" in commands
    assert "mlflow server --host 127.0.0.1" in commands


# RayJobSpec's fields in KubeRay's ray.io/v1 API (ray-operator/apis/ray/v1/rayjob_types.go)
RAYJOB_SPEC_FIELDS = {
    "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
    "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint", "runtimeEnvYAML",
    "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus", "entrypointNumGpus",
    "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend", "schedule",
}


def test_kuberay_rayjob_runs_a_valid_recipe_on_gpu_workers():
    job = yaml.safe_load((CLUSTER / "kuberay-rayjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert set(job["spec"]) <= RAYJOB_SPEC_FIELDS, set(job["spec"]) - RAYJOB_SPEC_FIELDS
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    docker_from = re.search(r"^FROM rayproject/ray:([\d.]+)-", (CLUSTER / "Dockerfile").read_text(), re.M)
    assert docker_from and docker_from.group(1) == ray.__version__
    gpu_limits = [c["resources"]["limits"].get("nvidia.com/gpu") for g in cluster["workerGroupSpecs"]
                  for c in g["template"]["spec"]["containers"]]
    assert gpu_limits and all(gpu_limits)
    # The entrypoint is an `orchestrator run` of a recipe in the image; its overrides must load.
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["orchestrator", "run"]
    recipe_path = REPO / argv[2].removeprefix("/opt/orchestrator/")
    recipe = load_recipe(recipe_path, argv[3:])
    assert recipe.config.cluster.address == "auto"
    assert recipe.config.tracking.uri.startswith("http://")
