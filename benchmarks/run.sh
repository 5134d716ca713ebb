#!/usr/bin/env bash
# Rerun the measurements behind benchmarks/RESULTS.md and the figures in README.md.
#
#   benchmarks/run.sh [--smoke] [SECTION ...]      no SECTION: all of 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 18
#
# Each section writes its tables (markdown) with their JSON beside them (the
# numbers, commit, uncommitted files, machine, command line, load average) into
# benchmarks/results/; at the end benchmarks/render.py copies them into the
# marked blocks of RESULTS.md and README.md.
# Sections run one after another (never two at once: they would time each
# other); one that fails does not stop the rest, and the exit status says so.
#
#   1 reference model, RTN W8 / W4       reference_model.py
#   2 every method, parallel/sequential  quality_matrix.py
#   3 against llm-compressor             compare_llmcompressor.py (tiny-lm parallel, sequential; 116M timing model)
#   4 size on disk of the export         export_sizes.py
#   5 orchestrator compare; MiniLM       effectiveness.py
#   6 memory: 3.26 GB model, planner     memory.py (runs compare_llmcompressor.py on the 3.26 GB model)
#   7 GPU workers (needs CUDA)           gpu.py (on a GPU machine, also benchmarks/gpu_check.sh by hand: a
#                                       >= 1B model, GPU vs CPU workers, the exported bytes compared,
#                                       llm-compressor on the GPU; under 5 minutes; not run from here)
#   8 faults injected, bad input         faults.py (pytest -m chaos, tests/test_bad_input.py)
#   9 recovery by distillation           recovery.py
#  10 a mixture-of-experts model         compare_llmcompressor.py (random Mixtral >= 1 GB, 8 experts, GPTQ W4);
#                                       moe_plan.py (the planner's expert split, predicted vs measured peak)
#  11 a real pretrained model (SmolLM2)  compare_llmcompressor.py (groups of 64, the peer at its defaults)
#  12 ablation on SmolLM2               ablation.py (each quality option alone, W4 and W3 g64, 3 seeds; the
#                                       options at W2, seed 0)
#  13 quality per bit, 3 seeds          compare_llmcompressor.py --seeds (tiny-lm, then SmolLM2: RTN and
#                                       GPTQ W4 / W3 g64, then GPTQ W2 g64 at its recipe's settings, the
#                                       peer at its defaults; Pareto plot PNG)
#  14 an encoder on sentences            encoder_calibration.py (MiniLM GPTQ W4 / W3: windows vs sentences)
#  15 recovery at low bits on SmolLM2    recovery_low_bits.py (GPTQ W3 / W2 g64, then the recover stage
#                                       training the weights; W2 again training the scales)
#  16 speed: the peer, the matmul limit  speed.py (91M and 116M random Llamas, GPTQ W4 g128 act-order, 128 x
#                                       256 tokens: ours 1 and 2 workers vs llm-compressor, 3 repeats; the
#                                       matmul limit; Ray's fixed cost); profile_worker.py (per phase, 2 blocks);
#                                       observer_norm.py (the MSE observer: stopped early vs every shrink, norm 2.4 vs 2.5)
#  18 the planner's cost model, plans    cost_model.py (predicted vs measured, 3 model sizes); plans.py (the
#                                       405B and 671B plans of cluster/PLANS.md, from config.json alone)
#
# --smoke: every script end to end on the micro reference model with a few
# short windows (and a tiny random Llama where a section builds one), into
# benchmarks/.work/smoke/results: a check that the scripts work, not results.
# Sections 3 and 6 need the peer's venv (benchmarks/.peer-venv); it is built
# here (benchmarks/setup_peer.sh, from PyPI) when missing.
set -uo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
smoke=()
results=benchmarks/results
work=benchmarks/.work
sections=()
for arg in "$@"; do
  case $arg in
    --smoke) smoke=(--smoke); results=benchmarks/.work/smoke/results; work=benchmarks/.work/smoke ;;
    [1-9]|1[0-6]|18) sections+=("$arg") ;;
    *) echo "usage: benchmarks/run.sh [--smoke] [SECTION ...]   (sections 1-16, 18)" >&2; exit 2 ;;
  esac
