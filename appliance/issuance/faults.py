"""Refusals of the appliance's own making, as alarms an operator can act on (appliance/alarms.py).

When the journal or the audit log cannot be written, the HSM is away or returns signatures that do not verify,
the clock is behind, the upstream queue is over its hard limit, or a defect breaks a batch, every station is
refused at once and sees only a code. The operator must see the cause without reading a log flood: each such
refusal raises the alarm of its cause (logged once when it starts, counted while it lasts) and the alarm is
cleared when issuance succeeds again.

Refusals a device or station causes (bad CSR, not authorised, quota exhausted, ...) are not alarms: they are
audited and rate-limited (refusals.py). The exception is a work order running out of units while it is still
active, which a supervisor must act on: a warning alarm per work order, cleared when the order gets more units
or is no longer active.
"""

from __future__ import annotations

import logging
import sqlite3
import traceback
from collections.abc import Iterable
from dataclasses import dataclass

from appliance.alarms import Alarms, LogOnce
from appliance.errors import BirthlineError, IssuanceFailed, ReasonCode

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Cause:
    key: str  # the alarm's cause key (docs/architecture.md "Alarms")
    advice: str


# One cause per reason code a batch can fail with; each clears when issuance succeeds again.
CAUSES: dict[ReasonCode, Cause] = {
    ReasonCode.JOURNAL_UNAVAILABLE: Cause(
        "issuance.journal-unavailable",
        "check the filesystem of the state directory: free space (df), mounted read-write, no immutable"
        " attribute on the journal files (lsattr), no I/O errors (dmesg); issuance resumes by itself once the"
        " journal can be written",
    ),
    ReasonCode.AUDIT_UNAVAILABLE: Cause(
        "issuance.audit-unavailable",
        "the audit log is in the journal: check its filesystem as for the journal (free space, read-write, no"
        " immutable attribute, no I/O errors); issuance resumes by itself once an entry can be appended",
    ),
    ReasonCode.HSM_UNAVAILABLE: Cause(
        "issuance.hsm-unavailable",
        "check the HSM: connected and powered, its token present ([hsm] token_label), the PIN readable;"
        " issuance resumes by itself once a probe signature verifies",
    ),
    ReasonCode.SIGNATURE_INVALID: Cause(
        "issuance.signature-invalid",
        "the HSM returned a signature that does not verify with the issuing CA's key, and nothing was"
        " released: check that the token holds that CA's key (birthline ca list) and the HSM's health; call"
        " the HSM's vendor if it persists",
    ),
    ReasonCode.CLOCK_NOT_TRUSTED: Cause(
        "issuance.clock-not-trusted",
        "set the system clock right (timedatectl, chronyc tracking); issuance resumes by itself once the"
        " clock is no more than [issuance] clock_skew_s behind the last issuance and, after a step, back"
        " within clock_skew_s of where it was (if the stepped time is the right one, restart the daemon)",
    ),
    ReasonCode.BUSY: Cause(
        "issuance.busy",
        "local issuance is held back while the upstream queue is over a hard limit: restore the link to the"
        " upstream CA (birthline upstream status) so the queue drains; issuance resumes by itself below the"
        " limits",
    ),
    ReasonCode.INTERNAL: Cause(
        "issuance.internal",
        "a defect in the appliance, not a fault of the stations: the traceback is in the log (once per kind"
        " of error and interval); report it with the log. Issuance is tried again with every request",
    ),
}
QUOTA_ADVICE = (
    "a supervisor closes the work order when its run is complete (birthline workorder close), or adds and"
    " activates another work order for further devices; stations are refused QUOTA_EXHAUSTED (7) once no"
    " unit is left"
)


def cause_for(code: ReasonCode) -> Cause:
    return CAUSES.get(code) or Cause(
        f"issuance.{code.name.lower().replace('_', '-')}", "see the log around the time the alarm was raised"
    )


def quota_cause(work_order: str) -> str:
    return f"workorder.{_printable(work_order)}.quota"


def _printable(text: str, limit: int = 64) -> str:
    """Work order ids reach the log and the dashboard through alarm texts: never raw control characters."""
    return "".join(ch if ch.isprintable() else f"\\x{ord(ch):02x}" for ch in text[:limit])


