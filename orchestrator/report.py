"""report.json (the contract other tools read), report.md, and the terminal summary."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

from orchestrator.checkpoint import folder_bytes, write_tensors


def build(plan, shards: list[dict], quality: dict, phases: dict, started: float, model_dir: Path,
          sizes: dict) -> dict:
    recipe, partition = plan.recipe, plan.partition
    dense_bytes = folder_bytes(plan.model_dir)
    compressed_bytes = folder_bytes(model_dir)
    layers = [layer for s in shards for layer in s["layers"]]
    return {
        "run": {
            "name": recipe.run_name,
            "dir": str(plan.run_dir),
            "recipe_hash": recipe.hash,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
            "host": platform.node(),
        },
        "model": {
            "path": recipe.config.model.path,
            "dir": str(plan.model_dir),
            "architecture": partition.architecture,
            "task": partition.task,
            "params": partition.num_params,
            "blocks": partition.num_blocks,
        },
        "size": {
            "dense_bytes": dense_bytes,
            "compressed_bytes": compressed_bytes,
            "compression_ratio": round(dense_bytes / compressed_bytes, 4),
            "format": sizes["format"],
            "bits_per_weight": bits_per_weight(sizes, partition.num_params),
        },
        "quality": quality,
        "calibration": calibration_summary(plan),
        "compression": {
            "layers": len(layers),
            "mean_relative_error": sum(l["relative_error"] for l in layers) / max(1, len(layers)),
            "mean_sparsity": sum(l["sparsity"] for l in layers) / max(1, len(layers)),
        },
        "timing": {"total_s": None, "phases": phases},
        "cluster": {
            "address": recipe.config.cluster.address or "local",
            "workers": recipe.config.cluster.workers,
            "cpus_per_worker": recipe.config.cluster.cpus_per_worker,
            "gpus_per_worker": recipe.config.cluster.gpus_per_worker,
        },
        "shards": shards,
        "mlflow": None,
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
    cfg = plan.recipe.config
    return {"source": cfg.data.calibration.source, "num_samples": int(plan.calibration.input_ids.shape[0]),
            "seq_len": int(plan.calibration.input_ids.shape[1]), "seed": cfg.data.calibration.seed,
            "mode": cfg.partition.calibration, "sha256": plan.calibration.sha256}


def write(run_dir: Path, data: dict) -> None:
    """report.json last, atomically: its presence marks the run complete."""
    (run_dir / "report.md").write_text(markdown(data))
    tmp = run_dir / "report.json.tmp"
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, run_dir / "report.json")


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
    if q.get("dense") and q.get("compressed"):
        rows.append(("perplexity (held-out)", f"{q['dense']['perplexity']:.3f}", f"{q['compressed']['perplexity']:.3f}"))
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
    if data.get("mlflow"):
        lines.append(f"mlflow run: {data['mlflow']['run_id']}  ({data['mlflow']['uri']})")
    return "\n".join(lines)


def markdown(data: dict) -> str:
    out = [f"# Compression report: {data['run']['name']}", "",
           f"Model `{data['model']['path']}` ({data['model']['architecture']}, {data['model']['params']:,} parameters, "
           f"{data['model']['blocks']} blocks). Recipe hash `{data['run']['recipe_hash'][:12]}`.", "",
           "| | dense | compressed |", "|---|---|---|"]
    out += [f"| {a} | {b} | {c} |" for a, b, c in summary_rows(data)]
    out += ["", f"Size format: {data['size']['format']}.", "", "## Timing", "", "| phase | seconds |", "|---|---|"]
    out += [f"| {k} | {v:.2f} |" for k, v in data["timing"]["phases"].items()]
    out += ["", "## Shards", "", "| shard | modules | seconds | attempts | device | layers | mean rel. error |",
            "|---|---|---|---|---|---|---|"]
    for s in data["shards"]:
        errs = list(s["error"].values())
        out.append(f"| {s['index']} | {', '.join(s['modules'])} | {s['seconds']:.2f} | {s['attempts']} | "
                   f"{s['worker'].get('device', '?')} | {len(errs)} | {sum(errs) / max(1, len(errs)):.4f} |")
    out += ["", "## Layers", "", "| layer | methods | bits | group | sparsity | rel. error | SQNR dB |",
            "|---|---|---|---|---|---|---|"]
    for s in data["shards"]:
        for l in s["layers"]:
            out.append(f"| {l['name']} | {'+'.join(l['methods'])} | {l['bits'] or '-'} | {l['group_size'] or '-'} | "
                       f"{l['sparsity']:.3f} | {l['relative_error']:.4f} | {l['sqnr_db']:.1f} |")
    return "\n".join(out) + "\n"