done
[ ${#sections[@]} -gt 0 ] || sections=(1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 18)
[ -x "$py" ] || { echo "error: $py not found: run scripts/setup.sh first" >&2; exit 2; }
mkdir -p "$results" "$work/logs"
exec 9>benchmarks/.work/run.lock
flock -n 9 || { echo "error: another benchmarks/run.sh is running (benchmarks/.work/run.lock)" >&2; exit 2; }

peer() { [ -x benchmarks/.peer-venv/bin/python ] || bash benchmarks/setup_peer.sh; }
bench() {  # bench SCRIPT SECTION-NAME [ARGS ...]: the script with --results, --work and --smoke
  local script=$1 name=$2
  shift 2
  "$py" "benchmarks/$script" --results "$results" --work "$work/$name" "${smoke[@]}" "$@"
}
compare() {  # compare WORK-NAME OUT-NAME [ARGS ...]
  local name=$1 out=$2
  shift 2
  "$py" benchmarks/compare_llmcompressor.py --work "$work/$name" --out "$results/$out.md" "${smoke[@]}" "$@"
}

section() {
  local only=()
  case $1 in
    1) bench reference_model.py 1-reference ;;
    2) [ ${#smoke[@]} -eq 0 ] || only=(--only gptq-w4g128)
       bench quality_matrix.py 2-quality "${only[@]}" ;;
    3) peer && compare tiny-lm 3-tiny-lm \
         && compare tiny-lm-sequential 3-tiny-lm-sequential --ours-calibration sequential \
         && compare timing 3-timing-model --timing-model ;;
    4) [ ${#smoke[@]} -eq 0 ] || only=(--only rtn-w4g128)
       bench export_sizes.py 4-export-sizes "${only[@]}" ;;
    5) bench effectiveness.py 5-effectiveness ;;
    6) peer && bench memory.py 6-memory ;;
    7) bench gpu.py 7-gpu ;;
    8) bench faults.py 8-faults ;;
    9) bench recovery.py 9-recovery ;;
    10) shape=1024,8,1792,16  # hidden, blocks, expert width, heads: 1.5 GB in float32
        [ ${#smoke[@]} -eq 0 ] || shape=128,2,256,2
        peer && compare moe 10-moe --timing-model --timing-experts 8 --timing-ppl --timing-shape "$shape" \
          --eval-max-windows 16 && bench moe_plan.py 10-moe-plan ;;
    11) model=(--model reference:smollm2 --calib-samples 64 --calib-seq-len 256 --eval-seq-len 256
               --eval-max-windows 64)  # issue 17's set-up: 64 x 256 calibration tokens, 64 x 256 held out
        [ ${#smoke[@]} -eq 0 ] || model=()
        peer && compare smollm2 11-smollm2 "${model[@]}" --group-size 64 --peer-defaults \
          --cases rtn-w4g128,gptq-w4g128,rtn-w3g128,gptq-w3g128,sparsegpt-50,wanda-50 ;;
    12) model=(--model reference:smollm2 --group-size 64 --calib-samples 64 --calib-seq-len 256 --eval-seq-len 256
               --eval-max-windows 64)
        [ ${#smoke[@]} -eq 0 ] || model=()
        bench ablation.py 12-ablation "${model[@]}" \
          && bench ablation.py 12-ablation-w2 "${model[@]}" --bits 2 --seeds 0 --table 12-ablation-smollm2-w2 \
               --only gptq-ao-mse-rot gptq-ao-mse-zp gptq-ao-mse-zp-rot gptq-ao-mse-zp-rot-seq-asym \
          && bench ablation.py 12-ablation-w2 "${model[@]}" --bits 2 --seeds 0 --table 12-ablation-smollm2-w2-more \
               --only gptq-ao-mse-zp-seq gptq-ao-mse-zp-seq-asym ;;
    13) cases=(--cases rtn-w4g128,gptq-w4g128,rtn-w3g128,gptq-w3g128 --group-size 64 --peer-defaults)
        model=(--model reference:smollm2 --calib-samples 64 --calib-seq-len 256 --eval-seq-len 256
               --eval-max-windows 64)
        [ ${#smoke[@]} -eq 0 ] || { cases=(--cases gptq-w4g128 --group-size 64); model=(); }
        peer && compare tiny-lm-seeds 13-tiny-lm-seeds "${cases[@]}" --seeds 0,1,2 \
             --pareto "$results/13-tiny-lm-pareto.png" \
          && compare smollm2-seeds 13-smollm2-seeds "${model[@]}" "${cases[@]}" --seeds 0,1,2 \
             --pareto "$results/13-smollm2-pareto.png" \
          && { [ ${#smoke[@]} -gt 0 ] || {  # W2 at its own recipe's settings (sequential, asymmetric)
               compare tiny-lm-w2 13-tiny-lm-w2 --cases gptq-w2g128 --group-size 64 --peer-defaults --seeds 0,1,2 \
               && compare smollm2-w2 13-smollm2-w2 "${model[@]}" --cases gptq-w2g128 --group-size 64 \
                    --peer-defaults --seeds 0,1,2; }; } ;;
    14) bench encoder_calibration.py 14-encoder ;;
    15) bench recovery_low_bits.py 15-recovery-smollm2 \
          && bench recovery_low_bits.py 15-recovery-w2-scales --bits 2 --train scales --lr 0.0001 \
               --table 15-recovery-smollm2-w2-scales ;;
    16) peer && bench speed.py 16-speed && bench profile_worker.py 16-profile \
          && bench observer_norm.py 16-observer-norm ;;
    18) bench cost_model.py 18-cost-model && bench plans.py 18-plans ;;
  esac
}

failed=()
for s in "${sections[@]}"; do
  echo "=== section $s ($(date +%H:%M:%S), load $(cut -d' ' -f1-3 /proc/loadavg))" >&2
  start=$SECONDS
  if section "$s" 2>&1 | tee "$work/logs/section-$s.log"; then
    echo "=== section $s done in $((SECONDS - start)) s" >&2
  else
    echo "=== section $s FAILED after $((SECONDS - start)) s (log: $work/logs/section-$s.log)" >&2
    failed+=("$s")
  fi
done
echo "results in $results" >&2
# the tables into README.md and RESULTS.md (their marked blocks; tests/test_docs.py checks they match)
[ ${#smoke[@]} -gt 0 ] || "$py" benchmarks/render.py || failed+=(render)
[ ${#failed[@]} -eq 0 ] || { echo "failed sections: ${failed[*]}" >&2; exit 1; }
