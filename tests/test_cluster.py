"""Compression as a Ray job on a real Ray head (`ray start --head`), through the Jobs API."""

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from conftest import REPO, run_cli
from test_ui import free_port

pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).parent / "ray")


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A Ray head with its own temp dir and ports; token auth disabled for this test only."""
    tmp = tmp_path_factory.mktemp("head")
    dashboard = free_port()
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    start = [RAY, "start", "--head", f"--port={free_port()}", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={dashboard}", "--num-cpus=4", f"--temp-dir={tmp / 'ray'}", "--include-dashboard=true",
             "--disable-usage-stats"]
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
    finally:  # only this head's processes (their command lines name its temp dir); `ray stop` would end every Ray
        ours = [p for p in psutil.process_iter(["cmdline"]) if str(tmp / "ray") in " ".join(p.info["cmdline"] or [])]
        for p in ours:
            p.kill()
        psutil.wait_procs(ours, timeout=30)


def wait_for(address, job_id, env, cwd, wanted, timeout=600) -> str:
    deadline, state = time.time() + timeout, None
    while time.time() < deadline:
        proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "jobs", "status", job_id,
                               "--address", address], env=env, cwd=cwd, capture_output=True, text=True, timeout=60)
        state = proc.stdout.strip()
        if state in wanted:
            return state
        time.sleep(2)
    return state


def test_submit_runs_the_recipe_on_the_cluster(ray_head, micro_lm):
    address, tmp, env = ray_head
    args = [str(REPO / "recipes" / "rtn-w4g128.yaml"), f"model.path={micro_lm}", "output.dir=runs",
            "output.name=job", "tracking.uri=sqlite:///mlflow.db", "data.eval.max_windows=8", "--address", address]
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "submit", *args], env=env, cwd=tmp,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    job_id = proc.stdout.strip().splitlines()[-1]
    assert job_id.startswith("raysubmit_")
    assert wait_for(address, job_id, env, tmp, {"SUCCEEDED", "FAILED", "STOPPED"}) == "SUCCEEDED"
    report = json.loads((tmp / "runs" / "job" / "report.json").read_text())  # relative paths pinned to cwd
    assert report["cluster"]["address"] == "auto" and report["quality"]["compressed"]["perplexity"] > 1
    run = MlflowClient(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}").get_run(report["mlflow"]["run_id"])
    assert run.data.metrics["quality.compressed.perplexity"] == pytest.approx(
        report["quality"]["compressed"]["perplexity"])


def test_jobs_stop_ends_a_long_job_as_stopped(ray_head, micro_lm):
    address, tmp, env = ray_head
    long = [str(REPO / "recipes" / "rtn-w4g128.yaml"), f"model.path={micro_lm}", f"output.dir={tmp}/long",
            "tracking.enabled=false", "data.eval.speed_repeats=1000000", "--address", address]
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "submit", *long], env=env, cwd=tmp,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    job_id = proc.stdout.strip().splitlines()[-1]
    assert wait_for(address, job_id, env, tmp, {"RUNNING"}, timeout=120) == "RUNNING"
    time.sleep(5)
    stop = subprocess.run([sys.executable, "-m", "orchestrator.cli", "jobs", "stop", job_id, "--address", address],
                          env=env, cwd=tmp, capture_output=True, text=True, timeout=60)
    assert stop.returncode == 0, stop.stderr[-2000:]
    assert wait_for(address, job_id, env, tmp, {"STOPPED", "SUCCEEDED", "FAILED"}, timeout=120) == "STOPPED"
    assert not list((tmp / "long").glob("*/report.json"))  # no run that looks complete


def test_submit_rejects_a_bad_recipe_before_contacting_the_cluster(tmp_path):
    proc = run_cli("submit", str(REPO / "recipes" / "rtn-w4g128.yaml"), "stages.0.bits=99",
                   "--address", "http://127.0.0.1:9", cwd=tmp_path)
    assert proc.returncode == 2 and "bits" in proc.stderr and "Traceback" not in proc.stderr