class IssuanceAlarms:
    """The issuance service's side of the alarm registry. Used from the event loop only."""

    def __init__(
        self, alarms: Alarms, *, quota_warning_percent: int = 5, internal_log_interval_s: float = 300.0
    ) -> None:
        self.alarms = alarms
        self.quota_warning_percent = quota_warning_percent
        # A defect may hit only some inputs, which a peer chooses: if every good batch cleared the alarm, a
        # peer alternating requests would log a raise and a clear per pair. It clears only after this long
        # without a defect.
        self.internal_quiet_s = internal_log_interval_s
        self._open: set[str] = set()  # causes raised here and not cleared yet: clearing is a set lookup
        self._quota: dict[str, str] = {}  # cause -> work order id, for the periodic re-check
        self._tracebacks = LogOnce(internal_log_interval_s)

    # -- refusals of the appliance's own making -----------------------------------------------------------------
    def failed(self, exc: BirthlineError) -> None:
        """A batch (or a group of confirmations) failed as a whole with `exc`."""
        cause = cause_for(exc.code)
        self.alarms.raise_alarm(
            cause.key,
            f"issuance refused with {exc.code.name} ({int(exc.code)}): {_printable(exc.message, 300)}",
            cause.advice,
            code=int(exc.code),
        )
        self._open.add(cause.key)

    def internal(self, exc: BaseException) -> IssuanceFailed:
        """An unexpected exception broke a batch: log its traceback once per kind and interval (a recurring
        defect must not flood the log), and return the refusal the batch gets."""
        self._tracebacks.log(
            log, logging.ERROR, f"internal:{type(exc).__name__}", "issuance batch failed: %s",
            "".join(traceback.format_exception(exc)).rstrip(),
        )  # fmt: skip
        return IssuanceFailed(f"internal error: {type(exc).__name__}", ReasonCode.INTERNAL)

    def cleared(self, codes: Iterable[ReasonCode], note: str) -> None:
        for code in codes:
            key = cause_for(code).key
            if key in self._open:
                self._open.discard(key)
                self.alarms.clear(key, note)

    def succeeded(self, *, journal_ok: bool, signed: bool, clock_ok: bool) -> None:
        """A batch went through every step it needed without failing as a whole; it proved the journal and
        audit log writable if it wrote to them, the HSM if it signed, the clock if a request passed its check."""
        codes = [ReasonCode.BUSY]
        if journal_ok:
            codes += [ReasonCode.JOURNAL_UNAVAILABLE, ReasonCode.AUDIT_UNAVAILABLE]
        if signed:
            codes += [ReasonCode.HSM_UNAVAILABLE, ReasonCode.SIGNATURE_INVALID]
        if clock_ok:
            codes.append(ReasonCode.CLOCK_NOT_TRUSTED)
        self.cleared(codes, "issuance succeeded")
        self.quiet()

    def quiet(self) -> None:
        """Clear the defect alarm once no batch has failed with one for internal_quiet_s (a batch succeeding
        and the periodic health pass both ask)."""
        key = cause_for(ReasonCode.INTERNAL).key
        if key not in self._open:
            return
        alarm = self.alarms.get(key)
        if alarm is None or self.alarms.clock() - alarm.last_seen >= self.internal_quiet_s:
            self._open.discard(key)
            self.alarms.clear(key, f"no defect for {self.internal_quiet_s:g} s")

    def is_open(self, code: ReasonCode) -> bool:
        return cause_for(code).key in self._open

    # -- work orders running out -----------------------------------------------------------------------------------
    def units_left(self, work_order: str, remaining: int, quantity: int) -> None:
        """A unit was taken from `work_order`: warn at or below the threshold, clear above it."""
        if remaining > quantity * self.quota_warning_percent // 100:
            if self._quota:  # the common case costs one comparison per certificate
                cause = quota_cause(work_order)
                if cause in self._quota:
                    self._clear_quota(cause, "units left again")
            return
        cause = quota_cause(work_order)
        wo = _printable(work_order)
        text = (
            f"work order {wo} has used all {quantity} units and is still active"
            if remaining <= 0
            else f"work order {wo} has {remaining} of {quantity} units left"
        )
        self._raise_quota(cause, work_order, text)

    def quota_refused(self, exc: BirthlineError) -> None:
        """A request was refused QUOTA_EXHAUSTED: its work orders are empty (also after a restart, when the
        alarm of the last unit is gone with the process)."""
        for work_order in exc.details.get("work_orders", ()):
            cause = quota_cause(str(work_order))
            if cause not in self._quota:
                self._raise_quota(
                    cause, str(work_order), f"work order {_printable(str(work_order))} has no units left"
                )

    def _raise_quota(self, cause: str, work_order: str, text: str) -> None:
        self.alarms.raise_alarm(
            cause, text, QUOTA_ADVICE, severity="warning", code=int(ReasonCode.QUOTA_EXHAUSTED),
            details={"work_order": work_order},
        )  # fmt: skip
        self._quota[cause] = work_order

    def _clear_quota(self, cause: str, note: str) -> None:
        del self._quota[cause]
        self.alarms.clear(cause, note)

    @property
    def watched_work_orders(self) -> list[str]:
        return sorted(set(self._quota.values()))

    @staticmethod
    def read_work_orders(conn: sqlite3.Connection, ids: list[str]) -> dict[str, tuple[str, int, int]]:
        """(state, quantity, consumed) of each work order (journal thread)."""
        out: dict[str, tuple[str, int, int]] = {}
        for wo in ids:
            row = conn.execute(
                "SELECT state, quantity, consumed FROM work_order WHERE id=?", (wo,)
            ).fetchone()
            if row is not None:
                out[wo] = (str(row[0]), int(row[1]), int(row[2]))
        return out

    @staticmethod
    def read_active_work_orders(conn: sqlite3.Connection) -> list[tuple[str, int, int]]:
        """(id, quantity, consumed) of every active work order (journal thread)."""
        rows = conn.execute("SELECT id, quantity, consumed FROM work_order WHERE state='active'").fetchall()
        return [(str(r[0]), int(r[1]), int(r[2])) for r in rows]

    def check_work_orders(self, orders: list[tuple[str, int, int]]) -> None:
        """At start: the warnings of the active work orders at or below the threshold, from their state (the
        alarms of the run before are gone with its process)."""
        for work_order, quantity, consumed in orders:
            if quantity - consumed <= quantity * self.quota_warning_percent // 100:
                self.units_left(work_order, quantity - consumed, quantity)

    def recheck_quota(self, orders: dict[str, tuple[str, int, int]]) -> None:
        """Clear the warnings whose work order is no longer active or has units again."""
        for cause, work_order in list(self._quota.items()):
            state, quantity, consumed = orders.get(work_order, ("gone", 0, 0))
            if state != "active":
                self._clear_quota(cause, f"the work order is {state}")
            elif quantity - consumed > quantity * self.quota_warning_percent // 100:
                self._clear_quota(cause, "units left again")
