"""The CPU-heavy work of the pipeline: validate the CSR, build from the profile, capture the exact TBS; and
after the HSM signed, encode and verify each signature and assemble the certificate (`finish`).

Pure and picklable, so the service can run it in worker processes: with the GIL, verifying proofs of
possession and encoding certificates on the event loop's core would cap issuance at one core. Refusals come
back as values, not exceptions, because a pickled exception loses its reason code.

The invariant (docs/architecture.md): whatever a job holds, `prepare` returns a Prepared or a Refusal and never
raises, and both are built from plain values only, so they always pickle in the worker and unpickle in the
parent. An exception that escaped once (cryptography's InvalidVersion, whose pickle cannot be loaded again)
broke the process pool for every station. The validators map what a device can get wrong to its reason code;
anything still raised is our own bug and costs that one request an INTERNAL refusal, with a `fault` (where, not
what: no input) for the service to log once.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import threading
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509

from appliance.errors import IssuanceRefused, ReasonCode
from appliance.issuance.tbs import Tbs, TbsMaker
from appliance.issuance.template import CHECK_EVERY, TbsTemplate, TemplateError, spki_of
from appliance.profiles import (
    Profile,
    ValidatedCsr,
    ValidatedKey,
    build_certificate,
    new_serial_number,
    safe_repr,
    validate_csr,
    validate_device_serial,
    validate_public_key,
)
from hsm.algorithms import KeyAlgorithm
from hsm.errors import SignatureVerificationError
from hsm.verify import SignatureCheck

INTERNAL_MESSAGE = "internal error while checking this request; it was not issued"


@dataclass(frozen=True)
class Job:
    device_serial: str
    csr: bytes
    profile: str
    now: int  # POSIX seconds: notBefore
    public_key_der: bytes | None = None  # instead of csr: a key whose POP the front end verified (CMP ir/cr)

    def __reduce__(self) -> tuple[type[Job], tuple[str, bytes, str, int, bytes | None]]:
        # Plain values, not the dataclass state: several times cheaper through the worker pipe (see Tbs).
        return (Job, (self.device_serial, self.csr, self.profile, self.now, self.public_key_der))


@dataclass(frozen=True)
class Prepared:
    profile: str
    public_key_sha256: bytes
    csr_sha256: bytes
    serial_hex: str
    tbs: Tbs
    csr_der: bytes = b""
    """The DER CSR intake checked when it differs from the job's input (a PEM input decoded); empty for a bare
    key and for a DER input, which is itself what was checked. Later stages (policy, upstream outbox) read the
    checked DER, never the raw input again under other parsing rules."""
    template_fault: str | None = None
    """The hand-built TBS of this profile differed from cryptography's (this one is cryptography's, and so
    are all later ones of the profile in this process): for the service to raise an alarm."""

    def __reduce__(self) -> tuple[type[Prepared], tuple[Any, ...]]:
        return (Prepared, (self.profile, self.public_key_sha256, self.csr_sha256, self.serial_hex, self.tbs,
                           self.csr_der, self.template_fault))  # fmt: skip


@dataclass(frozen=True)
class Refusal:
    code: ReasonCode
    message: str
    details: Mapping[str, Any]
    fault: str | None = field(default=None, compare=False)
    """INTERNAL only: the exception type and the code lines it came through, for our log (never the input)."""

    def error(self) -> IssuanceRefused:
        return IssuanceRefused(self.message, self.code, dict(self.details))


def plain(value: Any) -> Any:
    """`value` as plain data (str, int, float, bool, None, lists and string-keyed dicts of them): what a
    Refusal's details may hold so it pickles in a worker and unpickles in the parent, whatever a validator put
    there. Anything else becomes its escaped repr."""
    if value is None or isinstance(value, str | bool | float):
        return value
    if isinstance(value, int):
        return int(value)  # an IntEnum member pickles by reference to its class: keep the number
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [plain(v) for v in value]
    return safe_repr(repr(value))


def fault_of(exc: BaseException) -> str:
    """Where an unexpected exception came from: its type and the last frames (file:line function), which hold
    no input; the exception's own text may (a KeyError shows its key), so it is left out."""
    frames = traceback.extract_tb(exc.__traceback__)[-3:]
    where = " < ".join(f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in reversed(frames))
    return f"{type(exc).__name__} at {where or 'unknown'}"


@dataclass(frozen=True)
class PrepareContext:
    """What a worker needs, sent once when it starts."""

    profiles: Mapping[str, Profile]
    ca_cert_der: bytes
    ca_algorithm: KeyAlgorithm
    max_csr_bytes: int


