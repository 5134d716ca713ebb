#!/usr/bin/env bash
# Section 7's check on one GPU (issue 18), in under 5 minutes: GPTQ W4 g128 on a random 1.2B Llama with
# GPU workers, then CPU workers on the same model and ids, the exported bytes compared
# (benchmarks/compare_exports.py), then llm-compressor 0.14 on the same GPU (when its venv's torch has CUDA). Writes
# benchmarks/results/7-gpu-check.md/.json (details: benchmarks/gpu_check.py).
#
#   benchmarks/gpu_check.sh [--samples 16] [--seq-len 512] [--shape H,L,F,HEADS,VOCAB] [--no-peer]
#   benchmarks/gpu_check.sh --prepare   # here, before going to a machine without the reference cache:
#                                       # copies tiny-lm's tokenizer to benchmarks/.work/gpu-check/tokenizer
#
# Without CUDA it prints "no CUDA device: not run (...)" and exits 0, writing nothing. Nothing is
# downloaded: the GPU machine needs the repository, .venv and benchmarks/.peer-venv, and the tokenizer
# (the reference cache, or benchmarks/.work/gpu-check/tokenizer). GPU_CHECK_LIMIT (seconds, default 290)
# bounds the whole check; the results file is rewritten after each run, so a cut leaves what was measured.
set -uo pipefail
cd "$(dirname "$0")/.."
py=${PY:-.venv/bin/python}
[ -x "$py" ] || { echo "error: $py not found" >&2; exit 2; }
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
timeout --kill-after=10 "${GPU_CHECK_LIMIT:-290}" "$py" benchmarks/gpu_check.py "$@"
rc=$?
[ $rc -ne 124 ] || echo "gpu_check: stopped at ${GPU_CHECK_LIMIT:-290} s; benchmarks/results/7-gpu-check.md holds what finished" >&2
exit $rc
