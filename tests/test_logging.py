"""Messages go through `logging`: -v adds debug lines (with time and module), --quiet keeps warnings and
errors only, and an error is one line whatever the level."""

from __future__ import annotations

from orchestrator.cli import main
from tests.helpers import REPO

RECIPE = str(REPO / "recipes" / "rtn-w4g128.yaml")


def test_verbose_and_quiet(micro_lm, tmp_path, capsys):
    args = ["plan", RECIPE, f"model.path={micro_lm}", f"output.dir={tmp_path}"]
    assert main([*args, "-v"]) == 0
    err = capsys.readouterr().err
    assert "orchestrator.plan: planned rtn-w4g128-" in err  # a debug line, with its module
    assert main(args) == 0
    assert "planned" not in capsys.readouterr().err
    assert main(["run", str(tmp_path / "missing.yaml"), "--quiet"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: recipe file not found: {tmp_path / 'missing.yaml'}"]


def test_quiet_hides_information(tmp_path, capsys):
    (tmp_path / "report.json").write_text("{}")  # a finished run, logged already: sync has nothing to do
    assert main(["sync", str(tmp_path)]) == 0
    assert "nothing to sync" in capsys.readouterr().err
    assert main(["sync", str(tmp_path), "--quiet"]) == 0
    assert capsys.readouterr().err == ""


def test_the_command_ends_at_once_with_its_output_and_exit_code_intact():
    """The `orchestrator` command leaves by os._exit (cli.entry: Python's teardown of torch and Ray is
    skipped), so what it printed to a pipe (block-buffered, unlike the tests' PYTHONUNBUFFERED runs) and
    logged must be flushed first, and its exit code kept."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    listed = subprocess.run([sys.executable, "-m", "orchestrator.cli", "reference", "list"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0 and "reference:tiny-lm" in listed.stdout, listed
    refused = subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", "missing.yaml"], env=env,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and refused.stderr.strip() == "error: recipe file not found: missing.yaml", refused
