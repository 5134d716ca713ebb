"""Bad input of every kind: exit 2, one message naming the key, flag or file, no traceback, and nothing
that already exists is changed (a finished run, an unfinished run's store, the models, the data)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.helpers import REPO
from orchestrator.cli import main

GPTQ = str(REPO / "recipes" / "gptq-w4g128.yaml")
RTN = str(REPO / "recipes" / "rtn-w4g128.yaml")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, micro_lm) -> Path:
    """A folder with broken models and data beside good ones, a finished run and an unfinished one."""
    ws = tmp_path_factory.mktemp("bad-input")
    good = ws / "good-model"
    shutil.copytree(micro_lm, good)
    for name, breakage in {
        "no-config": lambda d: (d / "config.json").unlink(),
        "bad-config": lambda d: (d / "config.json").write_text("{not json"),
        "no-weights": lambda d: (d / "model.safetensors").unlink(),
        "garbage-weights": lambda d: (d / "model.safetensors").write_bytes(b"\x00garbage" * 100),
        "truncated-weights": lambda d: os.truncate(d / "model.safetensors", (d / "model.safetensors").stat().st_size // 2),
        "no-blocks": lambda d: (d / "config.json").write_text(
            json.dumps({**json.loads((d / "config.json").read_text()), "num_hidden_layers": 0})),
        "index-missing-file": lambda d: (d / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": {"lm_head.weight": "model-00009-of-00009.safetensors"}})),
    }.items():
        shutil.copytree(micro_lm, ws / name)
        breakage(ws / name)
    from tests.models import save_random_model

    save_random_model("gpt2", ws / "gpt2")
    save_random_model("bert", ws / "bert")
    (ws / "empty.txt").write_text("")
    (ws / "short.txt").write_text("far too short for a calibration window\n")
    (ws / "data.csv").write_text("text\nhello\n")
    (ws / "not-a-dir").write_text("a file where a folder is wanted\n")
    (ws / "list.yaml").write_text("- just\n- a list\n")
    (ws / "broken.yaml").write_text("name: [unclosed\n")
    (ws / "no-stages.yaml").write_text(f"name: t\nmodel: {{path: {good}}}\nstages: []\n")
    (ws / "no-method.yaml").write_text(f"name: t\nmodel: {{path: {good}}}\nstages: [{{bits: 4}}]\n")
    # a finished run, and the store of an unfinished run of a different recipe
    assert main(["run", RTN, f"model.path={good}", f"output.dir={ws / 'runs'}", "output.name=done",
                 "data.eval.enabled=false", "tracking.enabled=false", "--quiet"]) == 0
    store = ws / "runs" / ".other.partial"
    (store / "shards").mkdir(parents=True)
    (store / "store.json").write_text(json.dumps({"fingerprint": {"recipe": "0" * 64, "model": "0" * 64,
                                                                  "calibration": None}}))
    return ws


def run_args(ws: Path, *overrides: str, recipe: str = RTN, model: str = "good-model") -> list[str]:
    return ["run", recipe, f"model.path={ws / model}", f"output.dir={ws / 'runs'}", "tracking.enabled=false",
            "--quiet", *overrides]


# (case id, argv maker, what the message must name)
CASES = [
    # command line
    ("no-recipe", lambda ws: ["run"], "give a recipe"),
    ("unknown-flag", lambda ws: [*run_args(ws), "--frobnicate"], "--frobnicate"),
    ("recipe-not-found", lambda ws: ["run", str(ws / "missing.yaml")], "missing.yaml"),
    ("override-without-value", lambda ws: run_args(ws, "cluster.workers"), "cluster.workers"),
    ("override-unknown-key", lambda ws: run_args(ws, "cluster.wrokers=2"), "cluster.wrokers"),
    ("resume-nothing", lambda ws: ["run", "--resume", str(ws / "runs" / "never")], "--resume"),
    ("eval-not-a-model", lambda ws: ["eval", str(ws / "empty.txt")], "config.json"),
    ("eval-seq-len-0", lambda ws: ["eval", str(ws / "good-model"), "--seq-len", "0"], "--seq-len"),
    ("eval-folder-missing", lambda ws: ["eval", str(ws / "nowhere")], "has no config.json"),
    ("eval-threads-0", lambda ws: ["eval", str(ws / "good-model"), "--threads", "0"], "--threads: must be >= 1"),
    ("eval-encoder-without-baseline", lambda ws: ["eval", str(ws / "bert")], "--baseline: an encoder's quality"),
    ("compare-unknown-run", lambda ws: ["compare", "no-such-run"], "no-such-run"),
    ("sync-not-a-run", lambda ws: ["sync", str(ws / "good-model")], "report.json"),
    ("submit-without-address", lambda ws: ["submit", RTN], "--address"),
    ("jobs-unknown-action", lambda ws: ["jobs", "restart", "x", "--address", "http://127.0.0.1:9"], "restart"),
    # recipes
    ("recipe-not-yaml", lambda ws: ["run", str(ws / "broken.yaml")], "broken.yaml"),
    ("recipe-a-list", lambda ws: ["run", str(ws / "list.yaml")], "mapping"),
    ("recipe-no-stages", lambda ws: ["run", str(ws / "no-stages.yaml")], "stages"),
    ("stage-no-method", lambda ws: ["run", str(ws / "no-method.yaml")], "stages.0.method"),
    ("bits-3.5", lambda ws: run_args(ws, "stages.0.bits=3.5"), "stages.0.bits"),
    ("bits-9", lambda ws: run_args(ws, "stages.0.bits=9"), "stages.0.bits"),
    ("group-does-not-divide", lambda ws: run_args(ws, "stages.0.group_size=256"), "stages.0.group_size"),
    ("targets-match-nothing", lambda ws: run_args(ws, "stages.0.targets=[nothing_here]"), "stages.0.targets"),
    ("sparsity-1.2", lambda ws: run_args(ws, recipe=str(REPO / "recipes" / "magnitude-50.yaml"),
                                         *["stages.0.sparsity=1.2"]), "stages.0.sparsity"),
    ("dtype-int3", lambda ws: run_args(ws, "model.dtype=int3"), "model.dtype"),
    ("gpus-1.5", lambda ws: run_args(ws, "cluster.gpus_per_worker=1.5"), "cluster.gpus_per_worker"),
    ("zero-workers", lambda ws: run_args(ws, "cluster.workers=0"), "cluster.workers"),
    ("cluster-zero-nodes", lambda ws: run_args(ws, "cluster.nodes=0"), "cluster.nodes"),
    ("cluster-negative-gpus-per-node", lambda ws: run_args(ws, "cluster.gpus_per_node=-1"), "cluster.gpus_per_node"),
    ("cluster-zero-gpu-memory", lambda ws: run_args(ws, "cluster.gpu_memory_gb=0"), "cluster.gpu_memory_gb"),
    ("cluster-negative-host-memory", lambda ws: run_args(ws, "cluster.host_memory_gb=-1"), "cluster.host_memory_gb"),
    ("cluster-zero-network", lambda ws: run_args(ws, "cluster.network_gbps=0"), "cluster.network_gbps"),
    ("cluster-zero-read-rate", lambda ws: run_args(ws, "cluster.read_gb_per_s=0"), "cluster.read_gb_per_s"),
    ("cluster-zero-tflops", lambda ws: run_args(ws, "cluster.gpu_tflops=0"), "cluster.gpu_tflops"),
    ("cluster-gpus-per-node-not-int", lambda ws: run_args(ws, "cluster.gpus_per_node=eight"), "cluster.gpus_per_node"),
    ("zero-calibration-samples", lambda ws: run_args(ws, "data.calibration.num_samples=0", recipe=GPTQ),
     "data.calibration.num_samples"),
    ("output-name-with-slash", lambda ws: run_args(ws, "output.name=a/b"), "output.name"),
    ("recover-zero-stage-4", lambda ws: run_args(ws, "recover.enabled=true", "recover.zero_stage=4"),
     "recover.zero_stage"),
    ("recover-lr-0", lambda ws: run_args(ws, "recover.enabled=true", "recover.lr=0"), "recover.lr"),
    ("recover-train-bias", lambda ws: run_args(ws, "recover.enabled=true", "recover.train=bias"), "recover.train"),
    ("recover-scales-without-a-grid", lambda ws: run_args(ws, "recover.enabled=true", "recover.train=scales",
                                                          recipe=str(REPO / "recipes" / "magnitude-50.yaml")),
     "no stage quantizes"),
    ("recover-an-encoder", lambda ws: run_args(ws, "recover.enabled=true", "stages.0.targets=[query]", model="bert"),
     "not a causal LM"),
    ("recover-conv1d-layers", lambda ws: run_args(ws, "recover.enabled=true", "stages.0.targets=[c_fc]",
                                                  model="gpt2"), "Conv1D"),
    ("zero-blocks-per-shard", lambda ws: run_args(ws, "partition.blocks_per_shard=0"), "partition.blocks_per_shard"),
    # models
    ("model-folder-missing", lambda ws: run_args(ws, model="nowhere"), "nowhere"),
    ("model-no-config", lambda ws: run_args(ws, model="no-config"), "config.json"),
    ("model-config-not-json", lambda ws: run_args(ws, model="bad-config"), "config.json"),
    ("model-no-safetensors", lambda ws: run_args(ws, model="no-weights"), "model.safetensors"),
    ("model-garbage-safetensors", lambda ws: run_args(ws, model="garbage-weights"), "model.safetensors"),
    ("model-truncated-safetensors", lambda ws: run_args(ws, model="truncated-weights"), "model.safetensors"),
    ("model-no-transformer-blocks", lambda ws: run_args(ws, model="no-blocks"), "no transformer blocks"),
    ("model-index-names-missing-file", lambda ws: run_args(ws, model="index-missing-file"), "model-00009"),
    ("unknown-reference-model", lambda ws: ["run", RTN, "model.path=reference:huge-lm"], "model.path"),
    # data
    ("calibration-file-missing", lambda ws: run_args(ws, f"data.calibration.source={ws / 'gone.txt'}", recipe=GPTQ),
     "gone.txt"),
    ("calibration-text-empty", lambda ws: run_args(ws, f"data.calibration.source={ws / 'empty.txt'}", recipe=GPTQ),
     "data.calibration.source"),
    ("calibration-text-too-short", lambda ws: run_args(ws, f"data.calibration.source={ws / 'short.txt'}",
                                                       recipe=GPTQ), "data.calibration.source"),
    ("calibration-csv", lambda ws: run_args(ws, f"data.calibration.source={ws / 'data.csv'}", recipe=GPTQ),
     "data.calibration.source"),
    ("eval-text-too-short", lambda ws: run_args(ws, f"data.eval.source={ws / 'short.txt'}"), "data.eval.source"),
    # outputs
    ("output-dir-under-a-file", lambda ws: run_args(ws, f"output.dir={ws / 'not-a-dir' / 'runs'}"), "output.dir"),
    ("finished-run-without-overwrite", lambda ws: run_args(ws, "output.name=done"), "--overwrite"),
    ("unfinished-run-of-another-recipe", lambda ws: run_args(ws, "output.name=other"), "cannot be reused"),
]


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


def exit_code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse's own errors (unknown flag, missing --address) exit from inside
        return e.code


@pytest.mark.parametrize("argv,named", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_clear_message_and_changes_nothing(workspace, argv, named, capsys, monkeypatch):
    monkeypatch.chdir(workspace)
    before = snapshot(workspace)
    rc = exit_code(argv(workspace))
    err = capsys.readouterr().err
    assert rc == 2, err
    message = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(message) == 1 and named in message[0], err
    assert "Traceback" not in err
    assert snapshot(workspace) == before
