"""The recover stage inside a run: after the shards are compressed, distil the compressed model against
the dense one (recover.py, on Ray Train) and write the recovered checkpoints in place of the compressed
ones. Committed to the store with its settings, so a rerun with the same settings reuses it."""

from __future__ import annotations

import dataclasses
import shutil

import ray

from orchestrator.assemble import Compressed, finish_evaluated, write_recovered_checkpoint

RECOVERY_KEYS = ("settings", "losses", "seconds", "perplexity_before", "layers", "nodes", "zero_stage",
                 "start_steps")  # what report.json's "recover" gives (with perplexity_after)


def trained_layers(plan, compressed: Compressed) -> list:
    """Every compressed Linear, as the recover stage trains it (its grid, and its mask if pruned)."""
    from orchestrator.recover import TrainedLayer
    from orchestrator.techniques import TECHNIQUES

    keys = {l.name: l.weight_key for s in plan.partition.shards for l in s.linears}
    return [TrainedLayer(l["name"], keys[l["name"]], l["bits"], l["group_size"],
                         any(TECHNIQUES[m].kind == "prune" for m in l["methods"]))
            for record in compressed.shards for l in record["layers"] if l["methods"]]


def perplexity_before(plan, compressed: Compressed) -> float | None:
    """The compressed model's held-out perplexity before recovery (a Ray task), if the run evaluates."""
    from orchestrator import evaluate

    cfg = plan.recipe.config
    if not cfg.data.eval.enabled:
        return None
    task = ray.remote(num_cpus=1, max_calls=1)(evaluate.perplexity)
    return ray.get(task.remote(str(compressed.evaluated.folder), cfg.data.eval,
                               int(max(1, cfg.cluster.cpus_per_worker)))).summary()["perplexity"]


def recover_stage(plan, compressed: Compressed) -> dict:
    """Train (or reuse the committed recovery), write recovered/, and point `compressed` at it.
    -> the recovery's record for the report."""
    from orchestrator import recover

    cfg, store = plan.recipe.config, plan.store
    out = store.folder / "recovered"
    settings = dataclasses.asdict(cfg.recover)
    commit = store.committed().get("recovered")
    if commit is None or commit["settings"] != settings:
        store.commit_path("recovered").unlink(missing_ok=True)
        shutil.rmtree(out, ignore_errors=True)
        before = perplexity_before(plan, compressed)
        layers = trained_layers(plan, compressed)
        grids = recover.read_grids(compressed.export.folder, compressed.export.weight_map, layers)
        result = recover.train(cfg.recover, plan.model_dir, compressed.evaluated.folder, grids, layers,
                               plan.recover_ids, out / "work", cfg.seed)
        trained_scales = {k: t for k, t in result["tensors"].items() if k in grids}  # recover.train=scales
        write_recovered_checkpoint(compressed, result["tensors"], {**grids, **trained_scales}, out)
        commit = {"settings": settings, "perplexity_before": before, "layers": len(layers),
                  **{k: result[k] for k in ("losses", "seconds", "nodes", "zero_stage", "start_steps")}}
        files = [out / sub / f for sub in ("evaluated", "model")
                 for f in sorted(set(compressed.evaluated.weight_map.values()))]
        store.commit("recovered", commit, files)
    compressed.evaluated.folder, compressed.export.folder = out / "evaluated", out / "model"
    finish_evaluated(plan, compressed)
    return {k: commit[k] for k in RECOVERY_KEYS}
