"""Reading and writing safetensors checkpoints, one shard at a time."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from orchestrator.files import atomic_path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5")
INDEX_NAME = "model.safetensors.index.json"


def read_keys(model_dir: str | Path, keys: list[str], key_to_file: dict[str, str]) -> dict[str, torch.Tensor]:
    """Only the named tensors, each file opened once (memory-mapped)."""
    by_file: dict[str, list[str]] = defaultdict(list)
    for k in keys:
        by_file[key_to_file[k]].append(k)
    out = {}
    for fname in sorted(by_file):
        with safe_open(Path(model_dir) / fname, framework="pt") as f:
            for k in by_file[fname]:
                out[k] = f.get_tensor(k)
    return out


def shard_file_name(position: int, total: int) -> str:
    return f"model-{position + 1:05d}-of-{total:05d}.safetensors"


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> int:
    """Same tensors -> same bytes: keys sorted, contiguous, fixed metadata. Returns tensor bytes.

    Atomic (files.atomic_path): a reader, or a retried shard writing the same file, never sees half of it.
    """
    ordered = {k: tensors[k].contiguous() for k in sorted(tensors)}
    with atomic_path(path) as tmp:
        save_file(ordered, str(tmp), metadata={"format": "pt"})
    return sum(t.numel() * t.element_size() for t in ordered.values())


def write_index(model_dir: Path, weight_map: dict[str, str], total_size: int) -> None:
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (model_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def copy_non_weight_files(src: Path, dst: Path) -> None:
    """config, tokenizer and generation files (and folders such as sentence-transformers' 1_Pooling)
    travel with the weights."""
    for item in sorted(src.iterdir()):
        if item.is_dir() and not item.name.startswith("."):
            shutil.copytree(item, dst / item.name, dirs_exist_ok=True)
        elif item.is_file() and not item.name.endswith(WEIGHT_SUFFIXES) and item.name != INDEX_NAME:
            shutil.copy2(item, dst / item.name)


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()

