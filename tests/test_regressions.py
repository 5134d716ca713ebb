"""Defects found trying the tool as a new user would (issue 14), each run the way the user ran it."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import torch

from tests.helpers import REPO, load_export, run_cli

QUIET = ["tracking.enabled=false", "--quiet"]


def save_with_micro_tokenizer(config, dest: Path, micro_lm: Path) -> Path:
    """A random model of `config` (512 ids) with micro-lm's tokenizer, as transformers saves it."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(dest)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(micro_lm / name, dest / name)
    return dest


@pytest.mark.slow
def test_an_embedded_run_starts_its_own_ray_beside_a_running_head(ray_head, micro_lm, tmp_path):
    """cluster.address null means a Ray of the run's own, even with a head on the machine and RAY_ADDRESS
    pointing at it (ray.init() used to join it and fail on num_cpus: a traceback, exit 1)."""
    _, head_tmp, env = ray_head
    gcs = next(p for p in psutil.process_iter(["cmdline"])
               if "gcs_server" in " ".join(p.info["cmdline"] or []) and str(head_tmp) in " ".join(p.info["cmdline"]))
    port = next(re.search(r"--gcs_server_port=(\d+)", a).group(1) for a in gcs.info["cmdline"] if "gcs_server_port" in a)
    head_nodes = subprocess.run([str(Path(sys.executable).parent / "ray"), "list", "nodes", "--format=json",
                                 f"--address=127.0.0.1:{port}"], env=env, capture_output=True, text=True, timeout=120)
    os.environ["RAY_ADDRESS"] = f"127.0.0.1:{port}"  # run_cli passes this process's environment on
    try:
        proc = run_cli("run", str(REPO / "recipes/rtn-w4g128.yaml"), f"model.path={micro_lm}",
                       "data.eval.enabled=false", *QUIET, cwd=tmp_path)
    finally:
        del os.environ["RAY_ADDRESS"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    report = json.loads(next(tmp_path.glob("runs/*/report.json")).read_text())
    head_node_ids = {n["node_id"] for n in json.loads(head_nodes.stdout)}
    assert head_node_ids and not head_node_ids & {s["worker"]["node"] for s in report["shards"]}


def test_pruning_only_sparsegpt_checks_no_group_size(micro_lm, tmp_path):
    """A 704-wide MLP: SparseGPT without `bits` quantizes nothing, so its default group_size must not refuse
    the model; with bits set, the same group size is still refused (exit 2, naming the key)."""
    from transformers import LlamaConfig

    model = save_with_micro_tokenizer(
        LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=704, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, architectures=["LlamaForCausalLM"]), tmp_path / "llama704", micro_lm)
    recipe = str(REPO / "recipes/sparsegpt-50.yaml")
    plan = run_cli("plan", recipe, f"model.path={model}", "data.calibration.num_samples=8", cwd=tmp_path)
    assert plan.returncode == 0, plan.stderr[-2000:]
    quantized = run_cli("plan", recipe, f"model.path={model}", "stages.0.bits=4", cwd=tmp_path)
    assert quantized.returncode == 2
    assert "'stages.0.group_size': 128 does not divide the 704 input features" in quantized.stderr