class Preparer:
    def __init__(self, ctx: PrepareContext) -> None:
        self.ctx = ctx
        self.ca_cert = x509.load_der_x509_certificate(ctx.ca_cert_der)
        self.tbs_maker = TbsMaker(self.ca_cert.public_key(), ctx.ca_algorithm)
        self.check = SignatureCheck(self.ca_cert.public_key(), "issuing CA")
        # Per profile name: its hand-built TBS template (None: cryptography's builder, after a mismatch or for
        # a shape the template cannot fill in), and how many it made.
        self._templates: dict[str, TbsTemplate | None] = {}
        self._made: dict[str, int] = {}
        self.use_templates = True

    def prepare(self, job: Job) -> Prepared | Refusal:
        """Never raises (the module docstring says why)."""
        try:
            return self._prepare(job)
        except IssuanceRefused as exc:
            return Refusal(exc.code, exc.message, plain(exc.details))
        except Exception as exc:  # noqa: BLE001 - our bug must cost one request, never the worker pool
            return Refusal(ReasonCode.INTERNAL, INTERNAL_MESSAGE, {}, fault=fault_of(exc))

    def _prepare(self, job: Job) -> Prepared | Refusal:
        profile = self.ctx.profiles.get(job.profile) if isinstance(job.profile, str) else None
        if profile is None:
            return Refusal(ReasonCode.UNKNOWN_PROFILE, f"no profile named {safe_repr(str(job.profile))}", {})
        validate_device_serial(profile, job.device_serial)
        csr: ValidatedCsr | ValidatedKey = (
            validate_csr(job.csr, profile, max_bytes=self.ctx.max_csr_bytes)
            if job.public_key_der is None
            else validate_public_key(job.public_key_der, profile, max_bytes=self.ctx.max_csr_bytes)
        )
        serial = new_serial_number()
        now = dt.datetime.fromtimestamp(job.now, dt.UTC)
        tbs, fault = self._tbs(profile, job.device_serial, csr.public_key, serial, now, csr.spki_der)
        return Prepared(
            profile.name,
            csr.public_key_sha256,
            csr.der_sha256,
            format(serial, "x"),
            tbs,
            csr.der if isinstance(csr, ValidatedCsr) and csr.der != job.csr else b"",
            fault,
        )

    def _reference(
        self, profile: Profile, device_serial: str, public_key: Any, serial: int, now: dt.datetime
    ) -> Tbs:
        builder = build_certificate(
            profile, issuer_cert=self.ca_cert, device_serial=device_serial, public_key=public_key,
            serial_number=serial, now=now,
        )  # fmt: skip
        return self.tbs_maker.make(builder)

    def _tbs(
        self,
        profile: Profile,
        device_serial: str,
        public_key: Any,
        serial: int,
        now: dt.datetime,
        spki_der: bytes = b"",
    ) -> tuple[Tbs, str | None]:
        """The TBS, hand-built from the profile's template when it has one (template.py), else cryptography's.
        The first of each template and one in CHECK_EVERY are compared with cryptography's; a difference
        retires the template and is reported (the second value)."""
        if not self.use_templates:
            return self._reference(profile, device_serial, public_key, serial, now), None
        name = profile.name
        if name not in self._templates:
            try:
                self._templates[name] = TbsTemplate(profile, self.ca_cert, self.tbs_maker, now)
            except TemplateError:
                self._templates[name] = None
            self._made[name] = 0
        template = self._templates[name]
        if template is None or (template.profile is not profile and template.profile != profile):
            return self._reference(profile, device_serial, public_key, serial, now), None
        made = template.make(
            device_serial=device_serial,
            spki_der=spki_der or spki_of(public_key),
            serial_number=serial,
            now=now,
        )
        count = self._made[name]
        self._made[name] = count + 1
        if count % CHECK_EVERY:
            return made, None
        reference = self._reference(profile, device_serial, public_key, serial, now)
        if reference == made:
            return made, None
        self._templates[name] = None
        return reference, (
            f"the hand-built TBS of profile {safe_repr(name)} differs from cryptography's; cryptography's builder"
            " is used for it from now on (slower, correct)"
        )

    def prepare_many(self, jobs: Sequence[Job]) -> list[Prepared | Refusal]:
        return [self.prepare(j) for j in jobs]

    def finish(self, signed: Sequence[tuple[Tbs, bytes]]) -> list[bytes | None]:
        """Each (TBS, raw HSM signature) as the DER certificate, once its signature verified with the CA's
        public key over exactly those TBS bytes; None for one that does not verify (never a certificate).

        Here rather than in the process that drives the HSM: the verify is the largest CPU cost left there
        (~70 us a certificate), and a prepare worker has a core of its own."""
        out: list[bytes | None] = []
        for tbs, raw in signed:
            try:
                der = tbs.certificate(self.check.finish(raw, tbs.tbs))
            except SignatureVerificationError:
                out.append(None)
                continue
            # The signature verified over these TBS bytes; the parse checks the assembled certificate is one a
            # relying party can read.
            x509.load_der_x509_certificate(der)
            out.append(der)
        return out


# -- worker-process side -------------------------------------------------------------------------------------------
_worker: Preparer | None = None


def _exit_with(parent: int) -> None:
    # A worker whose daemon was SIGKILLed (or died any other way) would otherwise live on, orphaned, forever.
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


def init_worker(ctx: PrepareContext) -> None:
    global _worker  # noqa: PLW0603 - one Preparer per worker process, made once at start
    # Ctrl-C goes to the whole process group: the parent decides and stops the pool (each worker would
    # otherwise die with its own KeyboardInterrupt traceback).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker = Preparer(ctx)
    threading.Thread(target=_exit_with, args=(os.getppid(),), name="parent-watch", daemon=True).start()


def finish_in_worker(signed: Sequence[tuple[Tbs, bytes]]) -> list[bytes | None] | None:
    """Preparer.finish in a worker; None if it failed for any other reason (the service then finishes the batch
    itself: a bug here must not cost certificates, and nothing unverified ever comes back)."""
    try:
        assert _worker is not None, "init_worker did not run"
        return _worker.finish(signed)
    except Exception:  # noqa: BLE001 - see the docstring
        return None


def prepare_in_worker(jobs: Sequence[Job]) -> list[Prepared | Refusal]:
    """The function the service's pool runs. It returns, never raises: an exception leaving a worker is pickled
    back to the parent, and one that cannot be unpickled there breaks the whole pool."""
    try:
        assert _worker is not None, "init_worker did not run"
        return _worker.prepare_many(jobs)
    except Exception as exc:  # noqa: BLE001 - see the docstring
        refusal = Refusal(ReasonCode.INTERNAL, INTERNAL_MESSAGE, {}, fault=fault_of(exc))
        return [refusal] * len(jobs)
