"""`orchestrator plan` on a model folder holding config.json alone: the shards and tensor sizes of the
checkpoint's own plan, counted from the config; `orchestrator run` refuses such a folder."""

import copy
import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from orchestrator.partition import partition_model
from orchestrator.plan import Plan, make_plan
from orchestrator.planner import tensor_bytes
from orchestrator.recipe import load_recipe
from tests.helpers import REPO, run_cli
from tests.models import CONFIGS, MOE_CONFIGS, save_random_moe

RECIPE = str(REPO / "recipes" / "gptq-w4g128.yaml")
SMALL = ["data.calibration.num_samples=16", "data.calibration.seq_len=64"]


def config_only(model_dir, dest):
    """A folder with model_dir's config.json and nothing else."""
    dest.mkdir(parents=True)
    shutil.copy(model_dir / "config.json", dest / "config.json")
    return dest


def plan_of(model_dir, tmp_path, *overrides):
    recipe = load_recipe(RECIPE, [f"model.path={model_dir}", *SMALL, "stages.0.group_size=32",  # experts 64 wide
                                  f"output.dir={tmp_path / 'runs'}", *overrides])
    return make_plan(recipe, progress=False, need_weights=False)  # as `orchestrator plan` makes it


def shard_sizes(plan) -> list[tuple]:
    return [(shard.label, s.weight_bytes, s.hessian_bytes, s.activation_bytes)
            for shard, s in zip(plan.partition.shards, plan.forecast.shards)]


def assert_planned_alike(model_dir, tmp_path, *overrides) -> Plan:
    """The config-only plan has the checkpoint plan's shards, and every tensor the checkpoint's bytes."""
    real = plan_of(model_dir, tmp_path, *overrides)
    alone = plan_of(config_only(model_dir, tmp_path / "config-only"), tmp_path, *overrides)
    assert real.partition.key_bytes is None and alone.partition.key_bytes is not None
    keys = real.partition.key_to_file
    assert alone.partition.key_bytes == tensor_bytes(model_dir, list(keys), keys)
    assert shard_sizes(alone) == shard_sizes(real)
    assert alone.partition.rest_keys == real.partition.rest_keys
    assert alone.calibration is None and alone.forecast.tokens == real.forecast.tokens == 16 * 64
    return alone


def test_plan_from_config_alone_prints_the_checkpoints_forecast(micro_lm, tmp_path):
    assert_planned_alike(micro_lm, tmp_path)
    proc = run_cli("plan", RECIPE, f"model.path={tmp_path / 'config-only'}", *SMALL, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "sizes: from config.json alone (no weights in the folder), tensors of float32 (config.json's dtype)" in out
    assert "calibration: 1024 tokens, data.calibration.num_samples x seq_len (no data read" in out
    for line in ("| 0 | model.layers.0 |", "| 1 | model.layers.1 |", "driver peak:", "worker peak:", "object store:",
                 "time: about"):
        assert line in out


@pytest.mark.parametrize("named", [True, False])
def test_sizes_take_the_configs_dtype_else_bfloat16(micro_lm, tmp_path, named):
    config = json.loads((micro_lm / "config.json").read_text())
    del config["dtype"]  # float32, as the checkpoint stores it
    if named:
        config["torch_dtype"] = "bfloat16"  # the older key
    (tmp_path / "config.json").write_text(json.dumps(config))
    alone, real = partition_model(tmp_path, 1, need_weights=False), partition_model(micro_lm, 1)
    assert alone.dtype == ("bfloat16 (config.json's dtype)" if named else
                           "bfloat16 (config.json names no dtype: the default)")
    keys = real.key_to_file
    assert alone.key_bytes == {k: n // 2 for k, n in tensor_bytes(micro_lm, list(keys), keys).items()}


def save_tied_llama(dest, tokenizer_dir):
    config = copy.deepcopy(CONFIGS["llama"][0])
    config.tie_word_embeddings = True  # the checkpoint leaves lm_head.weight out
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(dest)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, dest / name)
    return dest


@pytest.mark.parametrize("kind", [*MOE_CONFIGS, "llama-tied"])
def test_config_only_plan_of_experts_and_tied_models(micro_lm, tmp_path, kind):
    """Mixture-of-experts checkpoints keep one tensor per expert where the module tree fuses them; the plan
    from the config names and sizes them as the checkpoint does, whole blocks and expert-split alike."""
    saved = save_tied_llama if kind == "llama-tied" else lambda dest, tok: save_random_moe(kind, dest, tok)
    model_dir = saved(tmp_path / kind, micro_lm)
    assert_planned_alike(model_dir, tmp_path / "whole")
    if kind != "llama-tied":
        split = assert_planned_alike(model_dir, tmp_path / "split", "partition.experts_per_shard=2")
        assert any(shard.experts for shard in split.partition.shards)


def test_run_refuses_a_folder_without_weights(micro_lm, tmp_path):
    folder = config_only(micro_lm, tmp_path / "config-only")
    proc = run_cli("run", RECIPE, f"model.path={folder}", f"output.dir={tmp_path}/runs", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    message = proc.stderr.strip().splitlines()[-1]
    assert message.startswith(f"error: model.path: {folder} has no model.safetensors: compressing needs the weights")
    assert not (tmp_path / "runs").exists()
