"""Quality, speed and weight statistics of model folders, dense or compressed.

- causal LMs: perplexity on fixed, non-overlapping held-out windows of
  `seq_len` tokens, exp(total next-token NLL / predicted tokens), so every
  token weighs the same whatever the batch size; with a baseline, the KL
  divergence KL(baseline || model) of the next-token distributions, averaged
  over the same tokens (nats per token); for mixture-of-experts models, how
  often the compressed model's routers choose the dense model's experts.
- encoders: embedding fidelity against the baseline over held-out sentences:
  the mean cosine similarity of each sentence's mean-pooled embedding, and the
  top-k nearest-neighbour agreement (the mean fraction of a sentence's k
  nearest neighbours, by cosine, that the two models share).
- speed: forward latency at a few batch sizes (median, min and max over
  repeats, after a warm-up) and throughput in tokens/s; the memory each model
  takes once loaded (growth of the process's resident set while loading it).
- weights: per-layer sparsity, and against a baseline per-layer relative error
  and SQNR, of the transformer blocks' Linear layers.

Every model is loaded the way a user loads it (transformers' from_pretrained;
compressed-tensors checkpoints unpack to dense weights on the CPU, so their
speed is the dense model's: there are no packed-integer CPU kernels).
"""

from __future__ import annotations

import math
import resource
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
import torch.nn.functional as F
import transformers
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from orchestrator.data import eval_sentences, eval_windows
from orchestrator.experts import is_experts_module
from orchestrator.techniques.result import weight_error
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


def load(model_dir: str | Path, causal: bool, threads: int) -> torch.nn.Module:
    """A model folder as a user loads it; packed (compressed-tensors) weights unpacked by one forward pass."""
    torch.set_num_threads(max(1, threads))
    transformers.utils.logging.disable_progress_bar()
    auto = AutoModelForCausalLM if causal else AutoModel
    model = auto.from_pretrained(model_dir, dtype="auto").eval()
    with torch.no_grad():
        model(input_ids=torch.zeros(1, 4, dtype=torch.long))
    return model


def resident_bytes() -> int:
    return psutil.Process().memory_info().rss


@torch.no_grad()
def perplexities(models: dict[str, torch.nn.Module], tokenizer, cfg: EvalDataConfig) -> dict:
    """Perplexity of each model on the same windows; with a "dense" and a "compressed" model, the KL
    divergence KL(dense || compressed) per predicted token. The models run batch by batch in lockstep,
    so no logits are kept beyond one batch (but the first window's, for the export check)."""
    start = time.perf_counter()
    windows = eval_windows(tokenizer, cfg)  # [n, L]
    nll = {name: 0.0 for name in models}
    sample: dict[str, torch.Tensor] = {}
    kl_sum, tokens = 0.0, 0
    for batch in windows.split(cfg.batch_size):
        logp = {}
        for name, model in models.items():
            logits = model(input_ids=batch).logits.float()  # [b, L, V]
            sample.setdefault(name, logits[0].clone())
            logp[name] = F.log_softmax(logits[:, :-1], dim=-1)  # [b, L-1, V] predicting tokens 1..L-1
            nll[name] -= logp[name].gather(-1, batch[:, 1:, None]).sum().item()
        if {"dense", "compressed"} <= logp.keys():  # sum_v p_dense (log p_dense - log p_compressed)
            kl_sum += F.kl_div(logp["compressed"], logp["dense"], log_target=True, reduction="sum").item()
        tokens += batch[:, 1:].numel()
    seconds = time.perf_counter() - start
    out = {name: Perplexity(math.exp(nll[name] / tokens), nll[name] / tokens, tokens, windows.shape[0], seconds,
                            windows[0].clone(), sample[name]) for name in models}
    out["kl_nats"] = kl_sum / tokens if {"dense", "compressed"} <= models.keys() else None
    return out


