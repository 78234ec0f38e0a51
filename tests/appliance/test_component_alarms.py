"""The long-lived components whose failures an operator must act on raise an alarm that is logged once, however
many passes fail, and clear it on their next success: the audit checkpointer, the CRL publisher and the OCSP
responder's signer check (the forwarder's are in cmp/test_forwarder_alarms.py). The real fault: SoftHSM's token
removed under the open session."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import pytest

from appliance.alarms import Alarms
from appliance.audit import AuditLog, ensure_audit_key
from appliance.audit.checkpointer import Checkpointer
from appliance.issuance.journal import Journal
from appliance.va.crl import CrlPublisher
from appliance.va.ocsp import OcspResponder
from hsm.softhsm import SoftHsmToken
from hsm.token import Token
from tests.real_faults import hsm_token_removed

PASSES = 5  # failed passes to see before the fault is removed


async def until(cond: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    """Wait for a condition (a deadlock guard, not a speed requirement)."""
    try:
        async with asyncio.timeout(timeout):
            while not cond():
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"timed out waiting until {what}") from None


def lines(caplog: pytest.LogCaptureFixture, cause: str) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and cause in r.getMessage()
    ]


def seen(alarms: Alarms, cause: str, n: int = PASSES) -> Callable[[], bool]:
    def check() -> bool:
        alarm = alarms.get(cause)
        return alarm is not None and alarm.count >= n

    return check


async def test_checkpointer_with_the_hsm_gone(
    journal: Journal, hsm_token: Token, softhsm_token: SoftHsmToken, caplog: pytest.LogCaptureFixture
) -> None:
    audit = AuditLog(journal)
    key = ensure_audit_key(hsm_token)
    audit.record("alice", "test.event", {"n": 1})
    alarms = Alarms()
    with caplog.at_level(logging.WARNING):
        with hsm_token_removed(softhsm_token):
            cp = Checkpointer(audit, key, every_entries=1, poll_seconds=0.01, final=False, alarms=alarms)
            async with cp:
                await until(seen(alarms, "audit.checkpoint"), "checkpoints failed repeatedly")
                alarm = alarms.get("audit.checkpoint")
                assert alarm is not None and alarm.severity == "warning" and "HSM" in alarm.advice
                assert cp.made == 0
                (line,) = lines(caplog, "audit.checkpoint")
                assert line.startswith("ALARM audit.checkpoint: audit checkpoint failed")
        async with Checkpointer(
            audit, key, every_entries=1, poll_seconds=0.01, final=False, alarms=alarms
        ) as cp:
            await until(lambda: alarms.get("audit.checkpoint") is None, "a checkpoint cleared the alarm")
            assert cp.made == 1
    assert len(lines(caplog, "audit.checkpoint")) == 2  # raised, cleared


async def test_crl_publisher_with_the_hsm_gone(
    journal: Journal, hsm_token: Token, softhsm_token: SoftHsmToken, caplog: pytest.LogCaptureFixture
) -> None:
    alarms = Alarms()
    publisher = CrlPublisher(journal, hsm_token, AuditLog(journal), poll_s=0.01, alarms=alarms)
    with caplog.at_level(logging.WARNING):
        with hsm_token_removed(softhsm_token):
            async with publisher:
                await until(seen(alarms, "va.crl"), "CRL generation failed repeatedly")
                assert publisher.current("issuing") is None
                assert len(lines(caplog, "va.crl")) == 1
            alarm = alarms.get("va.crl")
            assert alarm is not None and "issuing" in alarm.message and "nextUpdate" in alarm.advice
        async with publisher:
            await until(lambda: alarms.get("va.crl") is None, "a published CRL cleared the alarm")
            assert publisher.current("issuing") is not None
    assert len(lines(caplog, "va.crl")) == 2


async def test_ocsp_signer_check_with_the_hsm_gone(
    journal: Journal, hsm_token: Token, softhsm_token: SoftHsmToken, caplog: pytest.LogCaptureFixture
) -> None:
    alarms = Alarms()
    responder = OcspResponder(
        journal, hsm_token, AuditLog(journal), poll_s=0.01, signer_check_s=0.01, alarms=alarms
    )
    with caplog.at_level(logging.WARNING):
        async with responder:  # signers issued while the HSM is there
            with hsm_token_removed(softhsm_token):
                await until(seen(alarms, "va.ocsp-signer"), "signer checks failed repeatedly")
                assert len(lines(caplog, "va.ocsp-signer")) == 1
                assert alarms.get("va.ocsp-refresh") is None  # the journal is fine: that part goes on
            await until(lambda: alarms.get("va.ocsp-signer") is None, "a signer check cleared the alarm")
    assert len(lines(caplog, "va.ocsp-signer")) == 2
