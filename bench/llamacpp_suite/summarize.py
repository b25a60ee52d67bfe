"""Summarise a run of llama.cpp's server tests against the router (run.sh): pass/fail counts per module and
one line per failure with its category from classification.py (``unclassified`` for a failure that no rule
covers: a new gap, or a test the rules have not met yet), as Markdown on stdout.

    python bench/llamacpp_suite/summarize.py .cache/llamacpp-suite/junit.xml [--listed listed.txt]
"""

from __future__ import annotations

import argparse
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from classification import CATEGORIES, classify  # noqa: E402 - beside this file, not a package


@dataclass
class Case:
    id: str  # unit/test_x.py::test_name[params]
    outcome: str  # passed, failed, error, skipped
    message: str


def _test_id(case: ET.Element) -> str:
    module = case.get("classname", "").replace(".", "/")
    return f"{module}.py::{case.get('name', '')}"


def read_junit(path: Path) -> list[Case]:
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed"}.get(tag, tag)
                message = (node.get("message") or node.text or "").strip()
                break
        cases.append(Case(_test_id(case), outcome, message))
    return cases


def cell(text: str) -> str:
    """Text for a Markdown table cell (GitHub's tables take ``\\|`` for a pipe, inside code spans too)."""
    return text.replace("|", "\\|")


def one_line(text: str, limit: int = 140) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("junit", type=Path)
    p.add_argument("--listed", type=Path, help="test ids collected but not run (one a line)")
    p.add_argument("--commit", help="the checkout the router ran from (git describe)")
    args = p.parse_args(argv)
    cases = read_junit(args.junit)
    listed = [line.strip() for line in args.listed.read_text().splitlines() if "::" in line] \
        if args.listed and args.listed.is_file() else []

    print("# llama.cpp server tests against the Velesio router\n")
    if args.commit:
        print(f"Router and worker from `{args.commit}`.\n")
    totals = Counter(c.outcome for c in cases)
    print(", ".join(f"{totals[o]} {o}" for o in ("passed", "failed", "error", "skipped") if totals[o])
          + f" ({len(cases)} run){f', {len(listed)} listed, not run' if listed else ''}\n")
    print("| module | passed | failed | error | skipped |\n|---|---|---|---|---|")
    modules: dict[str, Counter[str]] = {}
    for c in cases:
        modules.setdefault(c.id.split("::")[0], Counter())[c.outcome] += 1
    for module, counts in modules.items():
        print(f"| {module} | {counts['passed']} | {counts['failed']} | {counts['error']} | {counts['skipped']} |")

    failing = [c for c in cases if c.outcome in ("failed", "error")]
    by_category: Counter[tuple[str, str]] = Counter()
    by_gap: Counter[str] = Counter()
    print("\n| test | category | reason | assertion |\n|---|---|---|---|")
    for c in failing:
        category, reason = classify(c.id, c.message)
        by_category[category, ""] += 1
        if category == "a":
            by_gap[reason.split(" ", 1)[0]] += 1
        print(f"| `{cell(c.id)}` | {category} | {cell(reason)} | {cell(one_line(c.message))} |")
    for test_id in listed:
        category, reason = classify(test_id, "")
        by_category[category, ", listed, not run"] += 1
        print(f"| `{cell(test_id)}` | {category} | {cell(reason)} (listed, not run) | |")
    print("\n| category | tests |\n|---|---|")
    for (category, note), n in sorted(by_category.items()):
        print(f"| {category} {CATEGORIES.get(category, '')}{note} | {n} |")
    if by_gap:
        print("\n| fidelity gap | tests |\n|---|---|")
        for gap, n in by_gap.most_common():
            print(f"| {gap} | {n} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
