"""Section 7's check on one GPU (issue 18): GPU workers against CPU workers on a >= 1B model, same bytes?

    benchmarks/gpu_check.sh [--samples 16] [--seq-len 512] [--shape 2048,16,8192,16,32000] [--no-peer]

(the shell script runs this file with a time limit). Needs CUDA in the project's venv; without it,
it prints "no CUDA device: not run" (and why: no GPU, or a torch built without CUDA) and exits 0,
writing nothing. With it, on a random Llama built here (common.random_llama, float32, default
hidden 2048, 16 layers, ffn 8192, 16 heads, vocab 32000: 1.2B parameters; nothing is downloaded: the
tokenizer is reference:tiny-lm's, from benchmarks/.work/gpu-check/tokenizer when the cache lacks it):
  1. the calibration ids, once (compare_llmcompressor.save_calibration), 16 x 512 by default;
  2. `orchestrator run recipes/gptq-w4g128.yaml` with cluster.gpus_per_worker=auto (2 workers sharing
     the GPU), then again with cluster.gpus_per_worker=0 (CPU workers, half the cores each): the same
     model and ids;
  3. benchmarks/compare_exports.py on the two exports: the fraction of packed integers that differ and
     the largest scale difference (float32 kernels differ between CPU and GPU in summation order, so
     a few integers at rounding boundaries may differ);
  4. llm-compressor 0.14 at its defaults on the same ids (benchmarks/.peer-venv; skipped, and said so,
     when its torch has no CUDA: a CPU run of the peer would not fit the time);
and writes results/7-gpu-check.md/.json after each step (a run cut short leaves what it measured).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import RESULTS, ROOT, WORK, Bench, fmt, parse_shape, random_llama, table
from compare_exports import compare
from compare_llmcompressor import PEER_PYTHON, check_same_calibration, run_ours, run_peer, save_calibration

RECIPE = "gptq-w4g128"
SHAPE = "2048,16,8192,16,32000"  # 1.21B parameters
TOKENIZER = WORK / "gpu-check" / "tokenizer"  # carried to a machine without the reference cache


def no_cuda_reason() -> str | None:
    """None when CUDA works in this venv, else why not."""
    import torch

    if torch.cuda.is_available():
        return None
    gpus = shutil.which("nvidia-smi") and subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout
    if gpus and gpus.strip() and torch.version.cuda is None:
        return f"a GPU is present ({gpus.strip().splitlines()[0]}) but this venv's torch {torch.__version__} has no CUDA"
    return f"torch {torch.__version__}, torch.cuda.is_available() is False"


def peer_cuda() -> dict:
    """Whether the peer venv's torch sees CUDA."""
    code = "import json, torch; print(json.dumps({'torch': torch.__version__, 'cuda': torch.cuda.is_available()}))"
    out = subprocess.run([str(PEER_PYTHON), "-c", code], capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else {"error": out.stderr[-500:]}


def tokenizer_dir() -> Path:
    """reference:tiny-lm's folder from the cache if it is there (never built here), else TOKENIZER."""
    from orchestrator.reference import cache_key, cache_root, reference_spec

    cached = cache_root() / "reference" / f"tiny-lm-{cache_key(reference_spec('tiny-lm'))}"
    if (cached / "tokenizer.json").exists():
        return cached
    if (TOKENIZER / "tokenizer.json").exists():
        return TOKENIZER
    raise SystemExit(f"no tokenizer: neither {cached} nor {TOKENIZER} (run benchmarks/gpu_check.sh --prepare "
                     "where reference:tiny-lm is cached, and carry benchmarks/.work/gpu-check)")


def prepare() -> int:
    """Copy reference:tiny-lm's tokenizer files to TOKENIZER (to carry to the GPU machine)."""
    from common import resolve_model

    src = resolve_model("reference:tiny-lm")
    TOKENIZER.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            shutil.copy(f, TOKENIZER / f.name)
    print(f"copied the tokenizer of {src} to {TOKENIZER}")
    return 0


def ours(label: str, gpus: str, m: dict, args, cpus: int) -> dict:
    """One of our runs -> its record."""
    over = [*m["overrides"], f"cluster.gpus_per_worker={gpus}", f"cluster.cpus_per_worker={cpus}"]
    meas, report, model = run_ours(RECIPE, Path(m["dir"]), args.work, over, 2, label.replace(" ", "-"))
    check_same_calibration(RECIPE, report, m["sha256"])
    devices = sorted({s.get("worker", {}).get("device", "?") for s in report.get("shards", [])})
    return {"label": label, "wall_s": meas.wall_s, "peak_rss_mb": meas.peak_rss_mb,
            "compress_s": report["timing"]["phases"].get("compress"), "phases": report["timing"]["phases"],
            "gpus_per_worker": (report.get("cluster") or {}).get("gpus_per_worker"), "devices": devices,
            "export": str(model), "log": meas.log}


def markdown(m: dict, runs: list[dict], check: dict | None, peer_note: str) -> tuple[str, str]:
    rows = [[r["label"], ", ".join(r.get("devices") or ["n/a"]), fmt(r.get("compress_s"), 1), fmt(r["wall_s"], 1),
             fmt(r["peak_rss_mb"], 0)] for r in runs]
    by = {r["label"]: r for r in runs}
    notes = [f"`{m['dir']}`: random Llama, {m['params'] / 1e9:.2f}B parameters, float32; GPTQ W4 g128 act-order "
             f"(recipes/{RECIPE}.yaml, evaluation off), {m['calibration']} calibration ids, the same for every "
             f"run; ours with 2 workers. {peer_note}"]
    if "ours GPU" in by and "cuda" not in by["ours GPU"]["devices"]:
        notes.append("**The GPU run's workers computed on " + ", ".join(by["ours GPU"]["devices"]) + ", not CUDA.**")
    if "ours GPU" in by and "ours CPU" in by:
        g, c = by["ours GPU"], by["ours CPU"]
        notes.append(f"Speed-up of GPU workers over CPU workers: compress {fmt(c['compress_s'] / g['compress_s'])}x, "
                     f"whole run {fmt(c['wall_s'] / g['wall_s'])}x.")
    if check:
        p, s = check["packed"], check["scales"]
        notes.append("Exports, GPU against CPU: " + ("identical bit for bit." if check["identical"] else
                     f"{p['differ']} of {p['integers']} packed integers differ ({fmt(100 * (p['fraction_differ'] or 0), 4)}%), "
                     f"in {p['tensors_differ']} tensors; largest scale difference {s['max_abs']:.3g} "
                     f"(relative {s['max_rel']:.3g}); other tensors differing: {check['other']['tensors_differ']}."))
    return "\n\n".join(notes), table(["run", "device", "compress s (ours: phase; peer: oneshot)", "wall s",
                                      "peak RSS MB"], rows)


def setup(args) -> dict:
    """Build the model (cached) and save the calibration ids -> the facts every run needs."""
    from orchestrator.recipe import load_recipe

    t0 = time.perf_counter()
    model_dir, params = random_llama(args.work / "models", tokenizer_dir(), **parse_shape(args.shape))
    built = time.perf_counter() - t0
    cal_over = [f"data.calibration.num_samples={args.samples}", f"data.calibration.seq_len={args.seq_len}"]
    cal = load_recipe(ROOT / "recipes" / f"{RECIPE}.yaml", [f"model.path={model_dir}", *cal_over]).config.data.calibration
    calib = args.work / f"calib-{args.samples}x{args.seq_len}.safetensors"
    ids, digest = save_calibration(model_dir, cal, calib)
    return {"dir": str(model_dir), "params": params, "build_s": built, "calib": str(calib), "sha256": digest,
            "calibration": f"{ids.shape[0]} x {ids.shape[1]}", "batch_size": cal.batch_size,
            "overrides": [*cal_over, "data.eval.enabled=false"]}


def run_all(args, bench: Bench) -> None:
    import torch

    m, runs, check = setup(args), [], None
    peer_env = peer_cuda() if PEER_PYTHON.exists() else {"error": f"{PEER_PYTHON} not found"}
    run_peer_too = not args.no_peer and peer_env.get("cuda") is True
    peer_note = ("llm-compressor 0.14 at its defaults on the same ids, its torch " + str(peer_env.get("torch"))
                 + " with CUDA (its sequential pipeline places the layers on the GPU itself)." if run_peer_too else
                 f"llm-compressor not run: {'--no-peer' if args.no_peer else peer_env.get('error') or 'its venv torch ' + str(peer_env.get('torch')) + ' has no CUDA (a CPU-only build)'}.")
    cpus = max(1, (os.cpu_count() or 2) // 2)

    def write() -> None:
        notes, tab = markdown(m, runs, check, peer_note)
        bench.write(args.results / "7-gpu-check.md", "Section 7 check: GPU workers on a >= 1B model", tab,
                    {"model": m, "runs": runs, "check": check, "peer_env": peer_env,
                     "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}, notes)

    runs.append(ours("ours GPU", "auto", m, args, cpus))
    write()
    runs.append(ours("ours CPU", "0", m, args, cpus))
    check = compare(Path(runs[0]["export"]), Path(runs[1]["export"]))
    write()
    if run_peer_too:  # last: the check above is what must fit the time
        meas, peer, _ = run_peer(RECIPE, Path(m["dir"]), Path(m["calib"]), args.work, m["batch_size"],
                                 extra=["--defaults"], name="peer-gpu")
        runs.append({"label": "llm-compressor", "devices": ["cuda (its own placement)"], "wall_s": meas.wall_s,
                     "peak_rss_mb": meas.peak_rss_mb, "compress_s": peer["timing"]["oneshot_s"],
                     "timing": peer["timing"], "log": meas.log})
        write()
    print(json.dumps({"runs": runs, "check": check}, indent=2, default=str))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prepare", action="store_true", help="only copy the tokenizer to carry (no GPU needed)")
    p.add_argument("--shape", default=SHAPE, help="hidden,layers,ffn,heads,vocab (default %(default)s)")
    p.add_argument("--samples", type=int, default=16, help="calibration windows (default %(default)s: 16 x 512 "
                   "tokens keep the CPU run of the 1.2B model near 2 minutes on 16 cores, by our estimate)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--no-peer", action="store_true")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--work", type=Path, default=WORK / "gpu-check")
    args = p.parse_args(argv)
    if args.prepare:
        return prepare()
    reason = no_cuda_reason()
    if reason:
        print(f"no CUDA device: not run ({reason})")
        return 0
    args.work = args.work.resolve()
    with Bench() as bench:
        run_all(args, bench)
    return 0


if __name__ == "__main__":
    sys.exit(main())
