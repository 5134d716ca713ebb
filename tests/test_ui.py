"""`orchestrator ui` serves the MLflow UI on 127.0.0.1 over the run store."""

import json
import subprocess

from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from tests.helpers import REPO, run_cli, ui_server

pytestmark = pytest.mark.slow


def listening_addresses(port: int) -> set[str]:
    """The local addresses (IPv4 and IPv6) that any process on this machine listens on at `port`."""
    return {c.laddr.ip for c in psutil.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port}


def test_ui_serves_the_store_on_localhost(tmp_path):
    """The server answers on 127.0.0.1 and listens on no other address (not 0.0.0.0, not ::): nothing
    outside this machine can reach it, whatever interfaces the machine has."""
    with ui_server(f"sqlite:///{tmp_path}/m.db", tmp_path) as port:
        assert listening_addresses(port) == {"127.0.0.1"}


ARTIFACTS = REPO / "test-artifacts"  # git-ignored
CHROMIUM = "/usr/bin/chromium"  # Debian's package; scripts/setup.sh installs it where it can
HEADLESS = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.mark.browser
def test_a_logged_run_is_readable_in_the_mlflow_ui(tmp_path, micro_lm):
    """A compression logged to a live `mlflow server`, then its run page rendered by headless Chromium."""
    assert Path(CHROMIUM).exists(), "install Debian's chromium (scripts/setup.sh does where apt-get is allowed)"
    with ui_server(f"sqlite:///{tmp_path}/server.db", tmp_path) as port:
        uri = f"http://127.0.0.1:{port}"
        proc = run_cli("run", str(REPO / "recipes" / "rtn-w4g128.yaml"), f"model.path={micro_lm}",
                       f"tracking.uri={uri}", "tracking.experiment=browser", f"output.dir={tmp_path}/runs",
                       "output.name=ui-run", "data.eval.max_windows=8", "--quiet", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
        report = json.loads((tmp_path / "runs" / "ui-run" / "report.json").read_text())
        run_id = report["mlflow"]["run_id"]
        experiment_id = MlflowClient(tracking_uri=uri).get_run(run_id).info.experiment_id
        page = f"{uri}/#/experiments/{experiment_id}/runs/{run_id}"
        browse = [*HEADLESS, f"--user-data-dir={tmp_path}/chromium", "--virtual-time-budget=20000"]
        dom = subprocess.run([*browse, "--dump-dom", page], capture_output=True, text=True, timeout=180).stdout
        shot = ARTIFACTS / "mlflow-run-page.png"  # kept after the run, for a person to look at
        shot.parent.mkdir(exist_ok=True)
        shot.unlink(missing_ok=True)
        subprocess.run([*browse, "--window-size=1400,1000", f"--screenshot={shot}", page],
                       capture_output=True, timeout=180)
    assert "ui-run" in dom  # the run's name, rendered by the UI's JavaScript from the server's API
    for metric in ("quality.compressed.perplexity", "size.compression_ratio", "quality.kl_nats_per_token"):
        assert metric in dom, metric
    assert f"{report['quality']['compressed']['perplexity']:.4f}"[:6] in dom  # the value, as the UI shows it
    assert "stages.0.method" in dom and "rtn" in dom  # a flattened recipe parameter
    assert shot.read_bytes().startswith(b"\x89PNG") and shot.stat().st_size > 10_000
