"""The residual-stream rotation (rotate.py): same function, a checkpoint of the same architecture, refused
where it does not apply, and a run that compresses the rotated model but measures against the given one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig

from orchestrator.errors import UserError
from orchestrator.rotate import check_rotatable, rotate_checkpoint, rotation_matrix
from tests.helpers import REPO, hashes, load_export, run_cli
from tests.models import CONFIGS, save_random_model, save_random_norms_model


@pytest.mark.parametrize("d", [64, 96, 576])
def test_the_rotation_is_orthogonal_and_spreads_a_channel(d):
    Q = rotation_matrix(d, seed=0)
    assert torch.allclose(Q @ Q.T, torch.eye(d, dtype=torch.float64), atol=1e-12)
    assert torch.equal(Q, rotation_matrix(d, seed=0)) and not torch.equal(Q, rotation_matrix(d, seed=1))
    one_hot = torch.zeros(d, dtype=torch.float64)
    one_hot[3] = 1
    assert (one_hot @ Q).abs().max() < 0.5  # an outlier channel is spread over many


@pytest.mark.parametrize("kind,tied,hidden", [("llama", False, None), ("qwen2", True, None), ("mistral", False, 96)])
def test_the_rotated_checkpoint_computes_the_same_logits(tmp_path, kind, tied, hidden):
    src = save_random_norms_model(kind, tmp_path / "src", tied, hidden)
    info = rotate_checkpoint(src, tmp_path / "rot", seed=0)
    dense, rotated = (AutoModelForCausalLM.from_pretrained(p).eval() for p in (src, tmp_path / "rot"))
    assert type(rotated) is type(dense) and not rotated.config.tie_word_embeddings
    assert info["untied_lm_head"] == tied
    ids = torch.randint(0, dense.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = dense(ids).logits, rotated(ids).logits
    assert (got - want).abs().max() < 1e-4 * want.abs().max()
    weights = load_file(tmp_path / "rot" / "model.safetensors")
    norms = [k for k in weights if k.endswith("norm.weight")]
    assert norms and all(torch.equal(weights[k], torch.ones_like(weights[k])) for k in norms)  # folded
    assert not torch.allclose(weights["model.layers.0.mlp.down_proj.weight"],
                              load_file(src / "model.safetensors")["model.layers.0.mlp.down_proj.weight"])


@pytest.mark.parametrize("kind", ["gpt2", "opt", "bert"])
def test_other_families_are_refused_by_name(kind):
    with pytest.raises(UserError, match="rotation.enabled: .*llama, mistral, qwen2.*" + kind):
        check_rotatable(CONFIGS[kind][0].to_dict())


def test_a_rotation_of_an_unknown_family_exits_2_before_any_work(tmp_path):
    model = save_random_model("opt", tmp_path / "opt")
    proc = run_cli("run", str(REPO / "recipes" / "rtn-w4g128-rotated.yaml"), f"model.path={model}", f"output.dir={tmp_path / 'runs'}",
                   "tracking.enabled=false", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "rotation.enabled" in proc.stderr and "opt" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_a_rotated_run_exports_a_loadable_model_measured_against_the_given_one(tmp_path, micro_lm):
    common = [f"model.path={micro_lm}", f"output.dir={tmp_path}", "tracking.enabled=false", "data.eval.speed=false",
              "data.eval.max_windows=8"]
    for name, recipe in [("plain", "rtn-w4g128"), ("rotated", "rtn-w4g128-rotated")]:
        proc = run_cli("run", str(REPO / "recipes" / f"{recipe}.yaml"), *common, f"output.name={name}", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
    plain, rotated = (json.loads((tmp_path / n / "report.json").read_text()) for n in ("plain", "rotated"))
    assert rotated["model"]["dir"] == plain["model"]["dir"] == str(micro_lm)  # measured against the given model
    assert rotated["rotation"]["seed"] == 0 and "rotation" not in plain
    assert (Path(rotated["rotation"]["dir"]) / "rotation.json").is_file()
    assert rotated["quality"]["dense"]["perplexity"] == plain["quality"]["dense"]["perplexity"]
    model = load_export(tmp_path / "rotated" / "model")
    assert not model.config.tie_word_embeddings
    # the rotated weights differ, and the quality stays that of a 4-bit model (micro-lm: within 5%)
    ppl = rotated["quality"]["compressed"]["perplexity"]
    assert abs(ppl / plain["quality"]["compressed"]["perplexity"] - 1) < 0.05
    assert hashes(tmp_path / "rotated") != hashes(tmp_path / "plain")
