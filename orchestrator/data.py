"""Calibration data: token windows drawn (seeded) from a text, hashed for reports and resume keys."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from orchestrator.errors import UserError
from orchestrator.recipe import CalibrationDataConfig


@dataclass(frozen=True)
class Calibration:
    input_ids: torch.Tensor  # [num_samples, seq_len] int64
    sha256: str  # of the token ids: what the compression actually saw


def read_text(source: str, split: str, key: str) -> str:
    """'reference' (that split of the reference corpus), a .txt file, or a .jsonl file of {"text": ...}.

    `split` is "train" or "heldout"; `key` names the recipe key in error messages.
    """
    if source == "reference":
        from orchestrator.corpus import reference_texts

        train, heldout = reference_texts()
        return train if split == "train" else heldout
    path = Path(source)
    if not path.is_file():
        raise UserError(f"{key}: file not found: {path}")
    if path.suffix == ".jsonl":
        texts = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                texts.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"{key}: {path} line {n} is not a JSON object with a 'text'") from None
        return "\n\n".join(texts)
    if path.suffix != ".txt":
        raise UserError(f"{key}: {path} must be a .txt or .jsonl file")
    return path.read_text(encoding="utf-8")


def calibration_windows(tokenizer, cfg: CalibrationDataConfig) -> Calibration:
    """`num_samples` windows of `seq_len` tokens at seeded random offsets of the tokenized text."""
    from orchestrator.reference import tokenize_split

    ids = tokenize_split(tokenizer, read_text(cfg.source, "train", "data.calibration.source"))
    if ids.numel() < cfg.seq_len + 1:
        raise UserError(f"data.calibration.source: the text has {ids.numel()} tokens, fewer than "
                        f"seq_len={cfg.seq_len} + 1")
    generator = torch.Generator().manual_seed(cfg.seed)
    starts = torch.randint(0, ids.numel() - cfg.seq_len + 1, (cfg.num_samples, 1), generator=generator)
    windows = ids[starts + torch.arange(cfg.seq_len)]  # [num_samples, seq_len]
    return Calibration(windows, hashlib.sha256(windows.numpy().tobytes()).hexdigest())
