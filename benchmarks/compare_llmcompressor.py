"""Side by side: our `orchestrator run` against llm-compressor's `oneshot`, same model, same calibration ids.

Runs in the project's venv; llm-compressor runs in its own (benchmarks/.peer-venv,
made by benchmarks/setup_peer.sh) through benchmarks/peer_llmcompressor.py.

    .venv/bin/python benchmarks/compare_llmcompressor.py                 # tiny-lm, all five cases
    .venv/bin/python benchmarks/compare_llmcompressor.py --smoke --out /tmp/smoke.md  # micro-lm, 2 cases, short
    .venv/bin/python benchmarks/compare_llmcompressor.py --timing-model  # >= 100M random Llama, GPTQ W4 g128, timing only

(benchmarks/run.sh 3 runs it three times, run.sh 6 once more on a 3.26 GB model.)

Per case (recipes/<case>.yaml):
  1. the calibration ids, computed once with our `calibration_windows` from the
     recipe's data.calibration settings, saved as safetensors (key input_ids);
  2. our tool as a subprocess (`orchestrator run recipes/<case>.yaml
     model.path=<dir> cluster.workers=2 tracking.enabled=false output.dir=<work>`),
     then the peer script as a subprocess of the peer venv's python, one after
     the other, each timed (wall) and sampled every 0.1 s for the summed RSS of
     the process and all its descendants (our Ray head, raylet and workers are
     descendants of the driver); the sum of PSS is sampled too (every 1 s),
     since summed RSS counts shared pages (libraries, Ray's object store) once
     per process;
  3. our report.json's calibration.sha256 must equal sha256 of the saved ids'
     numpy bytes (the hash data.py computes), or the run stops;
  4. both outputs evaluated with OUR orchestrator.evaluate.perplexity (same
     held-out windows, same code), and the dense model once.
Writes a markdown table (--out) and the same numbers as JSON next to it, with the
provenance (commit, machine, command, load) that benchmarks/common.py records.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import psutil

from common import (BENCH, ROOT, SMOKE_MODEL, WORK, Bench, clean_env, fmt, orchestrator_cmd, parse_shape,
                    random_llama, resolve_model, tail)

PEER_PYTHON = BENCH / ".peer-venv" / "bin" / "python"
PEER_SCRIPT = BENCH / "peer_llmcompressor.py"
CASES = ["gptq-w4g128", "gptq-w3g128", "gptq-w2g128", "sparsegpt-50", "wanda-50", "wanda-2of4", "rtn-w4g128", "rtn-w3g128"]
QUANTIZED = {"gptq-w4g128", "gptq-w3g128", "gptq-w2g128", "rtn-w4g128", "rtn-w3g128"}  # --group-size applies to these
DATA_FREE = {"rtn-w4g128", "rtn-w3g128"}
DEFAULT_CASES = [c for c in CASES if c != "gptq-w2g128"]


# ---------------------------------------------------------------- measurement

@dataclass
class Measured:
    cmd: list[str]
    returncode: int
    wall_s: float
    peak_rss_mb: float  # max over samples of sum(RSS) over the process tree
    peak_pss_mb: float | None  # max over samples of sum(PSS) (None: not readable)
    peak_procs: int  # most processes seen in the tree at once
    samples: int
    log: str
    procs_at_peak: list[str] = field(default_factory=list)
    cpu_s: dict[str, float] = field(default_factory=dict)  # CPU seconds (user + system) by process_kind
    started_at: float = 0.0  # epoch seconds at the command's start (to place a report's epoch times in its wall)


def process_kind(proc: psutil.Process, root: psutil.Process) -> str | None:
    """The command's own process, our Ray actors (ray::CompressionWorker...), or Ray's other processes
    (GCS, raylet, agents, monitors, task workers); None for a process that shows no title (exiting)."""
    if proc.pid == root.pid:
        return "command"
    title = proc.cmdline()
    if not title:
        return None
    return "workers" if title[0].startswith("ray::CompressionWorker") else "ray"


def _tree(root: psutil.Process) -> list[psutil.Process]:
    try:
        return [root] + root.children(recursive=True)
    except psutil.Error:
        return [root]


def run_measured(cmd: list[str], cwd: Path, log_path: Path, env: dict | None = None,
                 interval: float = 0.1, pss_every: int = 10) -> Measured:
    """Run cmd to completion; wall time, peak summed RSS (and PSS) of its whole process tree, and the CPU
    seconds of its processes by kind (each process's at its last sample: up to `interval` short)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        started_at, t0 = time.time(), time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=env)
        root = psutil.Process(proc.pid)
        peak_rss = peak_pss = 0
        pss_ok = True
        peak_procs = samples = 0
        at_peak: list[str] = []
        cpu: dict[int, tuple[str, float]] = {}  # pid -> (kind, CPU seconds) at its last sample (an actor's
        # process starts as a plain Ray worker and takes the actor's title once it is one; an exiting one
        # shows none and keeps its kind)
        while proc.poll() is None:
            procs = _tree(root)
            rss = 0
            names = []
            for p in procs:
                try:
                    r = p.memory_info().rss
                    rss += r
                    names.append(f"{p.pid}:{p.name()}:{r >> 20}MB")
                    t = p.cpu_times()
                    kind = process_kind(p, root) or cpu.get(p.pid, ("ray",))[0]
                    cpu[p.pid] = (kind, t.user + t.system)
                except psutil.Error:
                    pass
            if rss > peak_rss:
                peak_rss, at_peak = rss, names
            if pss_ok and samples % pss_every == 0:
                pss = 0
                for p in procs:
                    try:
                        pss += p.memory_full_info().pss
                    except psutil.NoSuchProcess:
                        pass
                    except (psutil.AccessDenied, AttributeError):
                        pss_ok = False
                        break
                peak_pss = max(peak_pss, pss)
            peak_procs = max(peak_procs, len(procs))
            samples += 1
            time.sleep(interval)
        wall = time.perf_counter() - t0
    by_kind: dict[str, float] = {}
    for kind, seconds in cpu.values():
        by_kind[kind] = by_kind.get(kind, 0.0) + seconds
    return Measured(cmd, proc.returncode, wall, peak_rss / 2**20, peak_pss / 2**20 if pss_ok else None,
                    peak_procs, samples, str(log_path), at_peak, by_kind, started_at)


# ---------------------------------------------------------------- the two tools

def run_ours(case: str, model_dir: Path, work: Path, overrides: list[str], workers: int,
             name: str | None = None) -> tuple[Measured, dict, Path]:
    """Our tool on recipes/<case>.yaml; its run folder and log are called `name` (default: the case)."""
    out_root, name = work / "ours", name or case
    cmd = orchestrator_cmd() + ["run", str(ROOT / "recipes" / f"{case}.yaml"), f"model.path={model_dir}",
                                f"cluster.workers={workers}", "tracking.enabled=false", f"output.dir={out_root}",
                                f"output.name={name}", *overrides, "--overwrite", "--quiet"]
    m = run_measured(cmd, cwd=work, log_path=work / "logs" / f"ours-{name}.log", env=clean_env())
    if m.returncode != 0:
        raise SystemExit(f"our tool failed on {case} (exit {m.returncode}): {' '.join(cmd)}\n{tail(m.log)}")
    run_dir = out_root / name
    report = json.loads((run_dir / "report.json").read_text())
    return m, report, run_dir / "model"


def run_peer(case: str, model_dir: Path, calib_path: Path, work: Path, batch_size: int,
             ignore: list[str] = (), extra: list[str] = (), name: str | None = None) -> tuple[Measured, dict, Path]:
    name = name or case
    out = work / "peer" / name
    if out.exists():
        shutil.rmtree(out)
    cmd = [str(PEER_PYTHON), str(PEER_SCRIPT), str(model_dir), str(calib_path), case, str(out),
           "--batch-size", str(batch_size), *extra] + (["--ignore", *ignore] if ignore else [])
    m = run_measured(cmd, cwd=work, log_path=work / "logs" / f"peer-{name}.log", env=clean_env())
    if m.returncode != 0:
        raise SystemExit(f"llm-compressor failed on {case} (exit {m.returncode}): {' '.join(cmd)}\n{tail(m.log)}")
    return m, json.loads((out / "peer.json").read_text()), out / "model"


# ---------------------------------------------------------------- calibration, checks

def save_calibration(model_dir: Path, cfg, path: Path):
    """Our calibration_windows(tokenizer, cfg) -> saved ids; returns (ids, sha256 of their numpy bytes)."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from orchestrator.data import calibration_windows

    calib = calibration_windows(AutoTokenizer.from_pretrained(model_dir), cfg)
    ids = calib.input_ids.contiguous()
    save_file({"input_ids": ids}, str(path))
    digest = hashlib.sha256(ids.numpy().tobytes()).hexdigest()
    if digest != calib.sha256:
        raise SystemExit(f"calibration hash mismatch inside data.py: {digest} != {calib.sha256}")
    return ids, digest


def check_same_calibration(case: str, report: dict, digest: str) -> None:
    theirs = (report.get("calibration") or {}).get("sha256")
    if theirs is None and case in DATA_FREE:  # RTN reads no calibration data, in neither tool
        return
    if theirs != digest:
        raise SystemExit(f"FAIL {case}: our tool calibrated on different token ids than the ones given to the peer: "
                         f"report.json calibration.sha256={theirs}, saved ids sha256={digest}")


def linear_summary(dense_dir: Path, out_dir: Path) -> dict:
    """Which block Linear weights (and MoE experts' matrices) differ from the dense model, and their zero fraction."""
    import torch
    from transformers import AutoModelForCausalLM

    def weights(d):
        model = AutoModelForCausalLM.from_pretrained(d, dtype="float32").eval()
        with torch.no_grad():  # a compressed-tensors checkpoint (the peer's) decompresses on its first forward
            model(input_ids=torch.zeros(1, 2, dtype=torch.long))
        found = {n: m.weight.detach() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        for n, p in model.named_parameters():  # fused MoE experts [E, out, in]: one matrix per expert
            if p.dim() == 3 and ".experts." in n:
                found.update({f"{n}.{e}": p[e].detach() for e in range(p.shape[0])})
        return found

    dense, out = weights(dense_dir), weights(out_dir)
    changed = sorted(n for n in dense if not torch.equal(dense[n], out[n]))
    zeros = sum(int((out[n] == 0).sum()) for n in changed)
    numel = sum(out[n].numel() for n in changed)
    kinds = sorted({n.rsplit(".", 1)[-1] for n in changed})
    return {"changed": len(changed), "linears": len(dense), "changed_kinds": kinds,
            "lm_head_changed": any(n.endswith("lm_head") for n in changed),
            "zero_fraction": zeros / numel if numel else 0.0, "changed_names": changed}


def parameter_count(model_dir: Path) -> int:
    """Elements of every tensor in a folder's safetensors files (read from their headers)."""
    from safetensors import safe_open

    total = 0
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            total += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
    return total


def disk_bits_per_weight(model_dir: Path, dense_params: int) -> float:
    """Bytes of a model folder's safetensors files x 8 / the dense model's parameters: both tools' exports
    counted alike, every stored byte (packed weights, scales, zeros, dense embeddings and head)."""
    return sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) * 8 / dense_params


def pareto(rows: list[dict], model_dir: Path, path: Path) -> Path | None:
    """Bits per weight on disk against perplexity, one point per tool and case (the first seed's run),
    drawn by `orchestrator compare`'s Pareto plot."""
    from orchestrator.plots import pareto_plot

    first_seed = [r for r in rows if r.get("ours_ppl") is not None and r.get("seed") == rows[0].get("seed")]
    if not first_seed:
        return None
    points = [{"label": f"{tool} {r['case']}", "bits": r[f"{tool}_bits_per_weight"], "quality": r[f"{tool}_ppl"]}
              for r in first_seed for tool in ("ours", "peer")]
    dense = {"label": "dense", "bits": disk_bits_per_weight(model_dir, parameter_count(model_dir)),
             "quality": first_seed[0]["dense_ppl"]}
    return pareto_plot(points, dense, "perplexity (held-out windows)", lower_is_better=True, path=path)


LOAD_TOLERANCE = 1e-3  # max |logit difference| above which the peer's checkpoint does not load as it was


def load_peer(model_dir: Path, threads: int):
    """The peer's checkpoint as our venv's transformers loads it -> (model, the names of the model's tensors
    it left unset: transformers initialises those at random). llm-compressor 0.14 saves an MoE model's
    experts under its own linearized names (mlp.experts.E.gate_proj ...), which transformers does not map
    into its fused expert parameters; those are filled from compressed-tensors' own decoding of the
    peer's packed tensors (gate_up_proj [E, 2I, H] = gate over up, down_proj [E, H, I]), and the result is
    checked against the peer's in-venv logits (peer_logits_check) before its perplexity counts."""
    import re

    import torch
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from orchestrator.evaluate import load

    _, info = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto", output_loading_info=True)
    model, missing = load(model_dir, True, threads), list(info["missing_keys"])
    fused = [k for k in missing if re.fullmatch(r".*\.experts\.(gate_up_proj|down_proj)", k)]
    if not fused:
        return model, missing
    quant = json.loads((model_dir / "config.json").read_text())["quantization_config"]
    (group,) = quant["config_groups"].values()
    scheme = QuantizationScheme(**{**group, "format": quant["format"]})
    compressor = BaseCompressor.get_value_from_registry(quant["format"])
    tensors = {k: v for f in sorted(model_dir.glob("*.safetensors")) for k, v in load_file(f).items()}

    def decoded(block: str, expert: int, projection: str) -> torch.Tensor:
        """One expert's projection, saved as e.g. model.layers.0.block_sparse_moe.experts.3.gate_proj.*"""
        name = re.compile(rf"{re.escape(block)}\.[^.]+\.experts\.{expert}\.{projection}\.")
        local = {k[name.match(k).end():]: v for k, v in tensors.items() if name.match(k)}
        return compressor.decompress(local, scheme)["weight"]

    with torch.no_grad():
        for key in fused:  # e.g. model.layers.0.mlp.experts.gate_up_proj
            block, kind = key.rsplit(".", 3)[0], key.rsplit(".", 1)[1]
            param = model.get_parameter(key)
            projections = ["gate_proj", "up_proj"] if kind == "gate_up_proj" else ["down_proj"]
            for e in range(param.shape[0]):
                param[e] = torch.cat([decoded(block, e, p) for p in projections]).to(param.dtype)
            missing.remove(key)
    return model, missing


def peer_logits_check(model, peer_out: Path) -> float:
    """Max |logit difference| between the peer's in-venv model and its checkpoint as loaded here."""
    import torch
    from safetensors.torch import load_file

    ref = load_file(str(peer_out / "peer_logits.safetensors"))
    with torch.no_grad():
        logits = model(input_ids=ref["input_ids"][None]).logits[0].float()
    return float((logits - ref["logits"]).abs().max())


def peer_ppl_cell(r: dict) -> str:
    """The peer's perplexity, or why it says nothing: its checkpoint did not load as it was saved."""
    err, missing = r.get("peer_logit_max_err"), r.get("peer_missing_tensors") or 0
    if err is not None and (err > LOAD_TOLERANCE or missing):
        return f"not valid: its checkpoint loads {missing} tensors short (logit error {err:.3g})"
    return fmt(r.get("peer_ppl"), 3)


# ---------------------------------------------------------------- tables

def ratio(a, b):
    return None if a is None or b in (None, 0) else a / b


def increase_ratio(dense: float, ours: float, peer: float) -> float | None:
    """Our perplexity increase over the peer's; None unless both increased (a random model's perplexity
    can fall under quantization noise: a ratio of two falls says nothing)."""
    return ratio(ours - dense, peer - dense) if min(ours, peer) > dense else None


def mean_spread(values: list[float]) -> str:
    """'mean ± sample standard deviation' (just the value for one)."""
    mean = statistics.fmean(values)
    return fmt(mean, 3) if len(values) < 2 else f"{fmt(mean, 3)} ± {fmt(statistics.stdev(values), 3)}"


def seed_summary(rows: list[dict]) -> list[str]:
    """Per case over the calibration seeds: perplexity increase of each tool (mean ± std) and the ratio of
    the means, with the range of the per-seed ratios."""
    lines = ["Over the calibration seeds (perplexity increase over dense, mean ± sample standard deviation):", "",
             "| case | seeds | ours increase | peer increase | ratio of means (ours/peer) | per-seed ratios |",
             "|---|---|---|---|---|---|"]
    for case in dict.fromkeys(r["case"] for r in rows):
        done = [r for r in rows if r["case"] == case and r.get("ours_ppl") is not None]
        if not done:
            continue
        ours = [r["ours_ppl"] - r["dense_ppl"] for r in done]
        peer = [r["peer_ppl"] - r["dense_ppl"] for r in done]
        ratios = [r["ppl_increase_ratio"] for r in done if r.get("ppl_increase_ratio") is not None]
        spread = f"{fmt(min(ratios))}-{fmt(max(ratios))}" if ratios else "n/a"
        lines.append(f"| {case} | {','.join(str(r['seed']) for r in done)} | {mean_spread(ours)} | {mean_spread(peer)} "
                     f"| {fmt(ratio(statistics.fmean(ours), statistics.fmean(peer)))} | {spread} |")
    return lines


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [f"- {k}: {v}" for k, v in meta["facts"].items()]
    if len({r.get("seed") for r in rows}) > 1:
        lines += ["", *seed_summary(rows)]
    lines += ["", "| case | seed | ours wall s | peer wall s | wall ratio (ours/peer) | ours peak MB | peer peak MB "
                  "| dense ppl | ours ppl | peer ppl | ppl-increase ratio | ours bits/weight | peer bits/weight |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r.get('seed', 'n/a')} | {fmt(r['ours']['wall_s'], 1)} | {fmt(r['peer']['wall_s'], 1)} "
            f"| {fmt(ratio(r['ours']['wall_s'], r['peer']['wall_s']))} | {fmt(r['ours']['peak_rss_mb'], 0)} "
            f"| {fmt(r['peer']['peak_rss_mb'], 0)} | {fmt(r.get('dense_ppl'), 3)} | {fmt(r.get('ours_ppl'), 3)} "
            f"| {peer_ppl_cell(r)} | {fmt(r.get('ppl_increase_ratio'))} | {fmt(r.get('ours_bits_per_weight'))} "
            f"| {fmt(r.get('peer_bits_per_weight'))} |")
    lines += ["", "Details: the tools' own core time (ours: report.json timing.phases.compress; peer: oneshot "
                  "only), peak summed PSS, layers changed vs dense and their zero fraction, and the peer "
                  "checkpoint's logit check (its in-venv logits vs the checkpoint loaded in our venv).", "",
              "| case | seed | ours compress s | peer oneshot s | core ratio | ours peak PSS MB | peer peak PSS MB "
              "| ours procs | ours layers changed | peer layers changed | same layers | ours zeros | peer zeros | peer logit max err |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        o, p = r["ours"], r["peer"]
        ol, pl = r.get("ours_layers") or {}, r.get("peer_layers") or {}
        lines.append(
            f"| {r['case']} | {r.get('seed', 'n/a')} | {fmt(o.get('core_s'), 1)} | {fmt(p.get('core_s'), 1)} "
            f"| {fmt(ratio(o.get('core_s'), p.get('core_s')))} | {fmt(o.get('peak_pss_mb'), 0)} "
            f"| {fmt(p.get('peak_pss_mb'), 0)} | {o.get('peak_procs', 'n/a')} "
            f"| {ol.get('changed', 'n/a')}/{ol.get('linears', 'n/a')} | {pl.get('changed', 'n/a')}/{pl.get('linears', 'n/a')} "
            f"| {({True: 'yes', False: 'NO'}).get(r.get('same_layers'), 'n/a')} | {fmt(ol.get('zero_fraction'), 3)} | {fmt(pl.get('zero_fraction'), 3)} "
            f"| {fmt(r.get('peer_logit_max_err'), 6) if r.get('peer_logit_max_err') is not None else 'n/a'} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- main

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="orchestrator vs llm-compressor: wall time, peak memory, perplexity")
    p.add_argument("--model", default="reference:tiny-lm", help="model folder or reference:NAME (default: %(default)s)")
    p.add_argument("--cases", default=",".join(DEFAULT_CASES), help=f"comma-separated, from {', '.join(CASES)}")
    p.add_argument("--one-seed", metavar="CASES", help="comma-separated cases run at the first of --seeds only "
                   "(the data-free RTN cases always are)")
    p.add_argument("--pareto", metavar="PNG", help="also draw bits per weight on disk against perplexity, both "
                   "tools, with orchestrator compare's Pareto plot")
    p.add_argument("--pareto-from", metavar="JSON", help="only redraw --pareto from a results JSON this script "
                   "wrote (no runs)")
    p.add_argument("--seeds", help="comma-separated calibration seeds (data.calibration.seed, both tools get the "
                   "same ids per seed): every case once per seed, and a table of mean and spread over them")
    p.add_argument("--out", default=str(BENCH / "results" / "3-tiny-lm.md"),
                   help="markdown table; a .json (numbers, commit, machine, command) is written beside it")
    p.add_argument("--work", help="scratch folder for outputs and logs (default benchmarks/.work/<model>)")
    p.add_argument("--workers", type=int, default=2, help="our cluster.workers")
    p.add_argument("--calib-samples", type=int, help="override the recipes' data.calibration.num_samples (both tools)")
    p.add_argument("--calib-seq-len", type=int, help="override data.calibration.seq_len (both tools)")
    p.add_argument("--eval-seq-len", type=int, help="override data.eval.seq_len (evaluation of both)")
    p.add_argument("--eval-max-windows", type=int, help="override data.eval.max_windows")
    p.add_argument("--group-size", type=int, help="the quantization cases' group size, both tools (default: "
                   "the recipes' 128)")
    p.add_argument("--peer-defaults", action="store_true",
                   help="GPTQ at llm-compressor's own defaults (act-order static) rather than at our recipes' settings")
    p.add_argument("--ours-override", action="append", default=[], metavar="KEY=VALUE",
                   help="one more override of our recipe (repeatable), e.g. stages.0.act_order=true")
    p.add_argument("--ours-calibration", choices=["parallel", "sequential"],
                   help="our partition.calibration (default: the recipe's, parallel)")
    p.add_argument("--peer-batch-size", type=int,
                   help="oneshot batch_size (default: the recipe's data.calibration.batch_size, so both tools run "
                        "the same number of windows per forward; oneshot's own default is 1)")
    p.add_argument("--ours-eval", action="store_true",
                   help="let our run measure perplexity itself too (data.eval.enabled=true); by default it is "
                        "switched off, so that neither tool's wall time includes evaluation (this script "
                        "evaluates both outputs afterwards, with the same code)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads for evaluation")
    p.add_argument("--timing-model", action="store_true",
                   help="timing only: a random Llama of >= 100M parameters, GPTQ W4 g128, ours (parallel, "
                        "--workers) vs llm-compressor; no perplexity")
    p.add_argument("--timing-calib-samples", type=int, default=32,
                   help="calibration windows in --timing-model mode (both tools; default 32)")
    p.add_argument("--timing-shape", default="768,12,3072,12", help="hidden,layers,ffn,heads of the timing model")
    p.add_argument("--timing-experts", type=int, default=0,
                   help="--timing-model as a Mixtral with this many experts of width ffn per block (2 per token); "
                        "the peer leaves its routers dense, as we do")
    p.add_argument("--timing-ppl", action="store_true",
                   help="--timing-model: evaluate both outputs too (perplexity on the same windows, same code)")
    p.add_argument("--min-params", type=float, default=100e6,
                   help="--timing-model refuses a shape with fewer parameters (default: %(default).0f)")
    p.add_argument("--smoke", action="store_true",
                   help=f"a quick check of this script: {SMOKE_MODEL}, 16 x 64 calibration windows, 4 evaluation "
                        "windows of 64 tokens, gptq-w4g128 and wanda-2of4 only; with --timing-model a 2-block "
                        "random Llama of hidden 128 and 8 calibration windows")
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.calib_samples, args.calib_seq_len = SMOKE_MODEL, 16 if not args.timing_model else 8, 64
        args.eval_seq_len, args.eval_max_windows, args.cases = 64, 4, "gptq-w4g128,wanda-2of4"
        args.timing_shape, args.min_params = "128,2,256,2", 0
    if args.pareto_from:
        data = json.loads(Path(args.pareto_from).read_text())["data"]
        pareto(data["rows"], Path(data["meta"]["facts"]["model"]), Path(args.pareto))
        return 0
    with Bench() as bench:
        return compare(args, bench)


def exclusive():
    """One measurement at a time (this script, speed.py): two would share the cores (and, by default, the
    work folder). -> the lock's open file, held until it is closed or the process ends."""
    WORK.mkdir(parents=True, exist_ok=True)
    lock = open(WORK / ".lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SystemExit("another compare_llmcompressor.py or speed.py is running (benchmarks/.work/.lock); "
                         "runs must not overlap, or each one's timings are the other's load") from None
    return lock


def compare(args, bench: Bench) -> int:
    if not PEER_PYTHON.exists():
        raise SystemExit(f"{PEER_PYTHON} not found: run benchmarks/setup_peer.sh first")
    lock = exclusive()  # noqa: F841  (held until this process ends)
    from orchestrator.recipe import EvalDataConfig, load_recipe

    t_all = time.perf_counter()
    base_model = resolve_model(args.model)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    for c in cases:
        if c not in CASES:
            raise SystemExit(f"--cases: unknown case {c!r}; known: {', '.join(CASES)}")
    facts: dict = {}
    # data.eval.enabled (newer orchestrator): off for our run unless --ours-eval (always off when timing)
    eval_switch = "enabled" in {f.name for f in fields(EvalDataConfig)}
    ours_eval = args.ours_eval and not args.timing_model
    if args.timing_model:
        cases = ["gptq-w4g128"]
        shape = parse_shape(args.timing_shape)
        work = Path(args.work or WORK / "timing").resolve()
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        model_dir, params = random_llama(work / "models", base_model, **shape, experts=args.timing_experts)
        family = f"MixtralForCausalLM ({args.timing_experts} experts, 2 per token)" if args.timing_experts \
            else "LlamaForCausalLM"
        facts["timing model"] = (f"random {family}, hidden {shape['hidden']}, {shape['layers']} layers, "
                                 f"ffn {shape['ffn']}, {shape['heads']} heads, "
                                 f"vocab {json.loads((model_dir / 'config.json').read_text())['vocab_size']}: "
                                 f"{params / 1e6:.1f}M parameters, float32 ({time.perf_counter() - t0:.0f} s to build)")
        if params < args.min_params:
            raise SystemExit(f"--timing-shape gives {params / 1e6:.1f}M parameters, fewer than --min-params")
        calib_samples = args.timing_calib_samples if args.calib_samples is None else args.calib_samples
        eval_max_windows = None if eval_switch else 1  # no data.eval.enabled: keep our own evaluation to one window
    else:
        model_dir = base_model
        work = Path(args.work or WORK / model_dir.name).resolve()
        work.mkdir(parents=True, exist_ok=True)
        calib_samples = args.calib_samples
        eval_max_windows = args.eval_max_windows

    out_md = Path(args.out).resolve()
    rows = []
    calib_cache: dict[tuple, tuple] = {}
    dense_ppl = None
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [None]
    # a data-free case reads no calibration ids: once, at the first seed (as the --one-seed cases)
    once = DATA_FREE | set(args.one_seed.split(",") if args.one_seed else ())
    runs = [(seed, case) for seed in seeds for case in cases if seed == seeds[0] or case not in once]
    for seed, case in runs:
        recipe = load_recipe(ROOT / "recipes" / f"{case}.yaml", [f"model.path={model_dir}"])
        cal = recipe.config.data.calibration
        overrides = []
        if seed is not None:
            cal.seed = seed
            overrides.append(f"data.calibration.seed={seed}")
        name = case if seed is None else f"{case}-seed{seed}"
        if calib_samples is not None:
            cal.num_samples = calib_samples
            overrides.append(f"data.calibration.num_samples={calib_samples}")
        if args.calib_seq_len is not None:
            cal.seq_len = args.calib_seq_len
            overrides.append(f"data.calibration.seq_len={args.calib_seq_len}")
        if args.eval_seq_len is not None:
            overrides.append(f"data.eval.seq_len={args.eval_seq_len}")
        if eval_max_windows is not None:
            overrides.append(f"data.eval.max_windows={eval_max_windows}")
        if args.ours_calibration:
            overrides.append(f"partition.calibration={args.ours_calibration}")
        peer_extra = ["--defaults"] if args.peer_defaults else []
        if args.group_size and case in QUANTIZED:
            overrides.append(f"stages.0.group_size={args.group_size}")
            peer_extra += ["--group-size", str(args.group_size)]
        overrides += args.ours_override
        if eval_switch and not ours_eval:
            overrides.append("data.eval.enabled=false")
        key = (cal.source, cal.num_samples, cal.seq_len, cal.seed)
        if key not in calib_cache:
            path = work / f"calib-{cal.num_samples}x{cal.seq_len}-seed{cal.seed}.safetensors"
            calib_cache[key] = (path, *save_calibration(model_dir, cal, path))
        calib_path, ids, digest = calib_cache[key]
        peer_bs = args.peer_batch_size or cal.batch_size

        print(f"[{case}] ours ...", file=sys.stderr, flush=True)
        m_ours, report, ours_model = run_ours(case, model_dir, work, overrides, args.workers, name)
        check_same_calibration(case, report, digest)
        print(f"[{case}] ours {m_ours.wall_s:.1f} s, peak {m_ours.peak_rss_mb:.0f} MB; peer ...", file=sys.stderr,
              flush=True)
        routers = [r"re:.*mlp\.gate$", r"re:.*block_sparse_moe\.gate$"] if args.timing_experts else []
        m_peer, peer, peer_model = run_peer(case, model_dir, calib_path, work, peer_bs, routers, peer_extra, name)
        print(f"[{case}] peer {m_peer.wall_s:.1f} s, peak {m_peer.peak_rss_mb:.0f} MB", file=sys.stderr, flush=True)

        grouped = args.group_size and case in QUANTIZED
        row = {"case": case.replace("g128", f"g{args.group_size}") if grouped else case, "seed": cal.seed,
               "settings": {"ours": overrides, "peer": peer_extra},
               "ours": {"wall_s": m_ours.wall_s, "peak_rss_mb": m_ours.peak_rss_mb, "peak_pss_mb": m_ours.peak_pss_mb,
                        "peak_procs": m_ours.peak_procs, "core_s": report["timing"]["phases"].get("compress"),
                        "phases": report["timing"]["phases"], "cmd": m_ours.cmd, "log": m_ours.log,
                        "procs_at_peak": m_ours.procs_at_peak, "calibration": report.get("calibration"),
                        "report_ppl": ((report.get("quality") or {}).get("compressed") or {}).get("perplexity"),
                        "overrides": overrides, "model_bytes": report["size"]["dense_bytes"],
                        "plan": report.get("plan"), "memory": report.get("memory"),
                        "report": str(ours_model.parent / "report.json")},
               "peer": {"wall_s": m_peer.wall_s, "peak_rss_mb": m_peer.peak_rss_mb, "peak_pss_mb": m_peer.peak_pss_mb,
                        "peak_procs": m_peer.peak_procs, "core_s": peer["timing"]["oneshot_s"],
                        "timing": peer["timing"], "cmd": m_peer.cmd, "log": m_peer.log, "settings": peer},
               "calibration": {"path": str(calib_path), "shape": list(ids.shape), "sha256": digest}}
        if not args.timing_model or args.timing_ppl:
            from transformers import AutoTokenizer

            from orchestrator.evaluate import perplexities, perplexity

            ecfg = EvalDataConfig(**vars(recipe.config.data.eval))
            if eval_switch:
                ecfg.enabled = True
            if args.eval_seq_len is not None:
                ecfg.seq_len = args.eval_seq_len
            if args.eval_max_windows is not None:
                ecfg.max_windows = args.eval_max_windows
            if dense_ppl is None:
                dense_ppl = perplexity(model_dir, ecfg, threads=args.threads).perplexity
                dense_params = parameter_count(model_dir)
            ours_ppl = perplexity(ours_model, ecfg, threads=args.threads).perplexity
            peer_lm, peer_missing = load_peer(peer_model, args.threads)
            peer_ppl = perplexities({"peer": peer_lm}, AutoTokenizer.from_pretrained(peer_model), ecfg)["peer"].perplexity
            row.update(dense_ppl=dense_ppl, ours_ppl=ours_ppl, peer_ppl=peer_ppl, eval=vars(ecfg),
                       ppl_increase_ratio=increase_ratio(dense_ppl, ours_ppl, peer_ppl),
                       ours_bits_per_weight=disk_bits_per_weight(ours_model, dense_params),
                       peer_bits_per_weight=disk_bits_per_weight(peer_model, dense_params),
                       ours_layers=linear_summary(model_dir, ours_model),
                       peer_layers=linear_summary(model_dir, peer_model),
                       peer_logit_max_err=peer_logits_check(peer_lm, peer_model.parent),
                       peer_missing_tensors=len(peer_missing))
            del peer_lm
            if row["peer_logit_max_err"] > LOAD_TOLERANCE or row["peer_missing_tensors"]:
                row["ppl_increase_ratio"] = None  # the peer's figure is of a partly random model
            row["same_layers"] = row["ours_layers"]["changed_names"] == row["peer_layers"]["changed_names"]
            if not row["same_layers"]:
                print(f"WARNING [{case}]: the tools changed different Linear layers: ours "
                      f"{row['ours_layers']['changed_names']}, peer {row['peer_layers']['changed_names']}",
                      file=sys.stderr)
            print(f"[{case}] ppl dense {dense_ppl:.3f}, ours {ours_ppl:.3f}, peer {peer_ppl:.3f}", file=sys.stderr,
                  flush=True)
        rows.append(row)
        # written after every case, so a long run leaves its finished rows behind
        c0 = rows[0]["calibration"]
        facts.update({
            "model": str(model_dir),
            "calibration": f"{c0['shape'][0]} x {c0['shape'][1]} token ids from orchestrator.data.calibration_windows "
                           + (f"(seed {cal.seed}), sha256 {c0['sha256'][:16]}..." if seed is None else
                              f"(seeds {args.seeds}; each seed's sha256 in the JSON rows)")
                           + ", verified equal to our report.json's",
            "ours": f"orchestrator run, cluster.workers={args.workers}, partition.calibration="
                    f"{args.ours_calibration or recipe.config.partition.calibration}, wall = whole command "
                    f"(plan, Ray start, compress, export"
                    + (", its own dense + compressed evaluation)" if (ours_eval or not eval_switch)
                       else "; its own evaluation off: data.eval.enabled=false)"),
            "overrides": " ".join(rows[0]["ours"]["overrides"]) or "none",
            "peer": f"llmcompressor {peer['versions']['llmcompressor']} (compressed-tensors "
                    f"{peer['versions']['compressed_tensors']}, transformers {peer['versions']['transformers']}), "
                    f"oneshot pipeline independent -> sequential, batch_size {peer_bs}, wall = whole command "
                    f"(imports, load, oneshot, save)",
            "memory": "peak of the summed RSS of the process and all its descendants, sampled every 0.1 s",
        })
        meta = {"title": "timing model" if args.timing_model else model_dir.name, "facts": facts,
                "complete": len(rows) == len(runs)}
        title = f"llm-compressor vs orchestrator: {meta['title']}"
        bench.write(out_md, title, markdown(meta, rows), {"meta": meta, "rows": rows})
        if args.pareto:
            pareto(rows, model_dir, Path(args.pareto))
    print(markdown(meta, rows))
    print(f"total {time.perf_counter() - t_all:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
