"""Helpers the test modules share (imported as `tests.helpers`): the repository root, the CLI in a fresh
process, a free port, an `orchestrator ui` server, the exported files' hashes, an export loaded back."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from orchestrator.checkpoint import file_sha256

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """`orchestrator ARGS` in a fresh process, as a user would type it."""
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def ui_server(store: str, cwd: Path):
    """`orchestrator ui` on a free port, answering /health; -> the port."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "ui", "--uri", store, "--port", str(port)],
                            cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline, body = time.time() + 120, None
        while time.time() < deadline and proc.poll() is None:
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
                break
            except OSError:
                time.sleep(0.5)
        assert body == b"OK", proc.stdout.read1().decode() if proc.poll() is not None else "no answer"
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def hashes(run_dir: Path) -> dict[str, str]:
    """The exported weights, their index and config (recipe.yaml and the manifest name the run, so differ)."""
    files = [*sorted((run_dir / "model").glob("*.safetensors")), run_dir / "model" / "model.safetensors.index.json",
             run_dir / "model" / "config.json"]
    return {p.name: file_sha256(p) for p in files}


def load_export(folder, encoder: bool = False):
    """A run's exported model as transformers loads it, its packed weights unpacked
    (compressed-tensors decompresses on the first forward pass)."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    model = (AutoModel if encoder else AutoModelForCausalLM).from_pretrained(folder).eval()
    with torch.no_grad():
        model(input_ids=torch.zeros(1, 4, dtype=torch.long))
    return model
