"""Key update through the issuance core (what CMP kur hands it, docs/cmp.md "Key update"): the device's current
certificate is replaced by one for a new key, both stay in the journal and are linked, no work-order unit is
taken, the product's key policy applies, and the product decides whether the old one is revoked."""

from __future__ import annotations

import hashlib
import json

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from appliance.errors import IssuanceRefused, ReasonCode
from appliance.issuance.observe import Confirmation, Outcome
from appliance.issuance.policy import IssueRequest
from appliance.production import reconcile, store
from tests.appliance.production.conftest import Floor, ServiceMaker

SPKI = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo


def _key(curve: ec.EllipticCurve | None = None) -> bytes:
    return ec.generate_private_key(curve or ec.SECP256R1()).public_key().public_bytes(*SPKI)


def _row(floor: Floor, serial: str) -> tuple[object, ...]:
    return tuple(floor.journal.call(lambda: floor.journal.conn.execute(
        "SELECT id, state, updates, updated_by FROM issuance WHERE cert_serial=?", (serial,)).fetchone()))  # fmt: skip


async def test_key_update_replaces_the_current_certificate_and_keeps_both(
    floor: Floor, make_service: ServiceMaker
) -> None:
    floor.work_order(quantity=2)
    async with make_service(audit=floor.audit) as service:
        first = await service.issue(IssueRequest("SN-0001", b"", "st1", public_key_der=_key()))
        new_key = _key()
        update = IssueRequest("SN-0001", b"", "st1", public_key_der=new_key, replaces=first.cert_serial)
        second = await service.issue(update)
        again = await service.issue(update)  # a retry of the same update: the stored certificate
        assert again.certificate == second.certificate and again.reused
        with pytest.raises(IssuanceRefused) as err:  # the old certificate is not the current one any more
            await service.issue(
                IssueRequest("SN-0001", b"", "st1", public_key_der=_key(), replaces=first.cert_serial)
            )
        assert err.value.code is ReasonCode.NOT_AUTHORISED
        with pytest.raises(IssuanceRefused) as err:  # an update needs a new key
            await service.issue(IssueRequest("SN-0001", b"", "st1", public_key_der=new_key,
                                             replaces=second.cert_serial))  # fmt: skip
        assert err.value.code is ReasonCode.KEY_ALREADY_CERTIFIED
        with pytest.raises(
            IssuanceRefused
        ) as err:  # without `replaces` a new key is still a rework's business
            await service.issue(IssueRequest("SN-0001", b"", "st1", public_key_der=_key()))
        assert err.value.code is ReasonCode.DEVICE_ALREADY_ISSUED
    cert = x509.load_der_x509_certificate(second.certificate)
    assert cert.public_key().public_bytes(*SPKI) == new_key
    old_id, old_state, _, updated_by = _row(floor, first.cert_serial)
    new_id, _, updates, _ = _row(floor, second.cert_serial)
    assert (old_state, updated_by, updates) == ("issued", new_id, old_id)
    assert floor.consumed() == 1  # the device was counted once
    kinds = floor.journal.call(lambda: floor.journal.conn.execute(
        "SELECT kind, cert_serial FROM outbox ORDER BY id").fetchall())  # fmt: skip
    assert [tuple(k) for k in kinds] == [("cr", first.cert_serial), ("kur", second.cert_serial)]
    intents = [e for e in floor.audit.entries() if e.event == "issuance.intent"]
    assert json.loads(intents[-1].data)["items"][0]["updates"] == first.cert_serial


@pytest.mark.parametrize("revoke", [True, False])
async def test_the_product_decides_whether_confirming_the_update_revokes_the_old_certificate(
    floor: Floor, make_service: ServiceMaker, revoke: bool
) -> None:
    floor.work_order()
    store.set_product_key_update(floor.journal, floor.audit, floor.admin, "sensor", revoke)
    async with make_service(audit=floor.audit) as service:
        first = await service.issue(IssueRequest("SN-0002", b"", "st1", public_key_der=_key()))
        second = await service.issue(
            IssueRequest("SN-0002", b"", "st1", public_key_der=_key(), replaces=first.cert_serial)
        )
        reason = floor.journal.call(lambda: floor.journal.conn.execute(
            "SELECT reason FROM revocation WHERE cert_serial=?", (first.cert_serial,)).fetchone())  # fmt: skip
        assert reason is None  # not before the device confirmed it has the new one
        await service.confirm(second.cert_serial, hashlib.sha256(second.certificate).digest())
    row = floor.journal.call(lambda: floor.journal.conn.execute(
        "SELECT reason, source FROM revocation WHERE cert_serial=?", (first.cert_serial,)).fetchone())  # fmt: skip
    assert (tuple(row) if row else None) == (("superseded", "cmp") if revoke else None)
    events = [e.event for e in floor.audit.entries()]
    assert "product.key-update" in events and (("cert.revoke" in events) is revoke)


async def test_the_product_key_policy_applies_to_a_key_update(
    floor: Floor, make_service: ServiceMaker
) -> None:
    store.add_product(floor.journal, floor.audit, floor.admin, "p256-only", tenant="acme", profile=floor.profile,
                      ca="issuing", key_algorithms=["ec-p256"])  # fmt: skip
    floor.work_order(product="p256-only")
    async with make_service(audit=floor.audit) as service:
        first = await service.issue(IssueRequest("SN-0003", b"", "st1", public_key_der=_key()))
        with pytest.raises(IssuanceRefused) as err:
            await service.issue(IssueRequest("SN-0003", b"", "st1", public_key_der=_key(ec.SECP384R1()),
                                             replaces=first.cert_serial))  # fmt: skip
    assert err.value.code is ReasonCode.KEY_POLICY
    assert _row(floor, first.cert_serial)[3] is None  # refused: the old certificate is still the current one


class _Seen:
    """An IssuanceObserver that keeps what it is told."""

    def __init__(self) -> None:
        self.outcomes: list[Outcome] = []

    def answered(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)

    def signed(self, certificates: int, seconds: float) -> None:
        return None

    def confirmed(self, confirmations: list[Confirmation]) -> None:
        return None


async def test_a_key_update_counts_under_the_work_order_and_product_of_the_certificate_it_replaces(
    floor: Floor, make_service: ServiceMaker
) -> None:
    """The new certificate of a key update (CMP kur, EST simplereenroll, SCEP renewal) is the order's: the
    observer (events, metrics) is told its work order and product, and the order's export lists it after the
    certificate it replaced; no unit is taken."""
    floor.work_order(quantity=2)
    seen = _Seen()
    async with make_service(audit=floor.audit) as service:
        service.observer = seen
        first = await service.issue(IssueRequest("SN-0004", b"", "st1", public_key_der=_key()))
        update = IssueRequest("SN-0004", b"", "st1", public_key_der=_key(), replaces=first.cert_serial)
        second = await service.issue(update)
        third = await service.issue(update)  # a retry: the same certificate, the same order
        assert third.certificate == second.certificate
    assert [(o.work_order, o.product) for o in seen.outcomes] == [("WO-1", "sensor")] * 3
    exported = [c.cert_serial for c in reconcile.certificates(floor.journal, "WO-1")]
    assert exported == [first.cert_serial, second.cert_serial]
    assert floor.consumed() == 1
