#!/usr/bin/env bash
# Create benchmarks/.peer-venv with llm-compressor (the peer tool) for
# compare_llmcompressor.py. Idempotent: a second run installs nothing new and
# only checks the pins.
#
# torch==2.13.0 goes in first (the CPU build from local disk; an unpinned torch
# would pull a multi-GB CUDA build) and stays pinned through the constraints
# file, which also pins llmcompressor, compressed-tensors and transformers to
# the set verified to install and run here. Never install these into the
# project's .venv: llmcompressor 0.14 needs transformers <= 5.17.
set -euo pipefail
cd "$(dirname "$0")"
python=${PYTHON:-python3}
venv=.peer-venv
export PIP_DISABLE_PIP_VERSION_CHECK=1
quiet_pip() {  # pip, without the local index's "Location ... is ignored" noise
    "$venv/bin/pip" "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
quiet_pip install --quiet torch==2.13.0
quiet_pip install --quiet -c peer-constraints.txt llmcompressor psutil
"$venv/bin/python" - <<'PY'
import importlib.metadata as md

want = {}
for line in open("peer-constraints.txt"):
    line = line.split("#")[0].strip()
    if "==" in line:
        name, version = line.split("==")
        want[name] = version
bad = [f"{n}=={md.version(n)} (want {v})" for n, v in want.items() if md.version(n).split("+")[0] != v]
if bad:
    raise SystemExit("peer venv has the wrong versions: " + ", ".join(bad))
import torch

assert torch.version.cuda is None, f"peer venv got a CUDA torch ({torch.__version__})"
from llmcompressor import oneshot  # noqa: F401  (imports cleanly)
from llmcompressor.modifiers.gptq import GPTQModifier  # noqa: F401
from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier  # noqa: F401

print("peer venv ok:", ", ".join(f"{n}=={md.version(n)}" for n in list(want)[:4]))
PY
