"""Compression as a Ray job on a cluster: submit, follow, status, stop (the Ray Jobs API).

The job runs `orchestrator run` on the cluster with `cluster.address=auto`. Its
runtime environment carries this package (`py_modules`) and the resolved recipe
(`working_dir`); the cluster's Python must have the dependencies installed (the
same `scripts/setup.sh`, or an image built from it). Paths in the recipe
(model.path, output.dir, a sqlite tracking URI) must be ones the cluster can
reach: relative ones are made absolute here, against the submitting directory.
Token authentication: `--token`, or RAY_AUTH_TOKEN, is sent as a bearer token.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from pathlib import Path

from orchestrator.errors import UserError
from orchestrator.recipe import Recipe, load_recipe


AGENT_WAIT_S = 120  # how long to wait for a newly started head's job agent


class JobError(RuntimeError):
    """The cluster refused or failed a request (exit 1, one line)."""


def client(address: str, token: str | None = None):
    from ray.job_submission import JobSubmissionClient

    token = token or os.environ.get("RAY_AUTH_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(address, headers=headers)
    except Exception as e:  # connection refused, wrong URL, auth refused
        raise UserError(f"--address: cannot reach the Ray dashboard at {address} ({str(e).splitlines()[0]})") from None


def absolute_paths(recipe: Recipe, overrides: list[str]) -> list[str]:
    """Overrides that pin the recipe's relative paths to the submitting directory."""
    cfg, extra = recipe.config, []
    if not Path(cfg.output.dir).is_absolute():
        extra.append(f"output.dir={Path(cfg.output.dir).resolve()}")
    model = cfg.model.path
    if not model.startswith("reference:") and not Path(model).is_absolute():
        extra.append(f"model.path={Path(model).resolve()}")
    uri = cfg.tracking.uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        extra.append(f"tracking.uri=sqlite:///{Path(uri.removeprefix('sqlite:///')).resolve()}")
    return [*overrides, *extra]


def submit(recipe_path: str, overrides: list[str], address: str, token: str | None = None) -> str:
    """Check the recipe here (bad input: exit 2 before anything is sent), then submit it. -> the job id."""
    recipe = load_recipe(recipe_path, overrides)
    recipe = load_recipe(recipe_path, absolute_paths(recipe, overrides))
    jobs = client(address, token)
    stage = Path(tempfile.mkdtemp(prefix="orchestrator-job-"))
    (stage / "recipe.yaml").write_text(recipe.yaml)
    job = dict(
        entrypoint="python -m orchestrator.cli run recipe.yaml cluster.address=auto",
        runtime_env={"working_dir": str(stage), "py_modules": [str(Path(__file__).resolve().parent)],
                     "env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}},
        metadata={"recipe": recipe.run_name, "recipe_hash": recipe.hash},
    )
    deadline = time.time() + AGENT_WAIT_S
    while True:
        try:
            return jobs.submit_job(**job)
        except RuntimeError as e:  # a head that has just started answers before its job agent is up
            if "No available agent" not in str(e) or time.time() > deadline:
                raise JobError(f"submitting to {address} failed: {str(e).splitlines()[-1]}") from None
            time.sleep(2)


def follow(address: str, job_id: str, token: str | None = None) -> str:
    """Stream the job's logs to stdout until it ends; -> its final status."""
    jobs = client(address, token)

    async def tail() -> None:
        async for lines in jobs.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    asyncio.run(tail())
    return str(jobs.get_job_status(job_id).value)


def status(address: str, job_id: str, token: str | None = None) -> str:
    try:
        return str(client(address, token).get_job_status(job_id).value)
    except RuntimeError as e:
        raise UserError(f"job {job_id}: {str(e).splitlines()[0]}") from None


def stop(address: str, job_id: str, token: str | None = None) -> bool:
    try:
        return client(address, token).stop_job(job_id)
    except RuntimeError as e:
        raise UserError(f"job {job_id}: {str(e).splitlines()[0]}") from None