@pytest.mark.slow
def test_a_second_run_of_the_same_name_is_refused_until_the_first_dies(micro_lm, tmp_path):
    """Two `orchestrator run` of one recipe at once: the second exits 2 naming the first's pid, touching
    nothing; once the first is SIGKILLed, its lock does not block a rerun, which completes."""
    args = [sys.executable, "-m", "orchestrator.cli", "run", str(REPO / "recipes/rtn-w4g128.yaml"),
            f"model.path={micro_lm}", "data.eval.enabled=false", *QUIET]
    first = subprocess.Popen(args, cwd=tmp_path, start_new_session=True, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env=dict(os.environ, RAY_USAGE_STATS_ENABLED="0"))
    try:
        lock = None
        deadline = time.time() + 180
        while time.time() < deadline and lock is None:
            lock = next((p for p in (tmp_path / "runs").glob(".*.lock")
                         if f"pid {first.pid} " in p.read_text()), None) if (tmp_path / "runs").is_dir() else None
            time.sleep(0.05)
        assert lock is not None, "the first run never took its lock"
        os.killpg(first.pid, signal.SIGSTOP)  # frozen while holding it: the refusal cannot race its end
        partial = lock.with_name(lock.name.removesuffix(".lock") + ".partial")
        before = sorted(str(p) for p in partial.rglob("*")) if partial.exists() else []
        second = run_cli(*args[3:], cwd=tmp_path)
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"being written by another orchestrator run (pid {first.pid} on" in second.stderr
        assert (sorted(str(p) for p in partial.rglob("*")) if partial.exists() else []) == before
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert lock.exists()  # a killed process leaves its file behind, but not its lock
    rerun = run_cli(*args[3:], cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert not lock.exists()
    assert (lock.with_name(lock.name.removeprefix(".").removesuffix(".lock")) / "report.json").is_file()


@pytest.mark.slow
def test_an_export_transformers_cannot_load_fails_the_run(micro_lm, tmp_path):
    """Falcon's `_init_weights` reads FalconLinear.weight, which pack-quantized layers lack: the run used to
    exit 0 with an export that does not load. Now it fails (exit 1) and leaves no run folder; the layout
    the message proposes (asymmetric: naive-quantized int8) loads, reproduces the evaluated logits, and
    says so in report.json."""
    from transformers import FalconConfig

    model = save_with_micro_tokenizer(
        FalconConfig(vocab_size=512, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                     architectures=["FalconForCausalLM"]), tmp_path / "falcon", micro_lm)
    recipe = [str(REPO / "recipes/rtn-w4g128.yaml"), f"model.path={model}", "data.eval.enabled=false", *QUIET]
    packed = run_cli("run", *recipe, cwd=tmp_path)
    assert packed.returncode == 1, packed.stderr[-2000:]
    assert "does not work: transformers cannot load it: AttributeError: 'FalconLinear'" in packed.stderr
    assert "symmetric: false" in packed.stderr
    assert not [p for p in (tmp_path / "runs").iterdir() if not p.name.startswith(".")]

    naive = run_cli("run", *recipe, "stages.0.symmetric=false", "output.name=naive", cwd=tmp_path)
    assert naive.returncode == 0, naive.stderr[-2000:]
    run_dir = tmp_path / "runs/naive"
    report = json.loads((run_dir / "report.json").read_text())
    assert report["size"]["load_check"]["max_logit_error"] <= 1e-4
    load_export(run_dir / "model")  # the whole model, as a user loads it


@pytest.mark.slow
def test_the_export_check_survives_the_death_of_the_actor_kept_for_it(micro_lm, tmp_path, shared_ray):
    """The export's check runs on a compression actor kept up for it; when that actor has died (a worker
    killed late in the run: tests/test_chaos.py's expert-split kill once hit it), the check runs in a fresh
    process instead of failing the run."""
    import ray

    from orchestrator.driver import check_export_loads
    from orchestrator.plan import make_plan
    from orchestrator.recipe import load_recipe
    from orchestrator.worker import CompressionWorker

    rtn = REPO / "recipes/rtn-w4g128.yaml"
    proc = run_cli("run", str(rtn), f"model.path={micro_lm}", "data.eval.enabled=false", *QUIET, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    export = next(p for p in (tmp_path / "runs").iterdir() if not p.name.startswith(".")) / "model"
    plan = make_plan(load_recipe(rtn, [f"model.path={micro_lm}", f"output.dir={tmp_path / 'again'}"]), progress=False)
    kept = CompressionWorker.options(num_cpus=1).remote(1, str(micro_lm), plan.partition.key_to_file)
    ray.kill(kept)  # the fault: the kept actor is gone
    compressed = SimpleNamespace(export=SimpleNamespace(folder=export), evaluated=SimpleNamespace(folder=export))
    assert check_export_loads(plan, compressed, kept)["max_logit_error"] == 0


@pytest.mark.slow
def test_the_load_check_catches_an_export_that_computes_something_else(micro_lm, tmp_path):
    """A packed scale of the first block altered: the export still loads, but its outputs are no longer
    those of the checkpoint it is checked against, and check_loads says so."""
    from safetensors.torch import load_file, save_file

    from orchestrator.export import check_loads

    proc = run_cli("run", str(REPO / "recipes/rtn-w4g128.yaml"), f"model.path={micro_lm}", "data.eval.enabled=false",
                   *QUIET, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    export = next(p for p in (tmp_path / "runs").iterdir() if not p.name.startswith(".")) / "model"
    assert check_loads(str(export), str(export), "model.layers", 1, False, False, 1)["max_logit_error"] == 0
    altered = shutil.copytree(export, tmp_path / "altered")
    key = "model.layers.0.mlp.down_proj.weight_scale"
    fname = json.loads((altered / "model.safetensors.index.json").read_text())["weight_map"][key]
    tensors = load_file(altered / fname)
    tensors[key] = tensors[key] * 1.5
    save_file(tensors, str(altered / fname), metadata={"format": "pt"})
    with pytest.raises(RuntimeError, match="other outputs than the evaluated copy"):
        check_loads(str(altered), str(export), "model.layers", 1, False, False, 1)
