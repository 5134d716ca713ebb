"""Texts and the token windows cut from them: the one place windows are built.

- calibration windows: `num_samples` windows at seeded random offsets of the train split, hashed
  (the hash goes in the report and the store's fingerprint); for encoders, whole sentences instead
  (padded, with their attention mask);
- evaluation windows: consecutive, non-overlapping windows of the held-out split;
- evaluation sentences (encoders): the held-out split's lines;
- random training windows (the reference models' training, the recover stage's windows).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from orchestrator.errors import UserError
from orchestrator.recipe import CalibrationDataConfig, EvalDataConfig


@dataclass(frozen=True)
class Calibration:
    input_ids: torch.Tensor  # [num_samples, seq_len] int64
    sha256: str  # of the token ids (and the mask): what the compression actually saw
    attention_mask: torch.Tensor | None = None  # [num_samples, seq_len] int64, 0 = padding (sentences only)


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


def token_ids(tokenizer, text: str) -> torch.Tensor:
    """A whole text's token ids, [tokens] int64, without special tokens."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def random_windows(ids: torch.Tensor, count: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """[count, seq_len] windows of `ids` at random offsets drawn from `generator`."""
    starts = torch.randint(0, ids.numel() - seq_len + 1, (count, 1), generator=generator)  # [count, 1]
    return ids[starts + torch.arange(seq_len)]


def calibration_windows(tokenizer, cfg: CalibrationDataConfig) -> Calibration:
    """`num_samples` windows of `seq_len` tokens at seeded random offsets of the tokenized text."""
    ids = token_ids(tokenizer, read_text(cfg.source, "train", "data.calibration.source"))
    if ids.numel() < cfg.seq_len + 1:
        raise UserError(f"data.calibration.source: the text has {ids.numel()} tokens, fewer than "
                        f"seq_len={cfg.seq_len} + 1")
    windows = random_windows(ids, cfg.num_samples, cfg.seq_len, torch.Generator().manual_seed(cfg.seed))
    return Calibration(windows, hashlib.sha256(windows.numpy().tobytes()).hexdigest())


def text_lines(text: str) -> list[str]:
    """The non-trivial lines of a text (4+ words), whitespace collapsed, in order."""
    lines = [" ".join(line.split()) for line in text.splitlines()]
    return [line for line in lines if len(line.split()) >= 4]


def calibration_sentences(tokenizer, cfg: CalibrationDataConfig) -> Calibration:
    """`num_samples` lines of the train text drawn without replacement (seeded), each tokenized as the
    model sees a sentence in use (its special tokens, at most seq_len tokens), padded to the longest:
    input_ids and attention_mask [num_samples, longest]."""
    lines = text_lines(read_text(cfg.source, "train", "data.calibration.source"))
    if len(lines) < cfg.num_samples:
        raise UserError(f"data.calibration.source: {len(lines)} lines of 4+ words, fewer than "
                        f"num_samples={cfg.num_samples} (data.calibration.shape: sentences)")
    if tokenizer.pad_token_id is None:
        raise UserError("data.calibration.shape: sentences needs a tokenizer with a padding token; "
                        "this one has none (use windows)")
    order = torch.randperm(len(lines), generator=torch.Generator().manual_seed(cfg.seed))[:cfg.num_samples]
    batch = tokenizer([lines[i] for i in order.tolist()], padding="longest", truncation=True, max_length=cfg.seq_len,
                      return_tensors="pt")
    ids, mask = batch["input_ids"].long(), batch["attention_mask"].long()
    digest = hashlib.sha256(ids.numpy().tobytes() + mask.numpy().tobytes()).hexdigest()
    return Calibration(ids, digest, mask)


def eval_windows(tokenizer, cfg: EvalDataConfig) -> torch.Tensor:
    """Held-out text -> [windows, seq_len] consecutive, non-overlapping token windows."""
    ids = token_ids(tokenizer, read_text(cfg.source, "heldout", "data.eval.source"))
    n = ids.numel() // cfg.seq_len
    if cfg.max_windows:
        n = min(n, cfg.max_windows)
    if n == 0:
        raise UserError(f"data.eval.source: the held-out text has fewer than seq_len={cfg.seq_len} tokens")
    return ids[: n * cfg.seq_len].reshape(n, cfg.seq_len)


def eval_sentences(cfg: EvalDataConfig) -> list[str]:
    """Held-out sentences for encoder fidelity: the non-trivial lines of the held-out text, in order."""
    sentences = text_lines(read_text(cfg.source, "heldout", "data.eval.source"))
    if len(sentences) <= cfg.top_k:
        raise UserError(f"data.eval.source: {len(sentences)} held-out sentences of 4+ words; "
                        f"top-k agreement needs more than top_k={cfg.top_k}")
    return sentences[: cfg.sentences]
