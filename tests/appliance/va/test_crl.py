"""CRLs signed in the HSM, and the publisher that keeps them fresh."""

from __future__ import annotations

import asyncio
import time

import pytest
from cryptography import x509
from pytest_mock import MockerFixture

from appliance.va import crl as crl_mod
from appliance.va import revocation as rv
from appliance.va.crl import CrlPublisher, generate_crl, load_crl
from hsm.errors import HsmError
from tests.appliance.va.conftest import Va, audit_events


def test_crl_is_signed_by_the_issuing_ca_with_number_aki_validity_reasons(va: Va) -> None:
    rv.revoke(va.journal, va.audit, va.supervisor, device_serial="SN-0001", reason="keyCompromise",
              invalidity_date=1_700_000_000.0)  # fmt: skip
    rv.revoke(va.journal, va.audit, va.supervisor, device_serial="SN-0002", reason="unspecified")
    info = generate_crl(va.journal, va.token, va.audit, "issuing", validity_s=7200)
    crl = x509.load_der_x509_crl(info.der)
    ca_cert = va.issuing.certificate
    assert crl.is_signature_valid(ca_cert.public_key())  # type: ignore[arg-type]
    assert crl.issuer == ca_cert.subject
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 1 == info.number
    aki = crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert (
        aki.key_identifier
        == ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    )
    assert crl.next_update_utc is not None
    assert (crl.next_update_utc - crl.last_update_utc).total_seconds() == 7200
    compromised = crl.get_revoked_certificate_by_serial_number(va.cert("SN-0001").serial_number)
    assert compromised is not None
    assert (
        compromised.extensions.get_extension_for_class(x509.CRLReason).value.reason
        == x509.ReasonFlags.key_compromise
    )
    inval = compromised.extensions.get_extension_for_class(x509.InvalidityDate).value
    assert inval.invalidity_date_utc.timestamp() == 1_700_000_000
    plain = crl.get_revoked_certificate_by_serial_number(va.cert("SN-0002").serial_number)
    assert plain is not None and len(plain.extensions) == 0  # unspecified: no reasonCode (RFC 5280 5.3.1)
    assert crl.get_revoked_certificate_by_serial_number(va.cert("SN-0003").serial_number) is None
    # numbers are monotonic and persisted; each CRL is audited
    assert generate_crl(va.journal, va.token, va.audit, "issuing").number == 2
    stored = load_crl(va.journal, "issuing")
    assert stored is not None and stored.number == 2 and stored.revoked_count == 2
    assert len(audit_events(va.journal, "crl.generated")) == 2


def test_a_crl_published_meanwhile_by_another_publisher_is_not_an_error(
    va: Va, mocker: MockerFixture
) -> None:
    """The CLI revokes while the daemon's publisher runs: the daemon stores a CRL between the CLI's read and its
    store. If that CRL already lists the CLI's revocation, the CLI answers with it; if it does not (it was read
    before the revocation), the CLI signs again on top of it. Neither is an error (it was, in a flaky test)."""
    rv.revoke(va.journal, va.audit, va.supervisor, device_serial="SN-0001", reason="unspecified")
    real = crl_mod.build_crl
    calls = {"n": 0}

    def racing(*args: object, **kw: object) -> bytes:
        calls["n"] += 1
        if calls["n"] == 1:  # the other publisher wins the race with everything we read
            generate_crl(va.journal, va.token, va.audit, "issuing")
        return real(*args, **kw)  # type: ignore[arg-type]

    mocker.patch.object(crl_mod, "build_crl", side_effect=racing)
    got = generate_crl(va.journal, va.token, va.audit, "issuing")
    stored = load_crl(va.journal, "issuing")
    assert stored is not None and got == stored and got.number == 1 and got.revoked_count == 1

    # The other publisher's CRL was read before our revocation (stored after our read, listing less than we
    # read): ours is signed again on top of it, with the next number.
    rv.revoke(va.journal, va.audit, va.supervisor, device_serial="SN-0002", reason="unspecified")
    calls["n"] = 0

    def stale(*args: object, **kw: object) -> bytes:
        calls["n"] += 1
        if calls["n"] == 1:
            va.journal.call(va.journal.transaction, lambda conn: conn.execute(
                "UPDATE crl SET crl_number = crl_number + 1, revocation_seq = 0 WHERE ca='issuing'"), "a stale CRL")  # fmt: skip
        return real(*args, **kw)  # type: ignore[arg-type]

    mocker.patch.object(crl_mod, "build_crl", side_effect=stale)
    got = generate_crl(va.journal, va.token, va.audit, "issuing")
    assert calls["n"] == 2 and got.number == 3 and got.revoked_count == 2
    assert got == load_crl(va.journal, "issuing")


def test_no_crl_for_a_root_or_unknown_ca(va: Va) -> None:
    with pytest.raises(Exception, match=r"not an active issuing CA|no CA named"):
        generate_crl(va.journal, va.token, va.audit, "root")
    with pytest.raises(Exception, match="no CA named"):
        generate_crl(va.journal, va.token, va.audit, "nope")


async def test_publisher_publishes_regenerates_on_revocation_and_half_life_and_stops(va: Va) -> None:
    now = [time.time()]
    publisher = CrlPublisher(
        va.journal, va.token, va.audit, validity_s=3600, poll_s=0.05, clock=lambda: now[0]
    )
    async with publisher:
        first = publisher.current("issuing")
        assert first is not None and first.number == 1 and first.revoked_count == 0
        assert publisher.running
        assert CrlPublisher.TASK_NAME in {t.get_name() for t in asyncio.all_tasks()}
        await asyncio.sleep(0.2)
        assert publisher.current("issuing") == first  # nothing changed: not signed again
        # a revocation from "another process": seen at the next poll, without a nudge
        await asyncio.to_thread(
            rv.revoke, va.journal, va.audit, va.supervisor, device_serial="SN-0001", reason="superseded"
        )
        for _ in range(100):
            await asyncio.sleep(0.02)
            info = publisher.current("issuing")
            if info is not None and info.number == 2:
                break
        info = publisher.current("issuing")
        assert info is not None and info.number == 2 and info.revoked_count == 1
        # half-life: regenerate when half the validity has passed
        now[0] += 1801
        publisher.nudge()
        for _ in range(100):
            await asyncio.sleep(0.02)
            later = publisher.current("issuing")
            if later is not None and later.number == 3:
                break
        later = publisher.current("issuing")
        assert later is not None and later.number == 3
    assert not publisher.running
    assert CrlPublisher.TASK_NAME not in {t.get_name() for t in asyncio.all_tasks()}


async def test_publisher_survives_a_failing_hsm_and_keeps_serving_the_last_crl(
    va: Va, monkeypatch: pytest.MonkeyPatch
) -> None:
    publisher = CrlPublisher(va.journal, va.token, va.audit, poll_s=0.05)
    async with publisher:
        good = publisher.current("issuing")
        real = crl_mod.generate_crl

        def broken(*a: object, **k: object) -> crl_mod.CrlInfo:
            raise HsmError("device removed")

        monkeypatch.setattr(crl_mod, "generate_crl", broken)
        await asyncio.to_thread(
            rv.revoke, va.journal, va.audit, va.supervisor, device_serial="SN-0001", reason="superseded"
        )
        await publisher.tick()
        assert publisher.failures >= 1 and isinstance(publisher.last_error, HsmError)
        assert publisher.current("issuing") == good and publisher.running
        monkeypatch.setattr(crl_mod, "generate_crl", real)
        await publisher.tick()
        fresh = publisher.current("issuing")
        assert fresh is not None and good is not None and fresh.number == good.number + 1
