"""The fast slice of the CSR intake fuzzing (bench/fuzz_csr.py runs a million inputs; this runs seconds' worth,
deterministically). The invariant: every input gets a reason code or a certificate (checked in-process through
the whole worker-side path), and the next good request still issues (checked through the real IssueService with
a worker process, on a sample)."""

from __future__ import annotations

import asyncio
import collections
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.ca import CaRecord
from appliance.errors import IssuanceRefused, ReasonCode
from appliance.issuance.journal import Journal
from appliance.issuance.policy import IssueRequest
from appliance.issuance.prepare import Job, Preparer
from appliance.issuance.service import IssueService
from bench import csrfuzz
from hsm.token import Token
from tests.appliance.conftest import make_csr


class Fuzz:
    def __init__(self) -> None:
        self.seeds = csrfuzz.make_seeds(1, rsa_3072=False)
        self.spkis = csrfuzz.interesting_spkis(self.seeds)
        self.prep: Preparer = csrfuzz.preparer()
        self.known = csrfuzz.known_key_hashes(self.seeds)

    def mutator(self, rng: random.Random) -> csrfuzz.Mutator:
        return csrfuzz.Mutator(self.seeds, rng, self.spkis)

    def check(self, data: bytes) -> csrfuzz.Outcome:
        return csrfuzz.check(self.prep, data, self.known)


@pytest.fixture(scope="module")
def fuzz() -> Fuzz:
    return Fuzz()


def test_every_seed_gets_its_expected_outcome(fuzz: Fuzz) -> None:
    """The premise of the mutations: valid CSRs of each key type issue, the refused kinds are refused."""
    got = {seed.name: fuzz.check(seed.der).code for seed in fuzz.seeds}
    assert got == {seed.name: seed.expect for seed in fuzz.seeds}


def test_structure_aware_slice_keeps_the_invariant(fuzz: Fuzz) -> None:
    mutator = fuzz.mutator(random.Random("slice-1"))
    codes: collections.Counter[str] = collections.Counter()
    ops: set[str] = set()
    violations = []
    for _ in range(2500):
        kind, seed, data = mutator.next()
        outcome = fuzz.check(data)
        codes[outcome.code] += 1
        ops.add(kind.split("+")[0])
        if outcome.violation is not None:
            violations.append((outcome.violation, kind, seed, data.hex()))
    assert violations == []
    # The mutations reach every stage: parsing, key policy, proof of possession, and the builder.
    assert {"BAD_CSR", "KEY_POLICY", "BAD_POP", csrfuzz.ISSUED} <= set(codes), codes
    assert set(csrfuzz.Mutator.OPS) <= ops


@settings(
    max_examples=300,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(data=st.binary(max_size=10_000))
def test_random_bytes_keep_the_invariant(fuzz: Fuzz, data: bytes) -> None:
    outcome = fuzz.check(data)
    assert outcome.violation is None, outcome
    assert outcome.code == "BAD_CSR"


@settings(
    max_examples=400,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    seed=st.integers(0, 100),
    ops=st.lists(st.sampled_from(csrfuzz.Mutator.OPS), min_size=1, max_size=4),
    resign=st.booleans(),
    rng=st.randoms(use_true_random=False),
)
def test_mutations_chosen_by_hypothesis_keep_the_invariant(
    fuzz: Fuzz, seed: int, ops: list[str], resign: bool, rng: random.Random
) -> None:
    """The structure-aware mutations with Hypothesis choosing (and, on a failure, shrinking) the seed, the
    operators and every detail of them."""
    chosen = fuzz.seeds[seed % len(fuzz.seeds)]
    kind, data = fuzz.mutator(rng).derive(chosen, ops, resign=resign)
    outcome = fuzz.check(data)
    assert outcome.violation is None, (kind, chosen.name, outcome, data.hex())


def test_bare_public_keys_keep_the_invariant(fuzz: Fuzz) -> None:
    """The CMP ir/cr path into the same core: a SubjectPublicKeyInfo instead of a CSR (validate_public_key)."""
    seeds = [csrfuzz.Seed(f"spki-{i}", spki, "?") for i, spki in enumerate(fuzz.spkis) if spki[:1] == b"\x30"]
    mutator = csrfuzz.Mutator(seeds, random.Random("spki-1"), fuzz.spkis)
    codes: collections.Counter[str] = collections.Counter()
    for _ in range(1500):
        kind, seed, data = mutator.next()
        job = Job(csrfuzz.DEVICE_SERIAL, b"", csrfuzz.PROFILE.name, csrfuzz.NOW, public_key_der=data)
        outcome = csrfuzz.check(fuzz.prep, data, None, job)
        assert outcome.violation is None, (kind, seed, outcome, data.hex())
        codes[outcome.code] += 1
    assert {"BAD_CSR", "KEY_POLICY", csrfuzz.ISSUED} <= set(codes), codes


async def test_a_sample_through_the_service_and_the_next_good_request_still_issues(
    fuzz: Fuzz, journal: Journal, issuing: CaRecord, hsm_token: Token
) -> None:
    mutator = fuzz.mutator(random.Random("service-1"))
    sample = [mutator.next()[2] for _ in range(96)]
    service = IssueService(
        journal, issuing, hsm_token.get_key(issuing.key_label), {"fuzz": csrfuzz.PROFILE},
        default_profile="fuzz", prepare_workers=1, batch_max=32,
    )  # fmt: skip
    async with service:
        for at in range(0, len(sample), 16):
            group = sample[at : at + 16]
            results = await asyncio.gather(
                *(service.issue(IssueRequest(f"FZ-{at + i}", data)) for i, data in enumerate(group)),
                *(service.issue(IssueRequest(f"OK-{at + i}", make_csr()[1])) for i in range(len(group))),
                return_exceptions=True,
            )
            for r in results[: len(group)]:
                if isinstance(r, BaseException):
                    assert isinstance(r, IssuanceRefused) and r.code is not ReasonCode.INTERNAL, r
            for r in results[len(group) :]:
                assert not isinstance(r, BaseException) and not r.reused, r
        assert service.prepare_stats["deaths"] == 0
