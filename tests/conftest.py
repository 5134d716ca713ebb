"""Shared fixtures: a session cache with the micro reference model, a module's local Ray, a real Ray head.
Helpers (the CLI runner, ports, hashes) live in tests/helpers.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from tests.helpers import free_port

RAY = str(Path(sys.executable).parent / "ray")


# A Ray temp root of the test process's own: a Ray the tests start (a `ray start --head`, a
# ray.cluster_utils.Cluster, which writes ray_current_cluster there whatever its temp_dir) is never joined
# by another test process or by a user's Ray on the machine. Short: Ray's socket paths must fit in 107 bytes.
os.environ["RAY_TMPDIR"] = f"/tmp/ray-tests-{os.getpid()}"
os.makedirs(os.environ["RAY_TMPDIR"], exist_ok=True)


# The slowest files first (minutes each, from `--durations`), so that `pytest -n 2 --dist loadfile
# --no-loadscope-reorder` (the README's test command) starts them at once and fills in with the short ones.
SLOWEST_FIRST = ["test_export.py", "test_recover.py", "test_chaos.py", "test_multinode.py", "test_cluster.py",
                 "test_planner.py", "test_moe.py", "test_regressions.py", "test_measure.py", "test_e2e.py",
                 "test_unchanged.py", "test_calibrated_e2e.py", "test_bad_input.py", "test_reference.py", "test_ui.py"]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file keeps its own order


def pytest_sessionfinish(session, exitstatus):
    import shutil

    shutil.rmtree(os.environ["RAY_TMPDIR"], ignore_errors=True)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("orchestrator-cache")
    os.environ["ORCHESTRATOR_CACHE"] = str(path)  # seen by this process and every CLI subprocess
    return path


@pytest.fixture(scope="session")
def micro_lm(cache_dir) -> Path:
    from orchestrator.reference import resolve_reference

    return resolve_reference("micro-lm", progress=False)


@pytest.fixture(scope="session")
def chaos_model(tmp_path_factory, micro_lm) -> Path:
    """A random Llama whose 4 shards take ~4 s each on one CPU: long enough to hit one mid-shard."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    dest = tmp_path_factory.mktemp("chaos-model")
    config = LlamaConfig(vocab_size=512, hidden_size=512, intermediate_size=2048, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(dest)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # micro-lm's tokenizer has the same 512 ids
        shutil.copy(micro_lm / name, dest / name)
    return dest


@pytest.fixture(scope="module")
def shared_ray():
    """One local Ray for a module's in-process runs (each `orchestrator run` joins it)."""
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A Ray head with its own temp dir and ports; token auth disabled for this test only."""
    # short: Ray's socket paths under it must fit in 107 bytes (pytest-xdist's basetemp is too deep)
    tmp = Path(tempfile.mkdtemp(prefix="head-", dir="/tmp"))
    dashboard = free_port()
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    gcs_port = free_port()
    # free ports everywhere, not Ray's fixed defaults, which a stray process from an earlier run may hold
    ports = [f"--port={gcs_port}"] + [f"--{name}={free_port()}" for name in (
        "ray-client-server-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
        "metrics-export-port", "runtime-env-agent-port", "node-manager-port", "object-manager-port")]
    start = [RAY, "start", "--head", *ports, "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
             "--num-cpus=4", f"--temp-dir={tmp / 'ray'}", "--include-dashboard=true", "--disable-usage-stats"]
    proc = subprocess.run(start, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    try:
        yield address, tmp, env
    finally:  # only this head's processes (their command lines name its temp dir) and their children (agents
        # retitle themselves, e.g. ray::DashboardAgent); `ray stop` would end every Ray on the machine
        marks = (str(tmp / "ray"), f":{gcs_port}")  # the temp dir, or the GCS address (ray client server)
        ours = {p for p in psutil.process_iter(["cmdline"])
                if any(m in " ".join(p.info["cmdline"] or []) for m in marks)}
        for p in list(ours):
            try:
                ours.update(p.children(recursive=True))
            except psutil.Error:
                pass
        for p in ours:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(list(ours), timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)
