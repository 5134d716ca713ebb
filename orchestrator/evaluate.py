"""Quality of a model folder: perplexity on held-out text (causal LMs).

Fixed, non-overlapping windows of `seq_len` tokens; the perplexity is
exp(total next-token NLL / number of predicted tokens), so every token weighs
the same whatever the batch size.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from orchestrator.data import read_text
from orchestrator.errors import UserError
from orchestrator.recipe import EvalDataConfig


@dataclass
class Perplexity:
    perplexity: float
    nll: float  # mean next-token negative log-likelihood, nats
    tokens: int  # predicted tokens counted
    windows: int
    seconds: float
    sample_input_ids: torch.Tensor  # [seq_len] the first window
    sample_logits: torch.Tensor  # [seq_len, vocab] float32 logits of the first window

    def summary(self) -> dict:
        return {"perplexity": self.perplexity, "nll": self.nll, "tokens": self.tokens, "windows": self.windows,
                "seconds": round(self.seconds, 3)}


def eval_windows(tokenizer, cfg: EvalDataConfig) -> torch.Tensor:
    """Held-out text -> [windows, seq_len] token ids."""
    from orchestrator.reference import tokenize_split

    ids = tokenize_split(tokenizer, read_text(cfg.source, "heldout", "data.eval.source"))
    n = ids.numel() // cfg.seq_len
    if cfg.max_windows:
        n = min(n, cfg.max_windows)
    if n == 0:
        raise UserError(f"data.eval.source: the held-out text has fewer than seq_len={cfg.seq_len} tokens")
    return ids[: n * cfg.seq_len].reshape(n, cfg.seq_len)


@torch.no_grad()
def perplexity(model_dir: str | Path, cfg: EvalDataConfig, threads: int = 1, dtype: str = "auto") -> Perplexity:
    """Load a model folder (dense or compressed) and measure held-out perplexity."""
    start = time.perf_counter()
    torch.set_num_threads(max(1, threads))
    transformers.utils.logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    windows = eval_windows(tokenizer, cfg)  # [n, L]
    total_nll, total_tokens, sample_logits = 0.0, 0, None
    for batch in windows.split(cfg.batch_size):
        logits = model(input_ids=batch).logits.float()  # [b, L, V]
        if sample_logits is None:
            sample_logits = logits[0].clone()
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
        total_nll += nll.item()
        total_tokens += batch[:, 1:].numel()
    mean_nll = total_nll / total_tokens
    return Perplexity(math.exp(mean_nll), mean_nll, total_tokens, windows.shape[0],
                      time.perf_counter() - start, windows[0].clone(), sample_logits)
