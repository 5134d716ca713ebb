"""report.json (the contract other tools read), report.md, and the terminal summary."""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.checkpoint import folder_bytes, write_tensors
from orchestrator.files import write_text_atomic


@dataclass(frozen=True)
class RunResult:
    """Everything a finished run hands the report, once (driver.run)."""

    plan: Any  # plan.Plan
    compressed: Any  # assemble.Compressed: the shard records and the checkpoints
    quality: dict
    speed: dict | None
    sizes: dict  # assemble.finish_export_folder's, with the export's load check
    recovery: dict | None  # recover_stage's record, when the recipe recovers
    gpus_per_worker: float  # cluster.gpus_per_worker as resolved against the cluster
    phases: dict  # seconds per phase
    started: float  # time.time() at the start
    driver_peak_rss: int
    retries: int  # failed shard attempts that were retried


def build(result: RunResult) -> dict:
    """report.json's content (timing.total_s and mlflow are filled in by the driver)."""
    plan, sizes = result.plan, result.sizes
    recipe, partition, shards = plan.recipe, plan.partition, result.compressed.shards
    model_dir = plan.store.folder / "model"
    dense_bytes = folder_bytes(plan.baseline_dir)
    compressed_bytes = folder_bytes(model_dir)
    layers = [layer for s in shards for layer in s["layers"]]
    data = {
        "run": {
            "name": recipe.run_name,
            "dir": str(plan.run_dir),
            "recipe_hash": recipe.hash,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(result.started)),
            "host": platform.node(),
        },
        "model": {
            "path": recipe.config.model.path,
            "dir": str(plan.baseline_dir),
            "architecture": partition.architecture,
            "task": partition.task,
            "params": partition.num_params,
            "blocks": partition.num_blocks,
            "dense_bits": dense_bits(plan.baseline_dir),
        },
        "size": {
            "dense_bytes": dense_bytes,
            "compressed_bytes": compressed_bytes,
            "compression_ratio": round(dense_bytes / compressed_bytes, 4),
            "format": sizes["format"],
            "bits_per_weight": bits_per_weight(sizes, partition.num_params),
            "load_check": sizes["load_check"],  # export.check_loads: transformers loads it, same outputs
        },
        "quality": result.quality,
        "speed": result.speed,
        "calibration": calibration_summary(plan),
        "compression": {
            "layers": len(layers),
            "mean_relative_error": sum(l["relative_error"] for l in layers) / max(1, len(layers)),
            "mean_sparsity": sum(l["sparsity"] for l in layers) / max(1, len(layers)),
        },
        "timing": {"total_s": None, "phases": result.phases},
        "cost": cost(plan, shards, result.phases),
        "plan": plan.forecast.summary() if plan.forecast else None,
        "memory": memory(plan, shards, result.driver_peak_rss),
        "cluster": {"address": recipe.config.cluster.address or "local", "workers": recipe.config.cluster.workers,
                    "cpus_per_worker": recipe.config.cluster.cpus_per_worker,
                    "gpus_per_worker": result.gpus_per_worker},
        "shards": shards,
        "mlflow": None,
        "store": {"shards_reused": result.compressed.reused, "shards_computed": result.compressed.computed,
                  "retries": result.retries},
    }
    if moe := experts_summary(plan, shards):  # mixture-of-experts models only
        data["experts"] = moe
    if plan.dense_dir:  # rotation.enabled: the stages compressed the rotated copy (rotate.py)
        data["rotation"] = json.loads((plan.model_dir / "rotation.json").read_text()) | {"dir": str(plan.model_dir)}
    if result.recovery:
        data["recover"] = result.recovery | {"perplexity_after": (result.quality.get("compressed") or {}).get("perplexity")}
    return data


