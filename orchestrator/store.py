"""The shard store: every finished shard is committed atomically, so a rerun resumes where a run stopped.

A run works in `<output.dir>/.<run name>.partial/` until it completes:

    store.json          the fingerprint: the recipe keys that decide the bytes, the model, the calibration data
    evaluated/, model/  the shard files the workers write (each atomically: temp file, fsync, rename)
    shards/00003.json   shard 3's commit: its report record, keys and bytes. Written last (temp file,
                        fsync, rename), so a shard counts as done only once both of its files are complete
    events.jsonl        one line per commit, retry and stop, flushed as it happens

A rerun with the same fingerprint reuses every committed shard; a different fingerprint is refused
(`--overwrite` discards the old shards) rather than mixing shards of two different compressions.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import socket
import struct
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from orchestrator.errors import UserError
from orchestrator.files import write_json_atomic

# Recipe keys that do not change a shard's bytes: changing them keeps the committed shards usable.
# `recover` neither: the recovered checkpoint is committed apart, with its own settings (recover_stage.py).
NOT_IN_FINGERPRINT = ("name", "cluster", "tracking", "output", "recover")
SAMPLED_CHUNKS, CHUNK_BYTES = 16, 1 << 16


@dataclass(frozen=True)
class Fingerprint:
    recipe: str  # sha256 of the resolved recipe without NOT_IN_FINGERPRINT and data.eval
    model: str  # model_fingerprint()
    calibration: str | None  # sha256 of the calibration token ids; None for data-free stages

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()

    def differences(self, other: Fingerprint) -> list[str]:
        names = {"recipe": "the recipe (stages, partition, model dtype or calibration settings)",
                 "model": "the model's files", "calibration": "the calibration data"}
        return [names[k] for k in names if getattr(self, k) != getattr(other, k)]


def recipe_fingerprint(resolved: dict) -> str:
    kept = {k: v for k, v in resolved.items() if k not in NOT_IN_FINGERPRINT}
    kept["data"] = {k: v for k, v in kept.get("data", {}).items() if k != "eval"}
    kept["model"] = {k: v for k, v in kept.get("model", {}).items() if k != "path"}  # the files are hashed
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()


def model_fingerprint(model_dir: Path) -> str:
    """config.json, and every safetensors file's name, size, header (names, dtypes, shapes, offsets) and
    16 sampled 64 KiB chunks of its data: cheap for a model of hundreds of GB, and it changes with any
    re-export, re-shard or different model. (A single weight edited in place between samples is missed.)"""
    h = hashlib.sha256((model_dir / "config.json").read_bytes())
    for path in sorted(model_dir.glob("*.safetensors")):
        size = path.stat().st_size
        h.update(f"{path.name}:{size}".encode())
        with open(path, "rb") as f:
            header_len = struct.unpack("<Q", f.read(8))[0]
            h.update(f.read(header_len))
            start = 8 + header_len
            for i in range(SAMPLED_CHUNKS):
                f.seek(start + (size - start) * i // SAMPLED_CHUNKS)
                h.update(f.read(CHUNK_BYTES))
    return h.hexdigest()


def shard_key(index: int) -> str:
    """A shard's commit key in the store: 3 -> "00003" (the rest of the checkpoint is "rest")."""
    return f"{index:05d}"


class ShardStore:
    """A run's work folder with its committed shards. `open` only reads (it is part of planning, so a
    refusal changes nothing); `prepare` creates or clears the folder when the run starts."""

    def __init__(self, folder: Path, fingerprint: Fingerprint, reusable: bool):
        self.folder, self.fingerprint, self.reusable = folder, fingerprint, reusable

    @classmethod
    def open(cls, folder: Path, fingerprint: Fingerprint, overwrite: bool) -> ShardStore:
        meta = folder / "store.json"
        if not meta.is_file():
            return cls(folder, fingerprint, reusable=False)
        try:
            old = Fingerprint(**json.loads(meta.read_text())["fingerprint"])
        except (ValueError, KeyError, TypeError):
            old = None
        if old == fingerprint:
            return cls(folder, fingerprint, reusable=not overwrite)
        if overwrite:
            return cls(folder, fingerprint, reusable=False)
        changed = ", ".join(fingerprint.differences(old)) if old else "an unreadable store.json"
        raise UserError(f"output: {folder} holds the shards of an unfinished run that differs from this one "
                        f"({changed} changed), so they cannot be reused; pass --overwrite to discard them, "
                        f"or set output.name to start a separate run")

    def prepare(self) -> None:
        if not self.reusable:
            shutil.rmtree(self.folder, ignore_errors=True)
        for sub in ("evaluated", "model", "shards"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.folder / "store.json", {"fingerprint": asdict(self.fingerprint)})

    def commit_path(self, key: str) -> Path:
        return self.folder / "shards" / f"{key}.json"

    def committed(self) -> dict[str, dict]:
        """Commits whose files are all still there with their bytes, by key ("00003", "rest")."""
        out = {}
        for path in sorted((self.folder / "shards").glob("*.json")):
            try:
                commit = json.loads(path.read_text())
            except ValueError:
                continue
            files = [self.folder / f for f in commit.get("files", [])]
            if commit.get("fingerprint") == self.fingerprint.digest and all(f.is_file() for f in files):
                out[path.stem] = commit
        return out

    def commit(self, key: str, data: dict, files: list[Path]) -> bool:
        """Record a finished shard (its files already written); -> False if it was committed before."""
        path = self.commit_path(key)
        if path.exists():
            return False
        write_json_atomic(path, {"fingerprint": self.fingerprint.digest,
                                 "files": [str(f.relative_to(self.folder)) for f in files], **data})
        self.event("commit", shard=key)
        return True

    def event(self, kind: str, **fields) -> None:
        with open(self.folder / "events.jsonl", "a") as f:
            f.write(json.dumps({"time": round(time.time(), 3), "event": kind, **fields}) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def events(self, kind: str | None = None) -> list[dict]:
        path = self.folder / "events.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        return [e for e in map(json.loads, lines) if kind is None or e["event"] == kind]


class RunLock:
    """One `orchestrator run` at a time per run folder: an exclusive flock on `<output.dir>/.<run>.lock`.

    The kernel drops the lock when its process ends, however it ends (a SIGKILLed driver included), so a
    stale lock never blocks. The file says who holds it (pid, host, start time) for the refusal message,
    and is removed on release; `acquire` checks that the file it locked is still the one at the path, so
    a holder removing it at that moment cannot leave two processes holding two different files.
    """

    def __init__(self, path: Path, fd: int):
        self.path, self.fd = path, fd

    @classmethod
    def acquire(cls, run_dir: Path) -> RunLock:
        path = run_dir.with_name(f".{run_dir.name}.lock")
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise UserError(f"output: run {run_dir.name} in {run_dir.parent} is being written by another "
                                f"orchestrator run ({holder}); wait for it to end, or set output.name to start "
                                "a separate run") from None
            try:
                same_file = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same_file = False
            if same_file:
                break
            os.close(fd)  # its holder removed it between our open and our lock: take the new one
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        return cls(path, fd)

    def release(self) -> None:
        if self.fd < 0:
            return
        self.path.unlink(missing_ok=True)  # while still holding it: see acquire
        os.close(self.fd)
        self.fd = -1
