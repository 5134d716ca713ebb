"""The output checkpoints, put together from the shards the workers wrote and the store committed.

Every run writes two checkpoints, file for file (one safetensors file per shard, one for the tensors
outside the blocks):

    evaluated/  every weight on its grid, in the dense dtype: what the run measures
    model/      the same weights packed by compressed-tensors: what the run delivers

Workers write the files; the driver only keeps, per file, its keys and bytes (CheckpointIndex), then
writes the indexes, configs and manifest here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

from orchestrator.checkpoint import copy_non_weight_files, shard_file_name, write_index, write_tensors
from orchestrator.export import QuantizedLayer, Scheme, finish_export, linear_modules
from orchestrator.files import fsync_dir
from orchestrator.partition import Partition, Shard, load_config, skeleton
from orchestrator.store import shard_key
from orchestrator.worker import ShardFiles, ShardResult


@dataclass
class CheckpointIndex:
    """A checkpoint the workers are writing file by file: which key is in which file, and its bytes."""

    folder: Path
    weight_map: dict[str, str] = field(default_factory=dict)
    tensor_bytes: int = 0

    def add(self, fname: str, keys: list[str], nbytes: int) -> None:
        self.weight_map.update({k: fname for k in keys})
        self.tensor_bytes += nbytes


@dataclass
class Compressed:
    """What the compression leaves behind: the two checkpoints and the records of their shards."""

    shards: list[dict]  # shard records for the report
    evaluated: CheckpointIndex  # every weight on its grid, dense dtype: what the run evaluates
    export: CheckpointIndex  # the same, packed: what the run delivers
    quantized: list[QuantizedLayer]  # the layers packed in the export
    packed_bytes: int  # their bytes there
    quantized_weights: int  # their weight count
    reused: int = 0  # shards taken from the store (committed by an earlier, interrupted run)
    computed: int = 0  # shards compressed by this run


@dataclass(frozen=True)
class Layout:
    """Where each file of the two checkpoints goes: file 0 holds the tensors outside the blocks, file
    k + 1 shard k."""

    folder: Path  # the store's folder, holding evaluated/ and model/
    shards: int

    def files(self, position: int) -> ShardFiles:
        fname = self.file_name(position)
        return ShardFiles(str(self.folder / "evaluated" / fname), str(self.folder / "model" / fname))

    def file_name(self, position: int) -> str:
        return shard_file_name(position, self.shards + 1)

    def of_shard(self, shard: Shard) -> ShardFiles:
        return self.files(shard.index + 1)

    @property
    def rest(self) -> ShardFiles:
        return self.files(0)


def shard_record(shard: Shard, result: ShardResult, attempts: int) -> dict:
    """A finished shard as report.json lists it (with its experts' calibration tokens in MoE blocks)."""
    record = {
        "index": shard.index,
        "modules": shard.modules,
        **({"expert_range": list(shard.experts)} if shard.experts else {}),  # a part of an expert-split block
        "seconds": round(result.seconds, 3),
        "capture_seconds": round(result.capture_seconds, 3),
        "cpu_seconds": round(result.cpu_seconds, 3),
        **({"capture_window": [round(t, 3) for t in result.capture_window], "capture_chunks": result.capture_chunks}
           if result.capture_window else {}),
        "attempts": attempts,
        "worker": result.worker,
        "error": {m.name: m.relative_error for m in result.layers},
        "layers": [vars(m) for m in result.layers],
    }
    if result.experts:
        record["experts"] = result.experts
    return record


def shard_commit(shard: Shard, result: ShardResult, attempts: int) -> dict:
    """What the store keeps of a finished shard: enough to assemble the checkpoint and the report."""
    return {"record": shard_record(shard, result, attempts), "evaluated_keys": result.evaluated_keys,
            "export_keys": result.export_keys, "evaluated_bytes": result.evaluated_bytes,
            "export_bytes": result.export_bytes, "packed_bytes": result.packed_bytes,
            "quantized": [dataclasses.asdict(q) for q in result.quantized]}


def assemble(partition: Partition, layout: Layout, commits: dict[str, dict], computed: set[int]) -> Compressed:
    """The checkpoints' indexes and the shard records, from every shard's commit and the rest's.
    computed: the indexes of the shards this run compressed (the others were reused)."""
    evaluated, export = CheckpointIndex(layout.folder / "evaluated"), CheckpointIndex(layout.folder / "model")
    records, quantized, packed_bytes = [], [], 0
    for shard in partition.shards:
        commit = commits[shard_key(shard.index)]
        fname = layout.file_name(shard.index + 1)
        evaluated.add(fname, commit["evaluated_keys"], commit["evaluated_bytes"])
        export.add(fname, commit["export_keys"], commit["export_bytes"])
        quantized += [QuantizedLayer(q["module"], q["weight_key"], Scheme(**q["scheme"])) for q in commit["quantized"]]
        packed_bytes += commit["packed_bytes"]
        records.append({**commit["record"], "reused": shard.index not in computed})
    rest_keys, rest_bytes = sorted(partition.rest_keys), commits["rest"]["bytes"]
    evaluated.add(layout.file_name(0), rest_keys, rest_bytes)
    export.add(layout.file_name(0), rest_keys, rest_bytes)
    weights = {l.weight_key: l.in_features * l.out_features for s in partition.shards for l in s.linears}
    return Compressed(records, evaluated, export, quantized, packed_bytes,
                      sum(weights[l.weight_key] for l in quantized),
                      reused=len(partition.shards) - len(computed), computed=len(computed))


def finish_evaluated(plan, compressed: Compressed) -> None:
    """The evaluated checkpoint's index, config, tokenizer and recipe, beside the files the workers wrote."""
    evaluated = compressed.evaluated
    write_index(evaluated.folder, evaluated.weight_map, evaluated.tensor_bytes)
    copy_non_weight_files(plan.model_dir, evaluated.folder)
    (evaluated.folder / "recipe.yaml").write_text(plan.recipe.yaml)


def finish_export_folder(plan, compressed: Compressed) -> dict:
    """model/: index, config with the quantization_config, manifest. -> the sizes the report gives."""
    config = load_config(plan.model_dir, plan.recipe.config.model.trust_remote_code)
    # every weight matrix a loader may quantize: the Linear modules, and the experts and routers by their
    # names in the checkpoint too (vLLM's: a router is a Linear there); those left dense go in `ignore`
    extra = [name for s in plan.partition.shards for l in s.linears if l.expert or l.router
             for name in (l.name, l.weight_key.removesuffix(".weight"))]
    all_linears = list(dict.fromkeys(linear_modules(skeleton(config, plan.recipe.config.model.trust_remote_code))
                                     + extra))
    export = compressed.export
    in_features = {l.name: l.in_features for s in plan.partition.shards for l in s.linears}
    fmt = finish_export(compressed.evaluated.folder, export.folder, export.weight_map, export.tensor_bytes,
                        compressed.quantized, all_linears, in_features)
    fsync_dir(export.folder)
    return {"format": fmt, "tensor_bytes": export.tensor_bytes, "quantized_layer_bytes": compressed.packed_bytes,
            "quantized_weights": compressed.quantized_weights}


def write_recovered_checkpoint(compressed: Compressed, recovered: dict[str, torch.Tensor],
                               grids: dict[str, torch.Tensor], out: Path) -> None:
    """The two checkpoints again with the recovered weights, file for file: out/evaluated (on the grid,
    dense dtype) and out/model (packed with the scales and zeros in `grids`: the export's, or trained ones)."""
    from safetensors.torch import load_file

    from orchestrator.export import pack_shard
    from orchestrator.techniques.grid import QuantParams

    evaluated = compressed.evaluated
    for sub in ("evaluated", "model"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for fname in sorted(set(evaluated.weight_map.values())):
        tensors = load_file(evaluated.folder / fname)
        for key in tensors.keys() & recovered.keys():
            tensors[key] = recovered[key].to(tensors[key].dtype)
        here = [q for q in compressed.quantized if evaluated.weight_map[q.weight_key] == fname]
        grid = {q.module: QuantParams(grids[f"{q.module}.scale"], grids[f"{q.module}.zero"].to(torch.int32),
                                      q.scheme.bits, tensors[q.weight_key].shape[1] if q.scheme.group_size == -1
                                      else q.scheme.group_size, q.scheme.symmetric) for q in here}
        packed, _ = pack_shard(tensors, here, grid)
        write_tensors(out / "evaluated" / fname, tensors)
        write_tensors(out / "model" / fname, packed)
