"""Write tests/durations.json (seconds per test file) from a JUnit XML report, for tests/conftest.py's file order.

    .venv/bin/python -m pytest -n logical --maxprocesses 4 --dist loadfile --junitxml=/tmp/tests.xml
    .venv/bin/python tests/record_durations.py /tmp/tests.xml

Each file's time is the sum of its tests' times (setup and teardown included, as pytest reports them). Skipped
tests are left out, and a file whose tests were all skipped is not recorded (the Docker tests skip where no
daemon runs, and take minutes where one does): tests/conftest.py then places it by its markers.
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

OUT = Path(__file__).with_name("durations.json")


def file_seconds(report: str) -> dict[str, float]:
    """{test file path (as pytest names it): seconds} for the tests/ files in a JUnit XML report."""
    seconds: dict[str, float] = defaultdict(float)
    for case in ET.parse(report).getroot().iter("testcase"):
        module = case.get("classname", "").split(".")
        # classname is "tests.test_x" or "tests.test_x.TestClass"; doctests are named after deeplight modules
        if case.find("skipped") is not None:
            continue
        if len(module) >= 2 and module[0] == "tests" and module[1].startswith("test_"):
            seconds[f"tests/{module[1]}.py"] += float(case.get("time", 0.0))
    return {k: round(v, 1) for k, v in sorted(seconds.items(), key=lambda kv: -kv[1])}


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    OUT.write_text(json.dumps(file_seconds(sys.argv[1]), indent=1) + "\n")
    print(f"{OUT}: {len(json.loads(OUT.read_text()))} files")
