"""AWQ (awq.py): the searched scales lower the layers' output error, folding them leaves the model's function
unchanged, a run exports a loadable model whose bytes do not depend on the worker count, and models AWQ
cannot fold into are refused before any work."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from orchestrator.awq import output_error, scale_shard, scaled_input, search_scale
from orchestrator.partition import partition_model
from orchestrator.recipe import Stage
from orchestrator.techniques import get_technique
from orchestrator.techniques.rtn import QuantizeParams, rtn
from tests.helpers import REPO, hashes, load_export, run_cli
from tests.models import save_random_model, save_random_norms_model

GRID = QuantizeParams(bits=3, group_size=32)


def inputs_with_outliers(d: int, seed: int = 0) -> torch.Tensor:
    """[512, d] activations, a few channels 30x larger than the rest (as in LLMs' residual streams)."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(512, d, generator=gen)
    X[:, torch.randperm(d, generator=gen)[:4]] *= 30
    return X


def hessian(X: torch.Tensor) -> torch.Tensor:
    return 2 / len(X) * X.T @ X


def test_the_searched_scale_lowers_the_output_error_and_alpha_0_is_no_scale():
    X = inputs_with_outliers(128)
    H = hessian(X)
    W = torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
    s, alpha = search_scale([W], H, GRID, points=20)
    assert alpha > 0
    assert output_error(W, s, H, GRID) < 0.8 * output_error(W, torch.ones(128), H, GRID)
    # the objective is the output error on the calibration tokens: 2/n sum ||W x - Q(W s)(x / s)||^2
    direct = 2 / len(X) * (X @ W.T - (X / s) @ rtn(W * s, GRID).weight.T).square().sum()
    assert torch.isclose(direct, output_error(W, s, H, GRID), rtol=1e-3)
    ones, alpha0 = search_scale([W], H, GRID, points=1)
    assert alpha0 == 0 and torch.equal(ones, torch.ones(128))


@pytest.mark.parametrize("kind,kv_heads", [("llama", 2), ("qwen2", 4)])  # GQA: v -> o not folded; v_proj bias
def test_the_folded_scales_leave_the_model_function_unchanged(tmp_path, kind, kv_heads):
    src = save_random_norms_model(kind, tmp_path / "src", kv_heads=kv_heads)
    dense = load_file(src / "model.safetensors")
    partition = partition_model(src, 1, False)
    stage = Stage(0, get_technique("rtn"), QuantizeParams(bits=3, group_size=32, awq=True), [".*"], [])
    H_of_width = {d: hessian(inputs_with_outliers(d, seed=d)) for d in (128, 256)}
    widths = {layer.name: layer.in_features for shard in partition.shards for layer in shard.linears}
    scaled, folds = dict(dense), set()
    for shard in partition.shards:
        tensors = {k: dense[k] for k in shard.tensor_keys}
        out, scales, stats = scale_shard(shard, tensors, stage, lambda name: H_of_width[widths[name]])
        scaled.update(out)
        folds |= {v["fold"] for v in stats.values() if v["alpha"] > 0}
    local = {f.split(".", 3)[3] for f in folds}
    want = {"input_layernorm.weight", "post_attention_layernorm.weight", "mlp.up_proj.weight"}
    assert local >= want and (("self_attn.v_proj.weight" in local) == (kv_heads == 4))
    assert not torch.equal(scaled["model.layers.0.input_layernorm.weight"],
                           dense["model.layers.0.input_layernorm.weight"])
    save_file(scaled, str(src / "model.safetensors"), metadata={"format": "pt"})
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    with torch.no_grad():
        got = model(ids).logits
        model.load_state_dict(dense, strict=False)
        want_logits = model(ids).logits
    assert (got - want_logits).abs().max() < 1e-4 * want_logits.abs().max()


@pytest.mark.slow
def test_an_awq_run_exports_a_loadable_model_with_the_same_bytes_for_1_and_2_workers(tmp_path, micro_lm):
    common = [f"model.path={micro_lm}", f"output.dir={tmp_path}", "tracking.enabled=false", "data.eval.speed=false",
              "data.eval.max_windows=8", "data.calibration.num_samples=16"]
    for name, workers in [("awq", 2), ("awq-1", 1)]:
        proc = run_cli("run", str(REPO / "recipes" / "rtn-w4g128-awq.yaml"), *common, f"output.name={name}",
                       f"cluster.workers={workers}", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
    assert hashes(tmp_path / "awq") == hashes(tmp_path / "awq-1")
    report = json.loads((tmp_path / "awq" / "report.json").read_text())
    layers = [layer for shard in report["shards"] for layer in shard["layers"]]
    assert all("alpha" in layer["stats"]["awq"] for layer in layers)
    assert any(layer["stats"]["awq"]["alpha"] > 0 for layer in layers)
    load_export(tmp_path / "awq" / "model")  # transformers loads it (the run's load check compared its logits)
    exported = {k: v for f in (tmp_path / "awq" / "model").glob("*.safetensors") for k, v in load_file(f).items()}
    dense = load_file(micro_lm / "model.safetensors")
    norms = {layer["stats"]["awq"]["fold"]: layer["stats"]["awq"]["alpha"] > 0 for layer in layers
             if layer["stats"]["awq"]["fold"].endswith("norm.weight")}  # (the Linear folds are packed there)
    assert any(norms.values())
    assert norms == {fold: not torch.equal(exported[fold], dense[fold]) for fold in norms}  # scaled where alpha > 0


@pytest.mark.parametrize("override,message", [
    ("stages.0.awq_points=0", "awq_points"),
])
def test_bad_awq_settings_exit_2(tmp_path, override, message):
    proc = run_cli("run", str(REPO / "recipes" / "rtn-w4g128-awq.yaml"), override, f"output.dir={tmp_path / 'runs'}",
                   "tracking.enabled=false", cwd=tmp_path)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def test_awq_on_a_family_it_cannot_fold_into_exits_2_before_any_work(tmp_path):
    model = save_random_model("opt", tmp_path / "opt")
    proc = run_cli("run", str(REPO / "recipes" / "rtn-w4g128-awq.yaml"), f"model.path={model}",
                   f"output.dir={tmp_path / 'runs'}", "tracking.enabled=false", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "stages.0.awq" in proc.stderr and "'opt'" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_the_layers_reading_a_scaled_input_get_its_hessian():
    X = inputs_with_outliers(64)
    s = torch.rand(64) + 0.5
    H = scaled_input(lambda name: hessian(X), {"q": s})
    assert torch.allclose(H("q"), hessian(X / s), rtol=1e-4, atol=1e-4)
    assert torch.equal(H("other"), hessian(X))  # a layer whose input was not scaled


def test_two_stages_with_awq_exit_2(tmp_path):
    recipe = (REPO / "recipes" / "rtn-w4g128-awq.yaml").read_text().replace("cluster:", """  - method: rtn
    bits: 8
    group_size: 128
    awq: true
cluster:""")
    path = tmp_path / "two.yaml"
    path.write_text(recipe)
    proc = run_cli("run", str(path), f"output.dir={tmp_path / 'runs'}", "tracking.enabled=false", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "stages.1.awq" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()