class RouterLog:
    """The experts every MoE block's router chose for each token while a model runs: a pre-hook on each
    experts module reads its top_k_index argument [tokens, k]."""

    def __init__(self, model: torch.nn.Module):
        self.chosen: dict[str, list[torch.Tensor]] = {}
        self.handles = [module.register_forward_pre_hook(self._hook(name), with_kwargs=True)
                        for name, module in model.named_modules() if is_experts_module(module)]

    def _hook(self, name: str):
        def record(module, args, kwargs):
            top_k_index = args[1] if len(args) > 1 else kwargs["top_k_index"]
            self.chosen.setdefault(name, []).append(top_k_index.detach().clone())
        return record

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def router_agreement(dense: RouterLog, compressed: RouterLog) -> dict | None:
    """Over every MoE block and evaluated token: the mean fraction of the dense router's top-k experts the
    compressed model's router chose too (topk_agreement), and the fraction of tokens sent to exactly the
    same experts (same_experts). None for a model without experts."""
    overlap = same = tokens = slots = 0
    for name, chosen in dense.chosen.items():
        a, b = torch.cat(chosen), torch.cat(compressed.chosen[name])  # [T, k] each, same tokens in order
        hits = (a[:, :, None] == b[:, None, :]).any(-1).sum(-1)  # [T]: experts both chose
        overlap, same = overlap + hits.sum().item(), same + (hits == a.shape[1]).sum().item()
        tokens, slots = tokens + a.shape[0], slots + a.numel()
    if not tokens:
        return None
    return {"topk_agreement": overlap / slots, "same_experts": same / tokens, "token_blocks": tokens}


def perplexity(model_dir: str | Path, cfg: EvalDataConfig, threads: int = 1) -> Perplexity:
    """Held-out perplexity of one model folder."""
    model = load(model_dir, True, threads)
    return perplexities({"model": model}, AutoTokenizer.from_pretrained(model_dir), cfg)["model"]


