"""README's table of Hugging Face generate options says what tests/models/test_generate_options.py checks: every
GenerationConfig field and generate keyword it classifies has a row, with the same status (issue 17)."""
from __future__ import annotations

import os
import re

import test_generate_options as options

README = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "README.md")


def readme_rows() -> dict[str, set[str]]:
    """option name -> the statuses of the README rows naming it (a row names options in backticks)."""
    with open(README, encoding="utf-8") as f:
        text = f.read()
    table = text[text.index("| option | status | notes |"):].split("\n\n")[0].splitlines()[2:]
    found = {}
    for row in table:
        names, status = row.split(" | ")[:2]
        for name in re.findall(r"`([a-z_]+)", names):
            found.setdefault(name, set()).add("refused" if status.startswith("refused") else "supported")
    return found


def test_every_classified_option_has_a_readme_row_with_its_status():
    rows = readme_rows()
    for table in (options.FIELDS, options.KEYWORDS):
        for name, cases in table.items():
            tested = {"refused" if case.refused is not None else "supported" for case in cases}
            assert name in rows, f"README's generate-options table has no row for {name!r}"
            assert rows[name] == tested, f"{name}: README says {sorted(rows[name])}, the tests {sorted(tested)}"
