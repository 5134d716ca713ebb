"""The recover stage: distillation with DeepSpeed ZeRO in Ray Train workers, masks and grids kept."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import psutil
import pytest
from mlflow.tracking import MlflowClient
import torch
from safetensors.torch import load_file

from tests.helpers import REPO, load_export
from orchestrator.cli import main
from orchestrator.checkpoint import file_sha256
from orchestrator.recover import GridLinear, TrainedLayer
from orchestrator.techniques.grid import int_range

RECIPE = str(REPO / "recipes" / "sparsegpt-2of4-w4g128-recover.yaml")
SHORT = ["data.calibration.num_samples=16", "data.calibration.seq_len=64", "recover.steps=4", "recover.lr=0.01",
         "recover.num_samples=16", "recover.seq_len=64", "recover.batch_size=2", "recover.checkpoint_every=2",
         "data.eval.max_windows=4", "data.eval.speed=false", "tracking.enabled=false", "--quiet"]


def test_grid_linear_sees_its_grid_and_mask_and_passes_gradients_straight_through():
    torch.manual_seed(0)
    linear = torch.nn.Linear(8, 3, bias=False)
    with torch.no_grad():
        linear.weight[:, ::2] = 0  # pruned: every other input
    scale = torch.full((3, 2), 0.05)
    layer = GridLinear(linear, TrainedLayer("l", "l.weight", bits=4, group_size=4, pruned=True), scale,
                       torch.zeros(3, 2))
    W = layer.effective()
    assert torch.all(W[:, ::2] == 0)  # the mask holds
    q = W / 0.05
    assert torch.equal(q, q.round()) and q.min() >= int_range(4)[0] and q.max() <= int_range(4)[1]
    layer(torch.randn(5, 8)).sum().backward()
    grad = layer.weight.grad
    assert torch.all(grad[:, ::2] == 0) and torch.all(grad[:, 1::2] != 0)  # STE: rounding does not block
    assert not layer.scale.requires_grad


def test_grid_linear_training_scales_keeps_its_integers_and_moves_only_its_scales():
    torch.manual_seed(0)
    scale, zero = torch.full((3, 2), 0.05, dtype=torch.bfloat16), torch.tensor([[0.0, 1.0]] * 3)
    linear = torch.nn.Linear(8, 3, bias=False)
    with torch.no_grad():  # on the grid (q - z) * s, with q - z in the 4-bit range
        codes = torch.randint(-7, 7, (3, 8)).float()
        linear.weight.copy_(codes * scale.float()[:, :1])
    layer = GridLinear(linear, TrainedLayer("l", "l.weight", bits=4, group_size=4, pruned=False), scale, zero,
                       train="scales")
    assert torch.equal(layer.effective(), linear.weight.detach())  # starts where the compressed model is
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["scale"]
    layer(torch.randn(5, 8)).square().sum().backward()
    assert layer.scale.grad.shape == (3, 2) and torch.all(layer.scale.grad != 0)
    with torch.no_grad():
        layer.scale.mul_(torch.linspace(0.9, 1.1, 6).view(3, 2)).add_(1e-4)  # a step of training
    layer.round_scales()
    assert torch.equal(layer.scale, layer.scale.bfloat16().float())  # as the export will store it
    W = layer.effective().reshape(3, 2, 4)
    assert torch.equal(W, codes.reshape(3, 2, 4) * layer.scale.detach().unsqueeze(-1))  # same integers, new scales


def test_training_scales_fits_the_dense_layer_better_than_the_rounded_scales():
    """The mechanism recovery relies on: scales trained on a layer's outputs, integers fixed, bring the
    outputs closer to the dense layer's than the grid's own (min-max) scales did."""
    from orchestrator.techniques.grid import fit_qparams, group_view, quantize, dequantize

    torch.manual_seed(0)
    dense = torch.nn.Linear(64, 16, bias=False)
    scale, zero = fit_qparams(group_view(dense.weight.detach(), 16), bits=2, symmetric=False)
    Wg = group_view(dense.weight.detach(), 16)
    rounded = torch.nn.Linear(64, 16, bias=False)
    with torch.no_grad():
        rounded.weight.copy_(dequantize(quantize(Wg, scale[..., None], zero[..., None], 2), scale[..., None],
                                        zero[..., None]).reshape(16, 64))
    layer = GridLinear(rounded, TrainedLayer("l", "l.weight", bits=2, group_size=16, pruned=False), scale,
                       zero.float(), train="scales")
    x = torch.randn(256, 64)
    error = lambda: (layer(x) - dense(x)).square().mean().item()  # noqa: E731
    before = error()
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-3)
    for _ in range(100):
        optimizer.zero_grad()
        (layer(x) - dense(x).detach()).square().mean().backward()
        optimizer.step()
    assert error() < 0.95 * before  # a least-squares fit of 4 scales per row to fixed 2-bit codes gains ~8%


@pytest.fixture(scope="module")
def runs(micro_lm, tmp_path_factory):
    """One compression without recovery, recoveries with ZeRO 1, 2, 3 (and 2 again), and one training scales."""
    out = tmp_path_factory.mktemp("recover")
    base = [RECIPE, f"model.path={micro_lm}", f"output.dir={out}", *SHORT]
    assert main(["run", *base, "output.name=plain", "recover.enabled=false"]) == 0
    for name, stage in (("zero1", 1), ("zero2", 2), ("zero3", 3), ("zero2-again", 2)):
        tracked = [f"tracking.uri=sqlite:///{out}/mlflow.db", "tracking.enabled=true"] if name == "zero2" else []
        assert main(["run", *base, f"output.name={name}", f"recover.zero_stage={stage}", *tracked]) == 0, name
    assert main(["run", *base, "output.name=scales", "recover.train=scales", "recover.lr=0.001"]) == 0
    return out


def report(runs, name) -> dict:
    return json.loads((runs / name / "report.json").read_text())


@pytest.mark.slow
def test_zero_stages_optimise_the_same_thing(runs):
    recovered = {stage: report(runs, f"zero{stage}")["recover"] for stage in (1, 2, 3)}
    for stage, rec in recovered.items():
        assert rec["zero_stage"] == stage  # the stage DeepSpeed's engine ran, not only the one asked for
        assert rec["start_steps"] == [0]  # one worker group, no restart
    losses = {stage: rec["losses"] for stage, rec in recovered.items()}
    assert all(len(l) == 4 for l in losses.values())
    for stage in (2, 3):  # identical to 6 decimals (benchmarks/RESULTS.md section 9)
        assert losses[stage] == pytest.approx(losses[1], rel=0, abs=5e-7), (stage, losses)
    assert len(set(losses[1])) > 1  # the student changed between steps


@pytest.mark.slow
def test_training_scales_exports_the_same_integers_with_new_scales(runs):
    def tensors(name):
        files = sorted((runs / name / "model").glob("*.safetensors"))
        return {k: t for f in files for k, t in load_file(f).items()}

    plain, scales = tensors("plain"), tensors("scales")
    assert plain.keys() == scales.keys()
    packed = [k for k in plain if k.endswith("weight_packed")]
    assert packed and all(torch.equal(plain[k], scales[k]) for k in packed)  # the integers are the export's
    moved = [k for k in plain if k.endswith("weight_scale") and not torch.equal(plain[k], scales[k])]
    assert len(moved) == len(packed)  # every quantized layer's scales trained
    rec = report(runs, "scales")["recover"]
    assert rec["settings"]["train"] == "scales" and len(rec["losses"]) == 4
    model = load_export(runs / "scales" / "model")  # transformers loads it with the trained scales
    assert model(input_ids=torch.ones(1, 8, dtype=torch.long)).logits.isfinite().all()


@pytest.mark.slow
def test_recovery_keeps_every_pruned_weight_zero_and_every_2of4_group_valid(runs):
    def block_weights(name):
        model = load_export(runs / name / "model")
        return {n: m.weight.detach() for n, m in model.named_modules()
                if isinstance(m, torch.nn.Linear) and ".layers." in n}

    plain = block_weights("plain")
    changed = 0
    for key, W in [*block_weights("zero2").items(), *block_weights("scales").items()]:
        before = plain[key]
        assert torch.all(W[before == 0] == 0), key  # masks exactly preserved
        groups = (W.reshape(W.shape[0], -1, 4) != 0).sum(-1)
        assert groups.max() <= 2, key  # 2:4 still valid
        changed += int(not torch.equal(W, before))
    assert changed > 0  # recovery did move weights


@pytest.mark.slow
def test_the_recovered_model_exports_and_reports_its_quality(runs):
    data = report(runs, "zero2")
    rec = data["recover"]
    assert rec["perplexity_before"] > 1 and rec["perplexity_after"] == data["quality"]["compressed"]["perplexity"]
    assert data["size"]["format"] == report(runs, "plain")["size"]["format"]
    assert data["timing"]["phases"]["recover"] > 0
    model = load_export(runs / "zero2" / "model")  # transformers loads the packed, recovered export
    assert model(input_ids=torch.ones(1, 8, dtype=torch.long)).logits.isfinite().all()
    assert not (runs / "zero2" / "recovered").exists()  # the work folders are gone
    client = MlflowClient(tracking_uri=f"sqlite:///{runs}/mlflow.db")
    run_id = data["mlflow"]["run_id"]
    assert [m.value for m in client.get_metric_history(run_id, "recover.loss")] == pytest.approx(rec["losses"])
    metrics = client.get_run(run_id).data.metrics
    assert metrics["recover.perplexity_before"] == pytest.approx(rec["perplexity_before"])
    assert metrics["recover.perplexity_after"] == pytest.approx(rec["perplexity_after"])


@pytest.mark.slow
def test_a_fixed_seed_gives_the_same_bytes(runs):
    def weights(name):
        return {p.name: file_sha256(p) for p in sorted((runs / name / "model").glob("*.safetensors"))}

    assert weights("zero2") == weights("zero2-again")
    assert weights("zero2") != weights("plain")
    tensors = load_file(sorted((runs / "zero2" / "model").glob("*.safetensors"))[-1])
    assert any(k.endswith("weight_packed") for k in tensors)  # still packed 4-bit


def start_run(args: list[str], cwd) -> subprocess.Popen:
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    return subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "run", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_steps(losses, steps: int) -> None:
    """Until the run's loss curve (rank 0 writes a line per step, before its report) has `steps` lines.
    A checkpoint reported at step k counts for a restart once Ray Train's controller took both ranks' report
    k; a report blocks until the one before it was taken, so that holds once line k + 2 is written."""
    deadline = time.time() + 300
    while time.time() < deadline and not (losses.exists() and len(losses.read_text().splitlines()) >= steps):
        time.sleep(0.1)


def kill_a_training_worker(run: subprocess.Popen) -> None:
    """SIGKILL one Ray Train worker of this run (its embedded Ray's processes descend from the driver; another
    test process may be training too)."""
    def is_train_worker(p: psutil.Process) -> bool:
        try:
            return "RayTrainWorker" in " ".join(p.cmdline())
        except psutil.Error:
            return False

    workers = [p for p in psutil.Process(run.pid).children(recursive=True) if is_train_worker(p)]
    assert workers, "no Ray Train worker found"
    workers[0].kill()


@pytest.mark.chaos
@pytest.mark.slow
def test_a_killed_training_worker_resumes_from_its_checkpoint_with_the_same_bytes(micro_lm, tmp_path):
    args = [RECIPE, f"model.path={micro_lm}", f"output.dir={tmp_path}", *SHORT, "recover.steps=12",
            "recover.checkpoint_every=4", "data.eval.enabled=false"]
    proc = start_run([*args, "output.name=killed"], tmp_path)
    wait_for_steps(tmp_path / ".killed.partial" / "recovered" / "work" / "losses.jsonl", 6)
    kill_a_training_worker(proc)  # past the checkpoint at step 4, before the end
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    assert "Error count: 1" in out  # Ray Train saw the worker die and restarted the group
    assert main(["run", *args, "output.name=whole"]) == 0

    def weights(name):
        return {p.name: file_sha256(p) for p in sorted((tmp_path / name / "model").glob("*.safetensors"))}

    assert weights("killed") == weights("whole")
    recovered = json.loads((tmp_path / "killed" / "report.json").read_text())["recover"]
    assert len(recovered["losses"]) == 12
    first, restarted = recovered["start_steps"]  # the first worker group, and the one Ray Train restarted
    assert first == 0 and restarted in (4, 8), recovered["start_steps"]  # resumed from a checkpoint, not step 0


class PlantedPickle:
    """What a tampered run folder could hold in place of a checkpoint: unpickling it runs a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.chaos
@pytest.mark.slow
def test_a_pickle_planted_in_the_training_checkpoint_is_refused_not_run(micro_lm, tmp_path):
    args = [RECIPE, f"model.path={micro_lm}", f"output.dir={tmp_path}", *SHORT, "recover.steps=12",
            "recover.checkpoint_every=4", "recover.max_failures=1", "data.eval.enabled=false",
            "output.name=tampered"]
    proc = start_run(args, tmp_path)
    work = tmp_path / ".tampered.partial" / "recovered" / "work"
    wait_for_steps(work / "losses.jsonl", 6)  # the checkpoint of step 4 is the one a restart reads
    files = sorted((work / "ray-train").glob("**/checkpoint_*/**/*.pt"))
    assert files, "no checkpoint found"
    marker = tmp_path / "planted-pickle-ran"
    for path in files:  # every file DeepSpeed reads when the worker group restarts
        torch.save(PlantedPickle(marker), path)
    kill_a_training_worker(proc)  # the restarted group reads the checkpoint
    out, _ = proc.communicate(timeout=600)
    assert not marker.exists()  # the pickle's command never ran
    assert proc.returncode == 1, out[-3000:]
    assert "refused to load checkpoint file" in out and "posix.system" in out, out[-3000:]