@torch.no_grad()
def embed(model: torch.nn.Module, tokenizer, sentences: list[str], seq_len: int, batch_size: int) -> torch.Tensor:
    """Sentences -> [n, hidden] L2-normalised mean-pooled last hidden states (sentence-transformers' pooling)."""
    out = []
    for i in range(0, len(sentences), batch_size):
        enc = tokenizer(sentences[i:i + batch_size], padding=True, truncation=True, max_length=seq_len,
                        return_tensors="pt")
        hidden = model(**enc).last_hidden_state.float()  # [b, T, H]
        mask = enc["attention_mask"][..., None].float()  # [b, T, 1]
        out.append(F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
    return torch.cat(out)


def fidelity(dense: torch.nn.Module, compressed: torch.nn.Module, tokenizer, cfg: EvalDataConfig) -> dict:
    """Embedding fidelity of a compressed encoder against its dense baseline on held-out sentences."""
    start = time.perf_counter()
    sentences = eval_sentences(cfg)
    E = {name: embed(model, tokenizer, sentences, cfg.seq_len, cfg.batch_size)
         for name, model in (("dense", dense), ("compressed", compressed))}  # each [n, H]
    cosine = (E["dense"] * E["compressed"]).sum(-1)  # [n]
    k = cfg.top_k
    neighbours = {}
    for name, e in E.items():
        sim = e @ e.T  # [n, n]
        sim.fill_diagonal_(-math.inf)  # a sentence is not its own neighbour
        neighbours[name] = sim.topk(k, dim=-1).indices  # [n, k]
    shared = [len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(neighbours["dense"], neighbours["compressed"])]
    return {"cosine_mean": cosine.mean().item(), "cosine_min": cosine.min().item(),
            "topk_agreement": sum(shared) / len(shared), "k": k, "sentences": len(sentences),
            "seconds": round(time.perf_counter() - start, 3)}


@torch.no_grad()
def speed(model: torch.nn.Module, cfg: EvalDataConfig, threads: int) -> dict:
    """Forward latency per batch size of seq_len random tokens: median/min/max seconds over repeats
    (after one warm-up), and tokens/s at the median."""
    ids = torch.randint(0, model.config.vocab_size, (max(cfg.speed_batch_sizes), cfg.seq_len),
                        generator=torch.Generator().manual_seed(0))
    per_batch = {}
    for b in cfg.speed_batch_sizes:
        x = ids[:b]
        model(input_ids=x)  # warm-up
        times = []
        for _ in range(cfg.speed_repeats):
            t = time.perf_counter()
            model(input_ids=x)
            times.append(time.perf_counter() - t)
        median = statistics.median(times)
        per_batch[str(b)] = {"latency_median_s": median, "latency_min_s": min(times), "latency_max_s": max(times),
                             "tokens_per_s": b * cfg.seq_len / median}
    return {"seq_len": cfg.seq_len, "repeats": cfg.speed_repeats, "threads": threads, "batch": per_batch}


def evaluate_folders(model_dir: str | Path, baseline_dir: str | Path | None, causal: bool, cfg: EvalDataConfig,
                     threads: int = 1, linears: list[str] = ()) -> dict:
    """The whole measurement of a model folder (and its dense baseline), in one process.

    -> {"quality": {"dense", "compressed", "kl_nats"} or fidelity, "speed": per model or None,
        "samples": the first window's Perplexity objects (causal LMs), "layers": weight_stats of `linears`}.
    Each model's `resident_bytes` is the growth of this process's RSS while loading (and unpacking) it.
    """
    folders = {"compressed": model_dir} if baseline_dir is None else {"dense": baseline_dir, "compressed": model_dir}
    models, memory = {}, {}
    for name, folder in folders.items():
        before = resident_bytes()
        models[name] = load(folder, causal, threads)
        memory[name] = resident_bytes() - before
    tokenizer = AutoTokenizer.from_pretrained(baseline_dir or model_dir)
    samples = None
    if causal:
        routers = {name: RouterLog(model) for name, model in models.items()}
        result = perplexities(models, tokenizer, cfg)
        for chosen in routers.values():
            chosen.close()
        quality = {name: result[name].summary() if name in result else None for name in ("dense", "compressed")}
        quality["kl_nats"] = result["kl_nats"]
        agreement = router_agreement(routers["dense"], routers["compressed"]) if "dense" in routers else None
        if agreement:  # mixture-of-experts models only
            quality["router"] = agreement
        samples = {name: result[name] for name in models}
    elif baseline_dir is not None:
        quality = {"dense": {"fidelity": {"cosine_mean": 1.0, "topk_agreement": 1.0}},
                   "compressed": {"fidelity": fidelity(models["dense"], models["compressed"], tokenizer, cfg)}}
    else:
        quality = {"dense": None, "compressed": None}  # an encoder's fidelity needs its dense baseline
    timed = None
    if cfg.speed:  # one model at a time, never while the other runs
        timed = {name: speed(model, cfg, threads) | {"resident_bytes": memory[name]} for name, model in models.items()}
    layers = weight_stats(models["compressed"], list(linears), models.get("dense")) if linears else []
    return {"quality": quality, "speed": timed, "samples": samples, "layers": layers,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


@torch.no_grad()
def weight_stats(model: torch.nn.Module, linears: list[str], base: torch.nn.Module | None = None) -> list[dict]:
    """Per layer (partition.block_linears' names: Linear modules, experts of fused parameters): sparsity,
    and against the baseline relative error and SQNR (dB)."""
    def weight(m: torch.nn.Module, name: str) -> torch.Tensor:
        if name.endswith("]"):  # one expert of a fused experts parameter [E, out, in]
            param, expert = name[:-1].split("[")
            return m.get_parameter(param)[int(expert)].float()
        return m.get_submodule(name).weight.float()

    rows = []
    for name in linears:
        W = weight(model, name)
        row = {"name": name, "sparsity": (W == 0).float().mean().item()}
        if base is not None:
            row["relative_error"], row["sqnr_db"] = weight_error(W, weight(base, name))
        rows.append(row)
    return rows
