"""Recipes: round trip, overrides, and bad input that must exit 2 naming the key, before Ray starts."""

import textwrap

import yaml

import pytest
import ray
from tests.helpers import REPO, run_cli

from orchestrator.cli import main
from orchestrator.recipe import build_recipe, load_recipe

GOOD = """
name: t
model: {path: MODEL}
stages:
  - {method: magnitude, pattern: "2:4"}
  - {method: rtn, bits: 4, group_size: 32}
tracking: {enabled: false}
"""


def write(tmp_path, text, model="reference:micro-lm"):
    path = tmp_path / "recipe.yaml"
    path.write_text(textwrap.dedent(text).replace("MODEL", str(model)))
    return path


def test_every_shipped_recipe_loads_and_round_trips():
    recipes = sorted((REPO / "recipes").glob("*.yaml"))
    assert len(recipes) >= 4
    for path in recipes:
        r = load_recipe(path)
        again = build_recipe(yaml.safe_load(r.yaml))
        assert again.yaml == r.yaml and again.hash == r.hash, path.name


def test_overrides_change_values_and_hash(tmp_path):
    path = write(tmp_path, GOOD)
    base = load_recipe(path)
    changed = load_recipe(path, ["stages.1.bits=3", "cluster.workers=5", "stages.0.pattern=1:4"])
    assert changed.stages[1].params.bits == 3 and changed.config.cluster.workers == 5
    assert changed.stages[0].params.n_m == (1, 4) and changed.stages[0].params.sparsity == 0.75
    assert changed.hash != base.hash
    assert load_recipe(path).hash == base.hash  # stable


BAD = [
    # (recipe text, overrides, the key the message must name)
    (GOOD.replace("name: t", "name: t\nmodle: {path: x}"), [], "modle"),
    (GOOD, ["cluster.workerz=2"], "cluster.workerz"),
    (GOOD.replace("bits: 4", "bits: 9"), [], "stages.1.bits"),
    (GOOD.replace("bits: 4", "bits: 3.5"), [], "stages.1.bits"),
    (GOOD.replace('pattern: "2:4"', "sparsity: 1.2"), [], "stages.0.sparsity"),
    (GOOD.replace("group_size: 32", "group_size: 100"), [], "stages.1.group_size"),
    (GOOD.replace("method: rtn", "method: awq9"), [], "stages.1.method"),
    (GOOD.replace("model: {path: MODEL}", "model: {dtype: float32}"), [], "model.path"),
    (GOOD.replace("MODEL", "/nonexistent/model"), [], "model.path"),
    (GOOD.replace("MODEL", "reference:huge-lm"), [], "model.path"),
    (GOOD.replace("bits: 4", "bitz: 4"), [], "stages.1.bitz"),
    ("name: t\nmodel: {path: MODEL}\nstages: []\n", [], "stages"),
    (GOOD, ["cluster.workers=0"], "cluster.workers"),
    (GOOD.replace('"2:4"', '"4:2"'), [], "stages.0.pattern"),
    (GOOD, ["partition.calibration=random"], "partition.calibration"),
    (GOOD, ["stages.1.targets=['(unclosed']"], "stages.1.targets"),
    (GOOD, ["stages.1.group_size=256"], "stages.1.group_size"),  # micro-lm has 128 input features
    (GOOD, ["stages.0.targets=['no_such_layer']"], "stages.0.targets"),
    (GOOD, ["model.dtype=int3"], "model.dtype"),
    (GOOD, ["stages.1.symmetric=maybe"], "stages.1.symmetric"),
    (GOOD, ["cluster.workers"], "cluster.workers"),  # not key=value
    (GOOD, ["cluster.gpus_per_worker=1.5"], "cluster.gpus_per_worker"),  # Ray: whole GPUs above 1
    (GOOD, ["cluster.gpus_per_worker=lots"], "cluster.gpus_per_worker"),
    ("- just\n- a list\n", [], "mapping"),
]


@pytest.mark.parametrize("text,overrides,key", BAD, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD)])
def test_bad_recipe_exits_2_naming_the_key(text, overrides, key, tmp_path, micro_lm, capsys):
    path = write(tmp_path, text, model=micro_lm)
    rc = main(["run", str(path), *overrides, "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert key in err, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    assert not ray.is_initialized()  # rejected before any cluster work
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_bad_input_in_a_fresh_process_has_no_traceback(tmp_path):
    path = write(tmp_path, GOOD.replace("bits: 4", "bits: 9"))
    for args in (["run", str(path)], ["run", str(tmp_path / "missing.yaml")], ["run", str(path), "--bogus-flag"]):
        proc = run_cli(*args, cwd=tmp_path, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr and "error:" in proc.stderr


def test_yaml_1_1_words_stay_strings(tmp_path):
    path = write(tmp_path, GOOD, model="m")
    recipe = load_recipe(path, ["output.name=off", "name=no"])
    assert (recipe.config.output.name, recipe.config.name) == ("off", "no")  # not False
    assert load_recipe(path, ["stages.1.symmetric=false"]).stages[1].params.symmetric is False


def test_overrides_may_follow_flags(tmp_path, capsys):
    path = write(tmp_path, GOOD)
    assert main(["run", str(path), "--quiet", "cluster.workers=0"]) == 2
    assert "cluster.workers" in capsys.readouterr().err


@pytest.mark.parametrize("override,key", [
    ("data.eval.source=/no/such.txt", "data.eval.source"),
    ("data.calibration.source=/no/such.jsonl", "data.calibration.source"),
    ("data.calibration.source=TOO_SHORT", "data.calibration.source"),
    ("data.eval.source=TOO_SHORT", "data.eval.source"),
])
def test_bad_data_exits_2_before_ray(override, key, tmp_path, micro_lm, capsys):
    short = tmp_path / "short.txt"
    short.write_text("a few words only")
    text = GOOD.replace("method: rtn, bits: 4", "method: gptq, bits: 4")
    rc = main(["run", str(write(tmp_path, text, model=micro_lm)), override.replace("TOO_SHORT", str(short)), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and key in err, err
    assert not ray.is_initialized()
