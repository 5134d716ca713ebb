"""Every shipped calibration-aware recipe (and the MSE grid search) runs end to end on the micro
reference model, in parallel and sequential calibration modes, on one shared local Ray."""

import json

import pytest
import torch

from orchestrator.cli import main
from orchestrator.recipe import load_recipe
from orchestrator.techniques.hessian import GRAM_BLOCK
from tests.helpers import REPO, load_export
from tests.models import save_wide_llama

pytestmark = pytest.mark.slow

RECIPES = ["gptq-w4g128", "gptq-w3g128", "sparsegpt-50", "wanda-2of4", "sparsegpt-2of4-w4g128"]
SMALL = ["data.calibration.num_samples=16", "data.calibration.seq_len=64", "data.eval.max_windows=8",
         "tracking.enabled=false", "cluster.workers=2"]


def run(recipe: str, tmp_path, micro_lm, *extra) -> dict:
    overrides = [f"model.path={micro_lm}", f"output.dir={tmp_path}", *SMALL, *extra]
    assert main(["run", str(REPO / "recipes" / f"{recipe}.yaml"), *overrides, "--quiet"]) == 0
    run_dir = tmp_path / load_recipe(REPO / "recipes" / f"{recipe}.yaml", overrides).run_name
    return json.loads((run_dir / "report.json").read_text()) | {"dir": run_dir}


def compressed_weights(report: dict) -> dict[str, torch.Tensor]:
    """The block Linear weights of the export, as transformers (with compressed-tensors) loads them."""
    state = load_export(report["dir"] / "model").state_dict()
    return {k: v for k, v in state.items() if ".layers." in k and k.endswith("proj.weight")}


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_runs_and_obeys_its_pattern(recipe, tmp_path, micro_lm, shared_ray):
    report = run(recipe, tmp_path, micro_lm)
    method = load_recipe(REPO / "recipes" / f"{recipe}.yaml").stages[0].technique.name
    layers = [l for s in report["shards"] for l in s["layers"]]
    assert len(layers) == 14 and all(l["methods"] == [method] for l in layers)
    if method in ("gptq", "sparsegpt"):  # the damping actually used is in each layer's metrics
        assert all(l["stats"][method]["damp"] >= 0.01 and "damp_raised" in l["stats"][method] for l in layers)
    assert report["calibration"]["sha256"] and report["calibration"]["num_samples"] == 16
    weights = compressed_weights(report)
    assert len(weights) == 14
    for name, W in weights.items():
        if "2of4" in recipe:
            assert ((W != 0).reshape(W.shape[0], -1, 4).sum(-1) <= 2).all(), name
        if recipe == "sparsegpt-50":
            assert (W == 0).float().mean().item() == pytest.approx(0.5, abs=1e-6), name
        if "w4" in recipe or "w3" in recipe:
            bits = 4 if "w4" in recipe else 3
            for group in W.reshape(W.shape[0], -1, 128).flatten(0, 1):
                assert group.unique().numel() <= 2**bits
    q = report["quality"]
    assert q["compressed"]["perplexity"] > 1 and q["compressed"]["perplexity"] != q["dense"]["perplexity"]


def test_parallel_and_sequential_both_run_and_differ(tmp_path, micro_lm, shared_ray):
    parallel = run("gptq-w3g128", tmp_path, micro_lm, "partition.calibration=parallel")
    sequential = run("gptq-w3g128", tmp_path, micro_lm, "partition.calibration=sequential")
    first = lambda r: r["shards"][0]["error"]
    last = lambda r: r["shards"][-1]["error"]
    assert first(parallel) == first(sequential)  # shard 0 sees the same (dense) inputs either way
    assert last(parallel) != last(sequential)  # later shards see the compressed model's activations


def test_asymmetric_calibration_runs_sequentially_differs_and_keeps_its_bytes_over_worker_counts(
        tmp_path, micro_lm, shared_ray):
    from orchestrator.checkpoint import file_sha256

    plain = run("gptq-w3g128-asymmetric", tmp_path / "plain", micro_lm, "stages.0.asymmetric=0")
    one = run("gptq-w3g128-asymmetric", tmp_path / "one", micro_lm, "cluster.workers=1")
    two = run("gptq-w3g128-asymmetric", tmp_path / "two", micro_lm, "cluster.workers=2")
    assert one["calibration"]["mode"] == "sequential"
    shard_error = lambda r: [s["error"] for s in r["shards"]]
    assert shard_error(one)[0] == shard_error(plain)[0]  # shard 0: dense and compressed inputs are the same
    assert shard_error(one)[1:] != shard_error(plain)[1:]  # later shards follow the dense outputs as well
    for name in sorted(p.name for p in (one["dir"] / "model").glob("*.safetensors")):
        assert file_sha256(one["dir"] / "model" / name) == file_sha256(two["dir"] / "model" / name), name
    assert len({s["worker"]["pid"] for s in two["shards"]}) == 2


