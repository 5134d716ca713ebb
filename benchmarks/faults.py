"""Section 8: the injected faults and the bad-input cases, as the test suite runs them.

    .venv/bin/python benchmarks/faults.py [--smoke]

Runs `pytest -m chaos` (tests/test_chaos.py, test_cluster.py, test_recover.py, ...)
and `pytest tests/test_bad_input.py`, and tabulates each test's outcome and time
from pytest's JUnit XML: results/8-faults.md/.json. What each fault test injects
and checks is described in RESULTS.md section 8 and in the tests' docstrings.
--smoke runs only the bad-input tests whose name contains "unknown".
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import xml.etree.ElementTree as ET

from common import ROOT, Bench, add_args, clean_env, table


def pytest(selection: list[str], xml_path, log_path) -> list[dict]:
    xml_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", f"--junitxml={xml_path}", *selection]
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    with open(log_path, "w") as log:
        subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=clean_env())
    tests = []
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
        tests.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "seconds": float(case.get("time") or 0)})
    return tests


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_args(p, "8-faults")
    args = p.parse_args()
    work = args.work.resolve()
    suites = [("bad input", ["tests/test_bad_input.py"] + (["-k", "unknown"] if args.smoke else []))]
    if not args.smoke:
        suites.insert(0, ("faults injected", ["-m", "chaos"]))
    with Bench() as bench:
        rows, data = [], {}
        for name, selection in suites:
            slug = name.replace(" ", "-")
            tests = pytest(selection, work / f"{slug}.xml", work / f"{slug}.log")
            data[name] = {"selection": selection, "tests": tests}
            counts = {o: sum(t["outcome"] == o for t in tests) for o in ("passed", "failure", "error", "skipped")}
            rows.append([name, " ".join(selection), len(tests), counts["passed"], counts["failure"] + counts["error"],
                         counts["skipped"], f"{sum(t['seconds'] for t in tests):.0f}"])
        detail = table(["test", "outcome", "seconds"],
                       [[t["test"], t["outcome"], f"{t['seconds']:.1f}"] for d in data.values() for t in d["tests"]])
        bench.write(args.results / "8-faults.md", "Section 8: faults injected and bad input (the test suite)",
                    table(["suite", "pytest selection", "tests", "passed", "failed", "skipped", "seconds"], rows)
                    + "\n\n" + detail, data)


if __name__ == "__main__":
    main()
