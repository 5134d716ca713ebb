"""The figures in README.md and benchmarks/RESULTS.md are the ones the benchmark scripts wrote."""

import json
import subprocess
import sys

from tests.helpers import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import render  # noqa: E402  (benchmarks/render.py)


def test_docs_hold_the_tables_the_benchmarks_wrote():
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "render.py"), "--check"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_every_included_table_has_its_provenance():
    """Each results table a doc includes has a JSON beside it naming the commit, machine and command."""
    names = [n for doc in render.DOCS for n in render.included(doc.read_text())]
    assert len(names) >= 10
    for name in names:
        if not name.endswith(".md"):
            continue
        prov = json.loads((render.RESULTS / name).with_suffix(".json").read_text())["provenance"]
        assert len(prov["commit"]) == 40 and prov["command"] and prov["machine"]["cpus"], name


def test_a_figure_typed_into_a_doc_is_caught():
    doc = "<!-- results/1-reference.md table -->\n| model | perplexity |\n|---|---|\n| dense | 1.0 |\n<!-- /results -->\n"
    assert render.render(doc) != doc  # the hand-typed table is replaced by the measured one
    assert render.render(render.render(doc)) == render.render(doc)


def test_the_readme_layout_names_every_module_and_only_those():
    import re

    readme = (REPO / "README.md").read_text()
    layout = readme[readme.index("## Layout"):]
    layout = layout[:layout.find("\n## ", 5)] if "\n## " in layout[5:] else layout
    named = set(re.findall(r"`(\w+)\.py`", layout)) | set(re.findall(r"`(\w+)`", layout.split("techniques/")[1][:200]))
    modules = {p.stem for p in (REPO / "orchestrator").glob("*.py")} - {"__init__"}
    techniques = {p.stem for p in (REPO / "orchestrator" / "techniques").glob("*.py")} - {"__init__", "registry", "result",
                                                                                          "grid", "hessian"}
    assert modules <= named, f"modules missing from README's Layout: {sorted(modules - named)}"
    assert techniques <= named, f"techniques missing from README's Layout: {sorted(techniques - named)}"
    assert {n for n in named if re.fullmatch(r"[a-z_]+", n)} - modules - techniques <= {"techniques"}, "names no module"
