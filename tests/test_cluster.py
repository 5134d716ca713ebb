"""Compression as a Ray job on a real Ray head (`ray start --head`), through the Jobs API."""

import json
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from tests.helpers import REPO, hashes, run_cli

pytestmark = pytest.mark.slow


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


def submit(address, tmp, env, *args) -> str:
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "submit", *args, "--address", address],
                          env=env, cwd=tmp, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip().splitlines()[-1]


@pytest.mark.chaos
def test_a_stopped_job_keeps_its_shards_and_resumes_when_resubmitted(ray_head, chaos_model):
    address, tmp, env = ray_head
    args = [str(REPO / "recipes" / "gptq-w4g128.yaml"), f"model.path={chaos_model}", f"output.dir={tmp}/resume",
            "output.name=job", "tracking.enabled=false", "data.eval.enabled=false", "cluster.workers=1"]
    store = tmp / "resume" / ".job.partial"
    first = submit(address, tmp, env, *args)
    deadline = time.time() + 180
    while time.time() < deadline and not list((store / "shards").glob("0*.json")):
        time.sleep(0.2)
    stop = subprocess.run([sys.executable, "-m", "orchestrator.cli", "jobs", "stop", first, "--address", address],
                          env=env, cwd=tmp, capture_output=True, text=True, timeout=60)
    assert stop.returncode == 0, stop.stderr[-2000:]
    assert wait_for(address, first, env, tmp, {"STOPPED", "SUCCEEDED", "FAILED"}, timeout=120) == "STOPPED"
    kept = sorted(p.stem for p in (store / "shards").glob("0*.json"))
    assert 1 <= len(kept) < 4 and not (tmp / "resume" / "job").exists()
    events = [json.loads(line)["event"] for line in (store / "events.jsonl").read_text().splitlines()]
    assert events[-1] == "stopped"  # SIGTERM from `ray job stop`: the driver logged its stop before exiting

    second = submit(address, tmp, env, *args)
    assert wait_for(address, second, env, tmp, {"SUCCEEDED", "FAILED", "STOPPED"}) == "SUCCEEDED"
    report = json.loads((tmp / "resume" / "job" / "report.json").read_text())
    assert report["store"]["shards_reused"] >= len(kept)
    assert report["store"]["shards_reused"] + report["store"]["shards_computed"] == 4
    whole = run_cli("run", *args, "output.name=whole", "--quiet", cwd=tmp)  # the same recipe, uninterrupted
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert hashes(tmp / "resume" / "job") == hashes(tmp / "resume" / "whole")
