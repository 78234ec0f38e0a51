"""Fuzz CSR intake: a million mutated CSRs, then a sample of them through the real issuance service.

    python bench/fuzz_csr.py [--inputs 1000000] [--procs 2] [--seed 1] [--sample 2000] [--save DIR]

Phase 1 runs every input through the worker-side path in-process (bench/csrfuzz.py: device serial, CSR
intake, profile builder, TBS capture), spread over --procs processes, each with its own deterministic stream
of mutations (structure-aware on seed CSRs of each key type, plus byte-level and random inputs). The invariant
is "a reason code or a certificate": an exception, an INTERNAL refusal, a result that does not survive pickle,
a refusal message that is not short printable ASCII, or a certificate for a key no seed proved it holds is a
violation. It prints inputs, rate, outcomes by reason code and by mutation, the slowest inputs (timed again
after the run, since on a shared machine one slow time can be a preemption) and the violations (saved to
--save DIR as DER files when given).

Phase 2 checks the second half, "the next good request still issues": every violating input and a sample of
the others (per outcome) go through a real IssueService with two worker processes, a SoftHSM2 token and a
journal, each next to a good request in the same batches. It prints how each was answered and the workers'
deaths (0 expected). The exit status is 1 if anything broke the invariant.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import multiprocessing
import random
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from appliance import ca as ca_mod
from appliance.errors import IssuanceRefused
from appliance.issuance.journal import Journal
from appliance.issuance.policy import IssueRequest
from appliance.issuance.service import IssueService
from bench import csrfuzz
from hsm.softhsm import create_softhsm_token
from hsm.token import Token


@dataclass
class Tally:
    inputs: int = 0
    seconds: float = 0.0
    codes: collections.Counter[str] = field(default_factory=collections.Counter)
    by_op: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)
    shapes: collections.Counter[str] = field(default_factory=collections.Counter)
    violations: collections.Counter[str] = field(default_factory=collections.Counter)
    slowest: list[tuple[float, str, bytes]] = field(
        default_factory=list
    )  # the 5 slowest: seconds, what, input
    examples: list[tuple[str, str, str, bytes]] = field(default_factory=list)  # violation, kind, seed, input
    sample: dict[str, list[bytes]] = field(default_factory=dict)  # outcome -> a reservoir of inputs

    def merge(self, other: Tally) -> None:
        self.inputs += other.inputs
        self.seconds = max(self.seconds, other.seconds)
        self.codes += other.codes
        self.by_op += other.by_op
        self.shapes += other.shapes
        self.violations += other.violations
        self.slowest = sorted(self.slowest + other.slowest, reverse=True)[:5]
        self.examples += other.examples
        for code, inputs in other.sample.items():
            self.sample.setdefault(code, []).extend(inputs)


def fuzz(args: tuple[int, int, int, int]) -> Tally:
    seed, proc, count, keep = args
    seeds = csrfuzz.make_seeds(seed)
    prep = csrfuzz.preparer()
    known = csrfuzz.known_key_hashes(seeds)
    rng = random.Random(f"{seed}-{proc}")
    mutator = csrfuzz.Mutator(seeds, rng)
    pick = random.Random(f"sample-{seed}-{proc}")
    tally = Tally()
    seen: collections.Counter[str] = collections.Counter()
    start = time.perf_counter()
    for _ in range(count):
        kind, seed_name, data = mutator.next()
        outcome = csrfuzz.check(prep, data, known)
        op = kind.split("+")[0]
        tally.codes[outcome.code] += 1
        tally.by_op[(op, outcome.code)] += 1
        tally.shapes[re.sub(r"\d+", "N", outcome.message)] += 1
        if len(tally.slowest) < 5 or outcome.seconds > tally.slowest[-1][0]:
            tally.slowest = sorted(
                [*tally.slowest, (outcome.seconds, f"{kind} on {seed_name}", data)], reverse=True
            )[:5]
        if outcome.violation is not None:
            tally.violations[outcome.violation] += 1
            if len(tally.examples) < 200:
                tally.examples.append((outcome.violation, kind, seed_name, data))
        # Reservoir sample per outcome, for phase 2.
        seen[outcome.code] += 1
        bucket = tally.sample.setdefault(outcome.code, [])
        if len(bucket) < keep:
            bucket.append(data)
        elif (j := pick.randrange(seen[outcome.code])) < keep:
            bucket[j] = data
    tally.inputs = count
    tally.seconds = time.perf_counter() - start
    return tally


def report(tally: Tally, wall: float, procs: int) -> None:
    n = tally.inputs
    print(
        f"\nphase 1: {n:,} inputs in {wall:.1f} s over {procs} process(es) (seed CSRs and keys made in each)"
    )
    print(
        f"  rate: {n / tally.seconds:,.0f} inputs/s (mutate + check, slowest process), {n / wall:,.0f} overall"
    )
    print("  outcomes by reason code:")
    for code, count in tally.codes.most_common():
        print(f"    {code:20s} {count:10,d}  {count / n:7.3%}")
    print("  by mutation (first operator) and outcome:")
    ops: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for (op, code), count in tally.by_op.items():
        ops[op][code] += count
    for op, codes in sorted(ops.items(), key=lambda kv: -sum(kv[1].values())):
        parts = ", ".join(f"{c} {k:,}" for c, k in codes.most_common())
        print(f"    {op:18s} {sum(codes.values()):9,d}: {parts}")
    print(f"  distinct refusal messages (digits folded): {len(tally.shapes)}")
    prep, known = csrfuzz.preparer(), csrfuzz.known_key_hashes(csrfuzz.make_seeds(1, rsa_3072=False))
    print("  slowest inputs (ms in the run; timed again, best of 3):")
    for seconds, what, data in tally.slowest:
        again = min(csrfuzz.check(prep, data, known).seconds for _ in range(3))
        print(f"    {seconds * 1000:8.1f}  {again * 1000:6.2f}  {what}, {len(data)} bytes")
    total = sum(tally.violations.values())
    print(f"  violations: {total}")
    for what, count in tally.violations.most_common():
        print(f"    {count:8,d}  {what}")


async def through_service(
    sample: list[tuple[str, bytes]], seed: int
) -> tuple[collections.Counter[str], int, dict[str, int]]:
    """Each sampled input beside a good request, in batches, through the real service with two workers."""
    answers: collections.Counter[str] = collections.Counter()
    broken = 0
    with tempfile.TemporaryDirectory(prefix="birthline-fuzz-") as tmp:
        softhsm = create_softhsm_token(Path(tmp) / "softhsm", label="fuzz")
        with Token.open(softhsm.hsm_config()) as token, Journal(Path(tmp) / "journal.sqlite") as journal:
            ca_mod.create_root(journal, token, "root", "CN=Fuzz Root")
            issuing = ca_mod.create_issuing(journal, token, "issuing", "CN=Fuzz Issuing", "root")
            service = IssueService(
                journal, issuing, token.get_key(issuing.key_label), {"fuzz": csrfuzz.PROFILE},
                default_profile="fuzz", prepare_workers=2, batch_max=64, max_csr_bytes=csrfuzz.MAX_CSR_BYTES,
            )  # fmt: skip
            async with service:
                for at in range(0, len(sample), 32):
                    group = sample[at : at + 32]
                    good = [_good_csr() for _ in group]
                    results = await asyncio.gather(
                        *(service.issue(IssueRequest(f"FZ-{at + i}", data)) for i, (_, data) in enumerate(group)),
                        *(service.issue(IssueRequest(f"OK-{at + i}", csr)) for i, csr in enumerate(good)),
                        return_exceptions=True,
                    )  # fmt: skip
                    for (expected, _), r in zip(group, results[: len(group)], strict=True):
                        if isinstance(r, IssuanceRefused):
                            answers[f"{expected} -> {r.code.name}"] += 1
                            broken += r.code.name == "INTERNAL"
                        elif isinstance(r, BaseException):
                            answers[f"{expected} -> {type(r).__name__}"] += 1
                            broken += 1
                        else:
                            answers[f"{expected} -> ISSUED"] += 1
                    for r in results[len(group) :]:
                        if isinstance(r, BaseException) or r.reused:
                            answers[f"next good request -> {r!r}"[:120]] += 1
                            broken += 1
                        else:
                            answers["next good request -> ISSUED"] += 1
                stats = dict(service.prepare_stats)
    return answers, broken, stats


def _good_csr() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.DER)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--inputs", type=int, default=1_000_000)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--sample", type=int, default=2000, help="inputs replayed through the real service")
    ap.add_argument("--save", type=Path, help="write violating inputs here as DER files")
    args = ap.parse_args()

    per_proc = [args.inputs // args.procs + (i < args.inputs % args.procs) for i in range(args.procs)]
    keep = max(1, args.sample // 8)
    print(
        f"fuzzing CSR intake: {args.inputs:,} inputs, seed {args.seed}, {args.procs} process(es) ...",
        flush=True,
    )
    start = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(args.procs) as pool:
        parts = pool.map(fuzz, [(args.seed, i, n, keep) for i, n in enumerate(per_proc)])
    wall = time.perf_counter() - start
    tally = Tally()
    for part in parts:
        tally.merge(part)
    report(tally, wall, args.procs)
    if args.save and tally.examples:
        args.save.mkdir(parents=True, exist_ok=True)
        for i, (what, kind, seed, data) in enumerate(tally.examples):
            name = re.sub(r"[^A-Za-z0-9.-]+", "_", f"{i:03d}-{what}-{seed}-{kind}")[:120]
            (args.save / f"{name}.der").write_bytes(data)
        print(f"  saved {len(tally.examples)} violating inputs in {args.save}")

    # Phase 2: the violations first, then an even share of every outcome.
    rng = random.Random(args.seed)
    chosen = [(f"violation {v}", d) for v, _, _, d in tally.examples]
    codes = sorted(tally.sample)
    share = max(1, (args.sample - len(chosen)) // max(1, len(codes)))
    for code in codes:
        inputs = tally.sample[code]
        chosen += [(code, d) for d in rng.sample(inputs, min(share, len(inputs)))]
    print(f"\nphase 2: {len(chosen):,} of them through IssueService (2 worker processes, SoftHSM2, journal),"
          " each beside a good request ...", flush=True)  # fmt: skip
    start = time.perf_counter()
    answers, broken, stats = asyncio.run(through_service(chosen, args.seed))
    print(f"  done in {time.perf_counter() - start:.1f} s; in-process outcome -> service answer:")
    for what, count in sorted(answers.items()):
        print(f"    {count:7,d}  {what}")
    print(f"  prepare workers: {stats}")
    print(f"  broken answers (INTERNAL, an exception, a good request not issued): {broken}")
    violations = sum(tally.violations.values())
    print(f"\ninvariant {'HELD' if violations == 0 and broken == 0 else 'BROKEN'}: {violations} violation(s) in"
          f" phase 1, {broken} in phase 2")  # fmt: skip
    sys.exit(1 if violations or broken else 0)


if __name__ == "__main__":
    main()
