"""The short budget of bench/fuzz.py: every target replays its committed corpus (tests/fuzz_corpus/<target>/:
seeds and the regression inputs of every defect the fuzzing found) and then runs a few seconds of mutated inputs
from a fixed seed, and no input may break the boundary's contract (bench/fuzz_targets.py). The long runs (a
million inputs and more per target) are `python bench/fuzz.py --target NAME --inputs N`; docs/reliability.md
has their figures."""

from __future__ import annotations

import pytest

from bench import fuzz
from bench.fuzz_targets import TARGETS, Target

# Inputs per target: a few seconds each on this machine. `outcomes`: how many different answers the mutated
# inputs must reach at least, so a mutation that never gets past the boundary's first check fails the test.
BUDGET = {
    "codec": (4000, 4),
    "session": (3000, 5),
    "server": (1500, 5),
    "csr": (2000, 4),
    "cmp": (1500, 6),
    "ocsp": (4000, 10),
    "config": (1500, 3),
}


def test_every_target_has_a_budget_and_a_corpus() -> None:
    assert set(BUDGET) == set(TARGETS)
    for name in TARGETS:
        assert fuzz.corpus_inputs(name), f"tests/fuzz_corpus/{name}/ is empty"


@pytest.mark.parametrize("name", sorted(BUDGET))
def test_short_budget(name: str) -> None:
    inputs, outcomes = BUDGET[name]
    report = fuzz.fuzz(TARGETS[name], inputs, seed=1)
    assert report.inputs >= inputs
    assert not report.violations, [(what, data.hex()) for what, data in report.violations[:3]]
    assert len(report.outcomes) >= outcomes, report.outcomes


def test_a_broken_contract_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    """The checker is not a formality: an OCSP parser that lets an IndexError out is caught on the corpus."""
    from appliance.va import ocsp_request

    def broken(data: bytes) -> ocsp_request.OcspRequest:
        raise IndexError("planted")

    monkeypatch.setattr(ocsp_request, "_parse", broken)
    report = fuzz.fuzz(TARGETS["ocsp"], 10, seed=1)
    assert report.violations
    assert "IndexError" in report.violations[0][0]


def test_a_hang_is_reported() -> None:
    def spin(data: bytes) -> str:
        while True:
            pass

    target = Target("spin", lambda: spin, lambda: [b"x"])
    report = fuzz.fuzz(target, 0, limit=0.2)
    assert report.outcomes["HANG"] == 1
    assert "no answer within" in report.violations[0][0]
