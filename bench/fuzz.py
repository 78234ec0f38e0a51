"""Fuzz every input boundary: station frame codec and sessions, CSR intake, CMP parser and protection check, OCSP
request parser, TOML configuration loader (the targets and their contracts: bench/fuzz_targets.py).

    python bench/fuzz.py --target NAME|all [--inputs 1000000] [--seed 1] [--engine mutate|atheris]
                         [--time-limit 10] [--save DIR]
    python bench/fuzz.py --write-seeds          # (re)write the seed inputs into tests/fuzz_corpus/<target>/

Two engines. `mutate` (the default, and what the tests run) is deterministic for a seed: each input is an input
of the corpus (the target's seeds, the committed regression inputs under tests/fuzz_corpus/<target>/, and every
input that produced an outcome not seen before) changed by the target's structure-aware mutation (DER trees for
CMP and OCSP, re-signed CSRs, TOML lines) or by byte mutations. `atheris` (pip install '.[fuzz]') is
coverage-guided: libFuzzer's mutations plus the same structure-aware ones, steered by the Python lines each
input reaches in appliance/, stations/ and bench/; it stops at the first violation and writes it to --save.

Every input runs under a time limit (SIGALRM; libFuzzer's -timeout with atheris): one that takes longer is a
hang. The 20 slowest inputs are timed again after the run (best of 3; the 5 slowest of them are printed); one still slower than --slow-ms (100)
is a finding too (an input that costs the appliance far more than it costs the peer). The run prints inputs,
rate, outcomes, the slowest inputs and every violation; with --save each violating input is written to
DIR/<target>-<n>.bin (slow ones to DIR/<target>-slow-<n>.bin). Exit status 1 if anything broke a contract.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import random
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.fuzz_targets import TARGETS, Checker, Target, Violation

CORPUS = Path(__file__).resolve().parents[1] / "tests" / "fuzz_corpus"
# Kept and timed again after the run: on a loaded machine the slowest times of a run are mostly preemptions of cheap
# inputs, so more than the few printed are kept, for a really slow input to be among them.
KEEP_SLOWEST = 20
MAX_CORPUS = 4000  # inputs kept for mutation: novel outcomes are few; this bounds memory on a long run
_INTERESTING = [0x00, 0x01, 0x7F, 0x80, 0x81, 0x82, 0x84, 0xFF, 0x30, 0xA0, 0xB1, 0xD5]


class Hang(BaseException):
    """An input ran past the time limit. A BaseException, so the targets' `except Exception` does not take it."""


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    def alarm(signum: int, frame: FrameType | None) -> None:
        raise Hang

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass
class Report:
    target: str
    inputs: int = 0
    seconds: float = 0.0
    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)
    violations: list[tuple[str, bytes]] = field(default_factory=list)  # (what, input)
    slowest: list[tuple[float, bytes]] = field(
        default_factory=list
    )  # the KEEP_SLOWEST slowest (seconds, input)
    slow: list[tuple[float, bytes]] = field(
        default_factory=list
    )  # of those, slower than --slow-ms timed again


def corpus_inputs(name: str) -> list[bytes]:
    """The committed inputs of a target: its seeds and every regression input, in a stable order."""
    folder = CORPUS / name
    return [p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()] if folder.is_dir() else []


def run_one(checker: Checker, data: bytes, limit: float, report: Report) -> None:
    start = time.perf_counter()
    try:
        with time_limit(limit):
            outcome = checker(data)
    except Violation as exc:
        outcome = "VIOLATION"
        report.violations.append((str(exc), data))
    except Hang:
        outcome = "HANG"
        report.violations.append((f"no answer within {limit} s", data))
    except Exception as exc:  # noqa: BLE001 - a checker's own failure is a finding too, not a crash of the run
        outcome = "VIOLATION"
        report.violations.append((f"checker raised {type(exc).__name__}: {exc}", data))
    took = time.perf_counter() - start
    report.inputs += 1
    report.outcomes[outcome] += 1
    if len(report.slowest) < KEEP_SLOWEST or took > report.slowest[-1][0]:
        report.slowest = sorted([*report.slowest, (took, data)], key=lambda s: -s[0])[:KEEP_SLOWEST]


