"""The periodic Checkpointer: when it signs, and that it shuts down cleanly (exit, cancellation, failures)."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from appliance.alarms import Alarms
from appliance.audit import AuditError, AuditLog, Checkpointer, verify
from appliance.audit.checkpointer import ALARM_CAUSE
from appliance.issuance.journal import Journal
from hsm.keys import HsmEcPrivateKey


async def _until(cond: object, timeout: float = 30.0) -> None:  # a deadlock guard, not a timing claim
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def _tasks() -> set[str]:
    return {t.get_name() for t in asyncio.all_tasks()}


async def test_signs_every_n_entries(audit: AuditLog, audit_key: HsmEcPrivateKey, journal: Journal) -> None:
    async with Checkpointer(audit, audit_key, every_entries=5, every_seconds=3600, poll_seconds=0.01) as cp:
        assert cp.running and Checkpointer.TASK_NAME in _tasks()
        for i in range(3):
            await audit.arecord("operator:alice", "test.event", {"i": i})
        await asyncio.sleep(0.1)
        assert cp.made == 0  # 3 < 5 and not old enough
        for i in range(3, 6):
            await audit.arecord("operator:alice", "test.event", {"i": i})
        await _until(lambda: cp.made >= 1)
        assert cp.last is not None and cp.last.seq >= 6
    report = verify(journal, public_key=audit_key.public_key())
    assert report.ok and report.last_good_checkpoint == report.head[0]


async def test_signs_a_lone_entry_after_every_seconds(audit: AuditLog, audit_key: HsmEcPrivateKey) -> None:
    async with Checkpointer(
        audit, audit_key, every_entries=10**6, every_seconds=0.05, poll_seconds=0.01
    ) as cp:
        await asyncio.sleep(0.1)
        assert cp.made == 0  # nothing new: nothing to sign
        await audit.arecord("operator:alice", "auth.login", {})
        await _until(lambda: cp.made == 1)
        assert cp.last is not None and cp.last.seq == audit.head()[0]


async def test_shutdown_signs_the_tail_promptly_and_leaves_no_task(
    audit: AuditLog, audit_key: HsmEcPrivateKey, journal: Journal
) -> None:
    cp = Checkpointer(audit, audit_key, every_entries=10**6, every_seconds=3600, poll_seconds=60)
    async with cp:
        for i in range(4):
            await audit.arecord("station:line-1", "test.event", {"i": i})
        started = time.monotonic()
    assert time.monotonic() - started < 50  # woken, not waiting out the 60 s poll (a deadlock guard)
    assert not cp.running and Checkpointer.TASK_NAME not in _tasks()
    # 4 entries, the key registered (5), the final claim (6)
    assert cp.made == 1 and cp.last is not None and cp.last.seq == audit.head()[0] == 6
    assert verify(journal, public_key=audit_key.public_key()).intact


async def test_shutdown_without_final_checkpoint(audit: AuditLog, audit_key: HsmEcPrivateKey) -> None:
    async with Checkpointer(audit, audit_key, poll_seconds=60, final=False) as cp:
        await audit.arecord("station:line-1", "test.event", {})
    assert cp.made == 0 and audit.last_checkpoint() is None and not cp.running


async def test_cancelling_the_owner_stops_the_task(audit: AuditLog, audit_key: HsmEcPrivateKey) -> None:
    entered = asyncio.Event()
    holder: list[Checkpointer] = []

    async def owner() -> None:
        async with Checkpointer(audit, audit_key, poll_seconds=0.01) as cp:
            holder.append(cp)
            entered.set()
            await asyncio.sleep(3600)

    task = asyncio.create_task(owner())
    await entered.wait()
    await audit.arecord("station:line-1", "test.event", {})
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not holder[0].running and Checkpointer.TASK_NAME not in _tasks()


async def test_a_failing_checkpoint_is_retried_and_does_not_break_shutdown(
    audit: AuditLog, audit_key: HsmEcPrivateKey
) -> None:
    await audit.acheckpoint(audit_key)  # the HSM audit key is recorded (1), claim 2
    impostor = ec.generate_private_key(ec.SECP256R1())  # not the recorded key: every checkpoint is refused
    alarms = Alarms()
    async with Checkpointer(audit, impostor, every_entries=1, poll_seconds=0.01, alarms=alarms) as cp:
        await audit.arecord("station:line-1", "test.event", {})
        await _until(lambda: cp.failures >= 2)
        assert cp.running and isinstance(cp.last_error, AuditError)
        alarm = alarms.get(ALARM_CAUSE)
        assert alarm is not None and alarm.count >= 2 and "not the audit key" in alarm.message
    assert cp.made == 0 and not cp.running  # the final attempt failed too, and exit still completed
    last = audit.last_checkpoint()
    assert last is not None and last.seq == 2
    # the right key again: the next checkpointer signs at once on entry, and the alarm clears
    async with Checkpointer(audit, audit_key, poll_seconds=60, alarms=alarms) as cp:
        assert cp.made == 1 and alarms.get(ALARM_CAUSE) is None
    assert verify(audit.journal).intact


def test_rejects_nonsense_intervals(audit: AuditLog, audit_key: HsmEcPrivateKey) -> None:
    for bad in (
        {"every_entries": 0},
        {"every_seconds": 0},
        {"every_seconds": float("nan")},
        {"poll_seconds": 0},
    ):
        with pytest.raises(ValueError):
            Checkpointer(audit, audit_key, **bad)  # type: ignore[arg-type]


async def test_an_append_reaching_every_entries_wakes_it_without_waiting_for_the_poll(
    audit: AuditLog, audit_key: HsmEcPrivateKey
) -> None:
    async with Checkpointer(audit, audit_key, every_entries=5, every_seconds=3600, poll_seconds=3600) as cp:
        for i in range(4):
            await audit.arecord("station:line-1", "test.event", {"i": i})
        await asyncio.sleep(0.05)
        assert cp.made == 0
        await audit.arecord("station:line-1", "test.event", {"i": 4})  # the fifth unsigned entry
        await _until(lambda: cp.made == 1, timeout=60)  # a deadlock guard: the poll is an hour away
        assert (
            cp.last is not None
            and json.loads(audit.entries(start=cp.last.seq)[0].data)["reason"] == "interval"
        )


async def test_entering_signs_what_an_earlier_run_left_unsigned(
    audit: AuditLog, audit_key: HsmEcPrivateKey, journal: Journal
) -> None:
    """A crash (or commands run while the daemon was stopped) left entries unsigned: signed before anything else."""
    await audit.acheckpoint(audit_key)
    for i in range(3):
        await audit.arecord("operator:alice", "test.event", {"i": i})
    assert verify(journal).status == "unsigned-tail"
    async with Checkpointer(audit, audit_key, every_seconds=3600, poll_seconds=3600, final=False) as cp:
        assert cp.made == 1 and cp.last is not None and cp.last.seq == 6
        assert json.loads(audit.entries(start=6)[0].data)["reason"] == "start"
        assert verify(journal).intact
    async with Checkpointer(audit, audit_key, poll_seconds=3600, final=False) as cp:
        assert cp.made == 0  # nothing unsigned: nothing to do


async def test_the_claims_state_the_checkpointers_policy(audit: AuditLog, audit_key: HsmEcPrivateKey) -> None:
    async with Checkpointer(audit, audit_key, every_entries=50, every_seconds=20, poll_seconds=60):
        await audit.arecord("operator:alice", "test.event", {})
    policy = json.loads(audit.entries(start=audit.head()[0])[0].data)["policy"]
    assert policy == {
        "every_entries": 50,
        "every_s": 20.0,
        "max_unsigned_entries": 100,
        "max_unsigned_s": 40.0,
    }
