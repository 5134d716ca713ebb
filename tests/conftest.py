"""Shared fixtures: a session cache with the micro reference model, and a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/models.py

REPO = Path(__file__).resolve().parents[1]

# A Ray temp root of the test process's own: a Ray the tests start (a `ray start --head`, a
# ray.cluster_utils.Cluster, which writes ray_current_cluster there whatever its temp_dir) is never joined
# by another test process or by a user's Ray on the machine. Short: Ray's socket paths must fit in 107 bytes.
os.environ["RAY_TMPDIR"] = f"/tmp/ray-tests-{os.getpid()}"
os.makedirs(os.environ["RAY_TMPDIR"], exist_ok=True)


# The slowest files first (minutes each, from `--durations`), so that `pytest -n 2 --dist loadfile
# --no-loadscope-reorder` (the README's test command) starts them at once and fills in with the short ones.
SLOWEST_FIRST = ["test_export.py", "test_recover.py", "test_chaos.py", "test_multinode.py", "test_cluster.py",
                 "test_planner.py", "test_regressions.py", "test_measure.py", "test_e2e.py",
                 "test_calibrated_e2e.py", "test_bad_input.py", "test_reference.py", "test_ui.py"]


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


def run_cli(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """`orchestrator ARGS` in a fresh process, as a user would type it."""
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def shared_ray():
    """One local Ray for a module's in-process runs (each `orchestrator run` joins it)."""
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


def load_export(folder, encoder: bool = False):
    """A run's exported model as transformers loads it, its packed weights unpacked
    (compressed-tensors decompresses on the first forward pass)."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    model = (AutoModel if encoder else AutoModelForCausalLM).from_pretrained(folder).eval()
    with torch.no_grad():
        model(input_ids=torch.zeros(1, 4, dtype=torch.long))
    return model
