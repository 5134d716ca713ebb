"""Writing files so that a crash never leaves half of one: the one atomic-write helper, and folder fsync.

A file is written beside its target under a temporary name, flushed to disk, then renamed over the
target, so a reader (or a retried shard writing the same file) sees the old file or the new one, never
part of one.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """-> a temporary path beside `path` to write to; when the block succeeds it is fsynced, made
    readable by all (a shared cluster folder), and renamed over `path`; when it fails it is removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # safetensors writes 0600
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # gone already after a successful rename


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: Path, data: dict, indent: int = 1) -> None:
    write_text_atomic(path, json.dumps(data, indent=indent, default=str))


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