def experts_summary(plan, shards: list[dict]) -> dict | None:
    """Mixture-of-experts models: what was compressed, the routers left dense, and (calibrated runs) the
    calibration tokens the router sent to each expert, per experts module. None for dense models."""
    layers = [layer for shard in plan.partition.shards for layer in shard.linears]
    experts = [layer for layer in layers if layer.expert]
    if not experts:
        return None
    compressed = {layer["name"] for shard in shards for layer in shard["layers"]}
    routing: dict[str, dict] = {}  # the parts of an expert-split block, in expert order, are one module's
    for shard in shards:
        for module, r in shard.get("experts", {}).items():
            merged = routing.setdefault(module, {"tokens": [], "min_tokens": r["min_tokens"], "under_calibrated": []})
            merged["tokens"] += r["tokens"]
            merged["under_calibrated"] += r["under_calibrated"]
    tokens = [n for r in routing.values() for n in r["tokens"]]
    cfg = plan.recipe.config.experts
    return {
        "expert_matrices": len(experts),
        "expert_matrices_compressed": sum(layer.name in compressed for layer in experts),
        "routers": sorted(layer.name for layer in layers if layer.router),
        "routers_compressed": sorted(layer.name for layer in layers if layer.router and layer.name in compressed),
        "min_tokens": cfg.min_tokens,
        "under_calibrated_policy": cfg.under_calibrated,
        "under_calibrated": sum(len(r["under_calibrated"]) for r in routing.values()),
        "tokens_per_expert": {"min": min(tokens), "mean": round(sum(tokens) / len(tokens), 1),
                              "max": max(tokens)} if tokens else None,
        "routing": routing or None,
    }


def memory(plan, shards: list[dict], driver_peak_rss: int) -> dict:
    """Measured peaks: the driver's whole process (its high-water mark, libraries included) and, apart,
    its growth over the process base the planner measured (the libraries imported); each worker's."""
    return {"driver_peak_rss_bytes": driver_peak_rss,
            "driver_growth_bytes": driver_peak_rss - plan.forecast.base_bytes,
            "worker_peak_rss_bytes": max((s["worker"].get("peak_rss_bytes", 0) for s in shards), default=0)}


