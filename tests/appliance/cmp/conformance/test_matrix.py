"""docs/cmp-conformance.md names, for each requirement, the test that checks it: every test it names exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[4]
TESTS = ROOT / "tests" / "appliance" / "cmp"


def test_every_test_the_matrix_names_exists() -> None:
    text = (ROOT / "docs" / "cmp-conformance.md").read_text()
    named = re.findall(r"`((?:conformance/)?test_\w+\.py)(?:::(\w+))?(?:\[\w+\])?`", text)
    assert len(named) > 40
    last_file = ""
    for file, test in named:
        path = TESTS / file
        assert path.is_file(), file
        if test:
            assert re.search(rf"^(async )?def {test}\(", path.read_text(), re.M), f"{file}::{test}"
        last_file = file
    # `::test` alone continues the file named just before it in the same cell
    for test in re.findall(r"`::(\w+)`", text):
        assert any(
            re.search(rf"^(async )?def {test}\(", p.read_text(), re.M) for p in TESTS.rglob("test_*.py")
        ), test
    assert last_file
