"""Copy the measured tables from benchmarks/results/ into README.md, benchmarks/RESULTS.md and cluster/PLANS.md.

    .venv/bin/python benchmarks/render.py           # rewrite the marked blocks in place
    .venv/bin/python benchmarks/render.py --check   # exit 1 (naming the block) if a doc differs from its results

A document marks where a results file goes, and the renderer replaces what lies between the marks:

    <!-- results/2-quality.md -->          the whole file, without its "# " title line
    <!-- results/2-quality.md table -->    only its table and its "Source:" line
    <!-- results/1-demo-output.txt -->     a text file, as a code block
    ...
    <!-- /results -->

So no figure in the docs is typed by hand: each comes from a file that a script in benchmarks/ wrote,
with a JSON beside it (commit, machine, command). `run.sh` renders after its sections; a test runs
--check. It also warns about results measured at a commit whose orchestrator/ differs from HEAD's.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DOCS = [ROOT / "README.md", ROOT / "benchmarks" / "RESULTS.md", ROOT / "cluster" / "PLANS.md"]
BLOCK = re.compile(r"(<!-- results/(?P<name>[\w.-]+)(?P<table> table)? -->\n)(?P<body>.*?)(<!-- /results -->)", re.S)


def body(name: str, table_only: bool) -> str:
    """What goes between the marks for results/NAME."""
    path = RESULTS / name
    if not path.is_file():
        raise SystemExit(f"error: {path.relative_to(ROOT)} does not exist (run benchmarks/run.sh first)")
    text = path.read_text()
    if path.suffix != ".md":
        return f"```\n{text.rstrip()}\n```\n"
    lines = text.rstrip().splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    if table_only:  # the tables (a blank line between two) and the Source: line
        kept = []
        for i, line in enumerate(lines):
            if line.startswith("|"):
                if kept and i and not lines[i - 1].startswith("|"):
                    kept.append("")
                kept.append(line)
            elif line.startswith("Source:"):
                kept += ["", line]
        lines = kept
    return "\n".join(lines).strip() + "\n"


def render(text: str) -> str:
    return BLOCK.sub(lambda m: m.group(1) + body(m.group("name"), bool(m.group("table"))) + m.group(5), text)


def included(text: str) -> list[str]:
    return [m.group("name") for m in BLOCK.finditer(text)]


def stale() -> list[str]:
    """Results whose commit's orchestrator/ differs from HEAD's (the package changed since they ran)."""
    out = []
    for path in sorted(RESULTS.glob("*.json")):
        commit = json.loads(path.read_text()).get("provenance", {}).get("commit")
        if not commit:
            out.append(f"{path.name}: no commit recorded")
            continue
        known = subprocess.run(["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=ROOT, capture_output=True)
        if known.returncode != 0:
            out.append(f"{path.name}: measured at {commit[:10]}, a commit not in this clone's history")
            continue
        diff = subprocess.run(["git", "diff", "--quiet", commit, "HEAD", "--", "orchestrator"], cwd=ROOT)
        if diff.returncode != 0:
            out.append(f"{path.name}: measured at {commit[:10]}; orchestrator/ has changed since")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a document is out of date")
    args = parser.parse_args()
    outdated = []
    for doc in DOCS:
        text = doc.read_text()
        new = render(text)
        if new != text:
            outdated.append(doc.relative_to(ROOT))
            if not args.check:
                doc.write_text(new)
    for line in stale():
        print(f"warning: {line}", file=sys.stderr)
    if args.check and outdated:
        print(f"error: {', '.join(map(str, outdated))} differ from benchmarks/results/: "
              "run .venv/bin/python benchmarks/render.py", file=sys.stderr)
        return 1
    for doc in outdated:
        print(f"rendered {doc}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