def dense_bits(model_dir: Path) -> int:
    """Bits per weight of the dense checkpoint's dtype (config.json's torch_dtype / dtype; float32 if unset)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
    return {"float32": 32, "float16": 16, "bfloat16": 16, "float64": 64}.get(str(dtype), 32)


def cost(plan, shards: list[dict], phases: dict) -> dict:
    """What the compression used: worker time (capture and compress), CPU and GPU seconds, utilisation."""
    workers = min(plan.recipe.config.cluster.workers, len(shards)) or 1
    busy = sum(s["capture_seconds"] + s["seconds"] for s in shards)
    wall = phases.get("compress") or 0.0
    return {
        "worker_capture_s": round(sum(s["capture_seconds"] for s in shards), 3),
        "worker_compress_s": round(sum(s["seconds"] for s in shards), 3),
        "worker_cpu_s": round(sum(s["cpu_seconds"] for s in shards), 3),
        "worker_gpu_s": round(sum(s["capture_seconds"] + s["seconds"] for s in shards
                                  if s["worker"].get("device") == "cuda"), 3),
        # busy worker time over what the workers could have given during the compress phase
        "worker_utilisation": round(busy / (wall * workers), 4) if wall else None,
    }


def bits_per_weight(sizes: dict, num_params: int) -> dict:
    """Effective bits per weight, every stored byte counted (packed integers, scales, zero points, shapes)."""
    quantized = sizes["quantized_weights"]
    return {
        "quantized_layers": round(8 * sizes["quantized_layer_bytes"] / quantized, 4) if quantized else None,
        "model": round(8 * sizes["tensor_bytes"] / num_params, 4),
    }


def calibration_summary(plan) -> dict | None:
    if plan.calibration is None:
        return None
    cfg, mask = plan.recipe.config, plan.calibration.attention_mask
    summary = {"source": cfg.data.calibration.source, "num_samples": int(plan.calibration.input_ids.shape[0]),
               "seq_len": int(plan.calibration.input_ids.shape[1]), "seed": cfg.data.calibration.seed,
               "mode": cfg.partition.calibration, "sha256": plan.calibration.sha256}
    if mask is not None:  # padded sentences (data.calibration.shape): seq_len is the longest, tokens the real ones
        summary |= {"shape": "sentences", "tokens": int(mask.sum())}
    return summary


def build_eval(model_dir: Path, baseline_dir: Path | None, cfg, num_params: int, result: dict,
               seconds: float) -> dict:
    """The report of `orchestrator eval`: size, quality, speed and per-layer statistics of one folder."""
    model_bytes = folder_bytes(model_dir)
    dense_bytes = folder_bytes(baseline_dir) if baseline_dir else None
    layers = result["layers"]
    data = {
        "kind": "eval",
        "model_dir": str(model_dir),
        "baseline_dir": str(baseline_dir) if baseline_dir else None,
        "eval": dict(vars(cfg)),
        "size": {
            "bytes": model_bytes,
            "dense_bytes": dense_bytes,
            "compression_ratio": round(dense_bytes / model_bytes, 4) if dense_bytes else None,
            "bits_per_weight": round(8 * weight_bytes(model_dir) / num_params, 4),
            "sparsity": sum(l["sparsity"] for l in layers) / len(layers) if layers else None,
        },
        "quality": result["quality"],
        "speed": result["speed"],
        "layers": layers,
        "peak_rss_bytes": result["peak_rss_bytes"],
        "seconds": round(seconds, 3),
    }
    return data


def weight_bytes(model_dir: Path) -> int:
    """Bytes of the safetensors files: the tensors (packed integers, scales, zeros) and their headers."""
    return sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors"))


def eval_table(data: dict) -> str:
    """`orchestrator eval`'s terminal summary."""
    size, q = data["size"], data["quality"]
    rows = [f"model folder            {data['model_dir']}",
            f"size on disk            {human_bytes(size['bytes'])}"
            + (f"  ({size['compression_ratio']:.2f}x smaller than the baseline)" if size["compression_ratio"] else ""),
            f"bits per weight         {size['bits_per_weight']:.3f}"]
    if size["sparsity"] is not None:
        rows.append(f"mean layer sparsity     {size['sparsity']:.4f}")
    if q.get("compressed") and "perplexity" in q["compressed"]:
        rows.append(f"perplexity              {q['compressed']['perplexity']:.4f}"
                    + (f"  (baseline {q['dense']['perplexity']:.4f})" if q.get("dense") else ""))
        if q.get("kl_nats") is not None:
            rows.append(f"KL from baseline        {q['kl_nats']:.6f} nats/token")
    if q.get("compressed") and "fidelity" in q["compressed"]:
        fid = q["compressed"]["fidelity"]
        rows.append(f"embedding cosine        {fid['cosine_mean']:.5f} (min {fid['cosine_min']:.4f})")
        rows.append(f"top-{fid['k']} agreement       {fid['topk_agreement']:.4f}")
    for name, sp in (data.get("speed") or {}).items():
        for b, row in sp["batch"].items():
            rows.append(f"{name} batch {b}: {row['tokens_per_s']:.0f} tokens/s, latency median "
                        f"{1000 * row['latency_median_s']:.1f} ms (min {1000 * row['latency_min_s']:.1f}, "
                        f"max {1000 * row['latency_max_s']:.1f})")
        rows.append(f"{name} resident memory: {human_bytes(sp['resident_bytes'])}")
    return "\n".join(rows)


def to_json(data: dict) -> str:
    """report.json's bytes (the file, and its copy in MLflow)."""
    return json.dumps(data, indent=2, default=str) + "\n"


def write(run_dir: Path, data: dict) -> None:
    """report.md, then report.json, each atomically: report.json's presence marks the run complete."""
    write_text_atomic(run_dir / "report.md", markdown(data))
    write_text_atomic(run_dir / "report.json", to_json(data))


def save_sample_logits(folder: Path, dense, compressed) -> None:
    """The first evaluation window's logits: what a reloaded export must reproduce."""
    folder.mkdir(parents=True, exist_ok=True)
    write_tensors(folder / "sample_logits.safetensors", {
        "input_ids": dense.sample_input_ids,
        "dense": dense.sample_logits,
        "compressed": compressed.sample_logits,
    })


def human_bytes(n: float) -> str:
    """1862977 -> '1.9 MB' (powers of 1000, as disks are sold)."""
    if n < 1000:
        return f"{int(n)} B"
    for unit in ("KB", "MB", "GB", "TB"):
        n /= 1000
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}"


