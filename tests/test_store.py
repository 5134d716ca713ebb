"""store.py on its own (no Ray): fingerprints, commits that count only with their files, the run lock."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from orchestrator.errors import UserError
from orchestrator.store import Fingerprint, RunLock, ShardStore, model_fingerprint, recipe_fingerprint, shard_key
from tests.models import save_random_model

FP = Fingerprint("recipe-hash", "model-hash", None)


def test_commits_count_only_while_their_files_exist(tmp_path):
    store = ShardStore.open(tmp_path / "partial", FP, overwrite=False)
    assert not store.reusable
    store.prepare()
    shard_file = store.folder / "model" / "model-00002-of-00003.safetensors"
    shard_file.write_bytes(b"x")
    assert store.commit(shard_key(1), {"bytes": 1}, [shard_file]) is True
    assert store.commit(shard_key(1), {"bytes": 1}, [shard_file]) is False  # committed once only
    assert store.committed()["00001"]["bytes"] == 1
    assert [e["shard"] for e in store.events("commit")] == ["00001"]
    shard_file.unlink()  # a commit whose file is gone is not reused
    assert store.committed() == {}


def test_a_rerun_reuses_the_same_compression_and_refuses_another(tmp_path):
    ShardStore.open(tmp_path / "partial", FP, overwrite=False).prepare()
    assert ShardStore.open(tmp_path / "partial", FP, overwrite=False).reusable
    other = Fingerprint("other-recipe", "model-hash", "calibration")
    with pytest.raises(UserError, match=r"the recipe .* the calibration data changed.*--overwrite"):
        ShardStore.open(tmp_path / "partial", other, overwrite=False)
    replaced = ShardStore.open(tmp_path / "partial", other, overwrite=True)
    assert not replaced.reusable
    replaced.prepare()  # discards the old shards
    assert json.loads((tmp_path / "partial" / "store.json").read_text())["fingerprint"]["recipe"] == "other-recipe"


def test_fingerprints_ignore_what_does_not_change_the_bytes_and_see_what_does(tmp_path):
    recipe = {"name": "a", "cluster": {"workers": 2}, "data": {"eval": {"seq_len": 64}, "calibration": {"seed": 0}},
              "model": {"path": "/x", "dtype": "auto"}, "stages": [{"method": "rtn"}]}
    same = recipe | {"name": "b", "cluster": {"workers": 8}, "data": {**recipe["data"], "eval": {"seq_len": 32}},
                     "model": {"path": "/y", "dtype": "auto"}}
    assert recipe_fingerprint(recipe) == recipe_fingerprint(same)
    assert recipe_fingerprint(recipe) != recipe_fingerprint(recipe | {"stages": [{"method": "gptq"}]})
    model = save_random_model("llama", tmp_path / "m")
    before = model_fingerprint(model)
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8 + int.from_bytes(data[:8], "little")] ^= 0xFF  # the first tensor byte: the first sampled chunk
    weights.write_bytes(bytes(data))
    assert model_fingerprint(model) != before


def test_one_run_holds_its_folder_and_a_killed_holder_does_not_block(tmp_path):
    run_dir = tmp_path / "run"
    lock = RunLock.acquire(run_dir)
    with pytest.raises(UserError, match=r"being written by another orchestrator run \(pid \d+"):
        RunLock.acquire(run_dir)
    lock.release()
    RunLock.acquire(run_dir).release()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from orchestrator.store import RunLock; RunLock.acquire(Path(sys.argv[1])); "
                               "print('held', flush=True); time.sleep(60)", str(run_dir)],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(UserError):
        RunLock.acquire(run_dir)
    holder.kill()
    holder.wait()
    deadline = time.time() + 10
    while True:  # the kernel drops a dead process's flock
        try:
            RunLock.acquire(run_dir).release()
            break
        except UserError:
            assert time.time() < deadline, "the killed holder's lock still blocks"
            time.sleep(0.1)