def byte_mutate(data: bytes, rng: random.Random, corpus: list[bytes]) -> bytes:
    raw = bytearray(data)
    for _ in range(rng.choice([1, 1, 2, 3, 4])):
        op = rng.randrange(8)
        pos = rng.randrange(len(raw) + 1)
        if op == 0 and raw:
            raw[min(pos, len(raw) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1 and raw:
            raw[min(pos, len(raw) - 1)] = rng.choice(_INTERESTING)
        elif op == 2:
            raw[pos:pos] = rng.randbytes(rng.choice([1, 2, 4, 16]))
        elif op == 3:
            del raw[pos : pos + rng.choice([1, 2, 4, 16, 64])]
        elif op == 4 and raw:
            start = rng.randrange(len(raw))
            raw[pos:pos] = raw[start : start + rng.choice([1, 4, 16, 256])]
        elif op == 5:
            other = rng.choice(corpus)
            start = rng.randrange(len(other) + 1)
            raw[pos:] = other[start:]
        elif op == 6:
            del raw[pos:]
        else:
            raw[pos:pos] = rng.randbytes(2) * rng.choice([2, 8, 64])
    return bytes(raw)


def fuzz(
    target: Target, inputs: int, seed: int = 1, limit: float = 10.0, slow_s: float = 0.1, progress: int = 0
) -> Report:
    """The `mutate` engine: the committed corpus first, then `inputs` mutated inputs, deterministically."""
    checker = target.make()
    mutate = target.mutate() if target.mutate else None
    corpus = list(dict.fromkeys([*target.seeds(), *corpus_inputs(target.name)]))
    report = Report(target.name)
    start = time.perf_counter()
    for data in corpus:
        run_one(checker, data, limit, report)
    seen = set(report.outcomes)
    rng = random.Random(f"{target.name}-{seed}")
    for n in range(inputs):
        if progress and n and n % progress == 0:
            took = time.perf_counter() - start
            print(
                f"  ... {report.inputs} inputs in {took:.0f} s, {len(report.violations)} violations",
                flush=True,
            )
        base = rng.choice(corpus)
        data = mutate(base, rng) if mutate and rng.random() < 0.6 else byte_mutate(base, rng, corpus)
        before = len(report.violations)
        run_one(checker, data, limit, report)
        new = set(report.outcomes) - seen
        if new and len(report.violations) == before:
            # An outcome not seen before: a crude stand-in for coverage, it keeps inputs that got somewhere new.
            seen |= new
            if len(corpus) < MAX_CORPUS:
                corpus.append(data)
    report.seconds = time.perf_counter() - start
    # On a shared machine one slow time can be a preemption: the slowest inputs are timed again (best of 3).
    report.slowest = sorted(
        ((_best_of(checker, data, 3, limit), data) for _, data in report.slowest), key=lambda s: -s[0]
    )
    return report


def _best_of(checker: Checker, data: bytes, times: int, limit: float) -> float:
    best = float("inf")
    for _ in range(times):
        start = time.perf_counter()
        # A violation or a hang was recorded already; only the time matters here.
        with contextlib.suppress(Exception, Hang), time_limit(limit):
            checker(data)
        best = min(best, time.perf_counter() - start)
    return best


def fuzz_atheris(target: Target, inputs: int, seed: int, limit: float, save: Path | None) -> None:
    import atheris  # the optional 'fuzz' extra

    with atheris.instrument_imports(include=["appliance", "stations", "bench"]):
        checker = target.make()
        mutate = target.mutate() if target.mutate else None
    work = Path(tempfile.mkdtemp(prefix=f"birthline-fuzz-{target.name}-"))
    for n, data in enumerate([*target.seeds(), *corpus_inputs(target.name)]):
        (work / f"seed-{n}").write_bytes(data)
    report = Report(target.name)
    started = time.perf_counter()

    def one(data: bytes) -> None:
        outcome = checker(data)  # a Violation propagates: libFuzzer saves the input and stops
        report.inputs += 1
        report.outcomes[outcome] += 1
        if report.inputs % 100_000 == 0:
            print_report(report, time.perf_counter() - started)

    def custom(data: bytes, max_size: int, mseed: int) -> bytes:
        rng = random.Random(mseed)
        if mutate is not None and rng.random() < 0.5:
            return mutate(data, rng)[:max_size]
        return bytes(atheris.Mutate(data, max_size))

    argv = [sys.argv[0], f"-runs={inputs}", f"-seed={seed}", f"-timeout={int(limit)}", "-max_len=20000",
            "-print_final_stats=1", str(work)]  # fmt: skip
    if save:
        save.mkdir(parents=True, exist_ok=True)
        argv.insert(1, f"-artifact_prefix={save}/{target.name}-")
    atheris.Setup(argv, one, custom_mutator=custom)
    atheris.Fuzz()  # libFuzzer exits the process at the end: its final stats are the run's figures


def print_report(report: Report, seconds: float | None = None) -> None:
    seconds = report.seconds if seconds is None else seconds
    rate = report.inputs / seconds if seconds else 0.0
    print(f"{report.target}: {report.inputs} inputs in {seconds:.0f} s ({rate:.0f}/s), "
          f"{len(report.violations)} violations")  # fmt: skip
    top = ", ".join(f"{k} {v}" for k, v in report.outcomes.most_common(12))
    print(f"  outcomes ({len(report.outcomes)}): {top}")
    if report.slowest:
        print(
            "  slowest (timed again after the run, best of 3): "
            + ", ".join(f"{s * 1000:.1f} ms ({len(d)} B)" for s, d in report.slowest[:5])
        )
    for what, data in report.violations[:10]:
        print(f"  VIOLATION {what} [{len(data)} B] {data[:48].hex()}")
    for took, data in report.slow:
        print(f"  SLOW {took * 1000:.0f} ms, timed again [{len(data)} B] {data[:48].hex()}")


def main() -> int:  # pragma: no cover - a benchmark
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--target", default="all", choices=["all", *TARGETS])
    parser.add_argument("--inputs", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--engine", default="mutate", choices=["mutate", "atheris"])
    parser.add_argument("--time-limit", type=float, default=10.0, help="seconds one input may take")
    parser.add_argument(
        "--slow-ms",
        type=float,
        default=100.0,
        help="one of the slowest inputs slower than this, timed again, is a finding",
    )
    parser.add_argument("--save", type=Path, help="write violating inputs here")
    parser.add_argument("--write-seeds", action="store_true", help="write seeds to tests/fuzz_corpus/")
    args = parser.parse_args()
    names = list(TARGETS) if args.target == "all" else [args.target]
    if args.write_seeds:
        for name in names:
            folder = CORPUS / name
            folder.mkdir(parents=True, exist_ok=True)
            for n, data in enumerate(TARGETS[name].seeds()):
                (folder / f"seed-{n:02d}.bin").write_bytes(data)
        return 0
    if args.engine == "atheris":
        if len(names) != 1:
            parser.error("atheris runs one --target at a time")
        fuzz_atheris(TARGETS[names[0]], args.inputs, args.seed, args.time_limit, args.save)
        return 0
    broken = 0
    for name in names:
        report = fuzz(TARGETS[name], args.inputs, args.seed, args.time_limit, args.slow_ms / 1000, 50_000)
        print_report(report)
        sys.stdout.flush()
        broken += len(report.violations) + len(report.slow)
        if args.save:
            args.save.mkdir(parents=True, exist_ok=True)
            for n, (_, data) in enumerate(report.violations):
                (args.save / f"{name}-{n}.bin").write_bytes(data)
            for n, (_, data) in enumerate(report.slow):
                (args.save / f"{name}-slow-{n}.bin").write_bytes(data)
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