def summary_rows(data: dict) -> list[tuple[str, str, str]]:
    size, q = data["size"], data["quality"]
    rows = [("size on disk", human_bytes(size["dense_bytes"]),
             f"{human_bytes(size['compressed_bytes'])} ({size['compression_ratio']:.2f}x smaller)")]
    bits = size["bits_per_weight"]
    rows.append(("bits per weight (model)", str(data["model"]["dense_bits"]), f"{bits['model']:.2f}"))
    if bits["quantized_layers"] is not None:
        rows.append(("bits per weight (quantized layers)", "", f"{bits['quantized_layers']:.3f}"))
    if q.get("compressed") and "perplexity" in q["compressed"]:
        rows.append(("perplexity (held-out)", f"{q['dense']['perplexity']:.3f}", f"{q['compressed']['perplexity']:.3f}"))
        rows.append(("KL from dense (nats/token)", "0", f"{q['kl_nats']:.5f}"))
    if q.get("compressed") and "fidelity" in q["compressed"]:
        fid = q["compressed"]["fidelity"]
        rows.append(("embedding cosine (mean)", "1", f"{fid['cosine_mean']:.5f}"))
        rows.append((f"top-{fid['k']} neighbour agreement", "1", f"{fid['topk_agreement']:.4f}"))
    for b, dense_speed in (data.get("speed") or {}).get("dense", {}).get("batch", {}).items():
        compressed_speed = data["speed"]["compressed"]["batch"][b]
        rows.append((f"tokens/s (batch {b})", f"{dense_speed['tokens_per_s']:.0f}",
                     f"{compressed_speed['tokens_per_s']:.0f}"))
    comp = data["compression"]
    rows.append(("mean layer rel. error", "0", f"{comp['mean_relative_error']:.4f}"))
    rows.append(("mean layer sparsity", "", f"{comp['mean_sparsity']:.3f}"))
    return rows


def summary_table(data: dict) -> str:
    rows = [("", "dense", "compressed")] + summary_rows(data)
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    lines.append(f"wall time: {data['timing']['total_s']:.1f} s  ({', '.join(f'{k} {v:.1f}s' for k, v in data['timing']['phases'].items())})")
    lines.append(f"run folder: {data['run']['dir']}")
    if (mlflow := data.get("mlflow")) and mlflow.get("run_id"):
        lines.append(f"mlflow run: {mlflow['run_id']}  ({mlflow['uri']})")
    elif mlflow:
        lines.append(f"mlflow: not reached ({mlflow['uri']}); kept in {mlflow['pending']} for `orchestrator sync`")
    return "\n".join(lines)


def markdown(data: dict) -> str:
    out = [f"# Compression report: {data['run']['name']}", "",
           f"Model `{data['model']['path']}` ({data['model']['architecture']}, {data['model']['params']:,} parameters, "
           f"{data['model']['blocks']} blocks). Recipe hash `{data['run']['recipe_hash'][:12]}`.", "",
           "| | dense | compressed |", "|---|---|---|"]
    out += [f"| {a} | {b} | {c} |" for a, b, c in summary_rows(data)]
    out += ["", f"Size format: {data['size']['format']}.", "", "## Timing", "", "| phase | seconds |", "|---|---|"]
    out += [f"| {k} | {v:.2f} |" for k, v in data["timing"]["phases"].items()]
    store = data.get("store") or {}
    out += ["", "## Shards", "", f"{store.get('shards_computed', '?')} computed by this run, "
            f"{store.get('shards_reused', 0)} reused from an interrupted run; {store.get('retries', 0)} failed "
            "attempts retried.", "",
            "| shard | modules | seconds | attempts | device | layers | mean rel. error | reused |",
            "|---|---|---|---|---|---|---|---|"]
    for s in data["shards"]:
        errs = list(s["error"].values())
        span = f" experts {s['expert_range'][0]}-{s['expert_range'][1] - 1}" if "expert_range" in s else ""
        out.append(f"| {s['index']} | {', '.join(s['modules'])}{span} | {s['seconds']:.2f} | {s['attempts']} | "
                   f"{s['worker'].get('device', '?')} | {len(errs)} | {sum(errs) / max(1, len(errs)):.4f} | "
                   f"{'yes' if s.get('reused') else 'no'} |")
    out += ["", "## Layers", "", "| layer | methods | bits | group | sparsity | rel. error | SQNR dB |",
            "|---|---|---|---|---|---|---|"]
    for s in data["shards"]:
        for l in s["layers"]:
            out.append(f"| {l['name']} | {'+'.join(l['methods'])} | {l['bits'] or '-'} | {l['group_size'] or '-'} | "
                       f"{l['sparsity']:.3f} | {l['relative_error']:.4f} | {l['sqnr_db']:.1f} |")
    return "\n".join(out) + "\n"