def test_asymmetric_calibration_in_parallel_mode_is_refused_before_any_work(tmp_path, micro_lm, capsys):
    overrides = [f"model.path={micro_lm}", f"output.dir={tmp_path}", *SMALL, "partition.calibration=parallel"]
    assert main(["run", str(REPO / "recipes" / "gptq-w3g128-asymmetric.yaml"), *overrides, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "stages.0.asymmetric" in err and "partition.calibration=sequential" in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())  # no run folder


def test_calibrated_output_bytes_do_not_depend_on_worker_count_or_chunks(tmp_path, micro_lm, shared_ray):
    from orchestrator.checkpoint import file_sha256

    one = run("sparsegpt-2of4-w4g128", tmp_path / "one", micro_lm, "cluster.workers=1", "partition.chunks=1")
    two = run("sparsegpt-2of4-w4g128", tmp_path / "two", micro_lm, "cluster.workers=2")  # 2 batches: 2 chunks
    pids = lambda report: {s["worker"]["pid"] for s in report["shards"]}  # the process that compressed each shard
    assert len(pids(two)) == 2 and len(pids(one)) == 1  # the 2-worker run really used 2 actors
    assert {s["capture_chunks"] for s in one["shards"]} == {1} and {s["capture_chunks"] for s in two["shards"]} == {2}
    files = sorted(p.name for p in (two["dir"] / "model").glob("*.safetensors"))
    assert len(files) == 3
    for name in files:
        assert file_sha256(one["dir"] / "model" / name) == file_sha256(two["dir"] / "model" / name), name


def test_hessians_computed_by_blocks_give_the_same_bytes_over_worker_counts(tmp_path, micro_lm, shared_ray):
    """Inputs of 2 x GRAM_BLOCK features take hessian.add_gram's blocked path: one worker (one chunk) and
    two (two chunks) still write the same bytes."""
    from orchestrator.checkpoint import file_sha256

    wide = save_wide_llama(tmp_path / "wide", micro_lm, 2 * GRAM_BLOCK)
    one = run("gptq-w4g128", tmp_path / "one", wide, "cluster.workers=1", "partition.chunks=1")
    two = run("gptq-w4g128", tmp_path / "two", wide, "cluster.workers=2")
    assert len({s["worker"]["pid"] for s in two["shards"]}) == 2
    files = sorted(p.name for p in (two["dir"] / "model").glob("*.safetensors"))
    assert files
    for name in files:
        assert file_sha256(one["dir"] / "model" / name) == file_sha256(two["dir"] / "model" / name), name


def test_the_mse_observer_lowers_rtn_error_and_reaches_gptq(tmp_path, micro_lm, shared_ray):
    """observer: mse against minmax on the trained micro-lm: recipes/rtn-w4g128-mse has less weight error
    than rtn-w4g128 (and exports, reloads, at most 16 levels per group); in GPTQ it changes the grids.
    Whether it helps GPTQ is for the benchmarks on a real model: micro-lm barely reacts to W3 (perplexity
    137.226 dense, 137.227 GPTQ W3 minmax, 137.238 mse)."""
    minmax, mse = run("rtn-w4g128", tmp_path / "a", micro_lm), run("rtn-w4g128-mse", tmp_path / "b", micro_lm)
    assert mse["compression"]["mean_relative_error"] < minmax["compression"]["mean_relative_error"]
    weights = compressed_weights(mse)
    assert len(weights) == 14
    assert all(g.unique().numel() <= 16 for W in weights.values() for g in W.reshape(W.shape[0], -1, 128).flatten(0, 1))
    minmax = run("gptq-w3g128", tmp_path / "c", micro_lm, "stages.0.observer=minmax")
    mse = run("gptq-w3g128", tmp_path / "d", micro_lm, "stages.0.observer=mse")
    assert mse["compression"]["mean_relative_error"] != minmax["compression"]["mean_relative_error"]
