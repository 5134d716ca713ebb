"""`orchestrator ui` serves the MLflow UI on 127.0.0.1 over the run store."""

import socket
import subprocess
import sys
import time
import urllib.request

import psutil
import pytest

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def non_loopback_addresses() -> list[str]:
    return [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
            if a.family == socket.AF_INET and not a.address.startswith("127.")]


def test_ui_serves_the_store_on_localhost(tmp_path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "ui", "--uri", f"sqlite:///{tmp_path}/m.db",
                             "--port", str(port)], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline, body = time.time() + 120, None
        while time.time() < deadline and proc.poll() is None:
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
                break
            except OSError:
                time.sleep(0.5)
        assert body == b"OK", proc.stdout.read1().decode() if proc.poll() is not None else "no answer"
        for external in non_loopback_addresses():  # bound to loopback only
            with pytest.raises(OSError):
                socket.create_connection((external, port), timeout=2)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
