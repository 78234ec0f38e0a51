"""The requests the forwarder sends for outbox records (docs/cmp.md "The outbox"), built at a record's first send
and stored: p10cr with the device's CSR; cr with its key and the subject of its certificate, POP raVerified
(RFC 9483 5.2.3.2); kur with the new key, raVerified, and oldCertID naming the upstream's certificate of the
certificate it updates (RFC 9483 4.1.3, 5.2.3); rr naming the upstream's certificate of the revoked one.

A record that cannot be built as it is (a CSR or key that does not load) is parked with the reason; one whose
upstream certificate does not exist (its p10cr/cr/kur failed upstream) fails: there is nothing to update or
revoke there.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from cryptography import x509

from appliance.cmp._names import name_from_der
from appliance.cmp.build import Protector, build_message, build_messages, make_cert_request, old_cert_id
from appliance.cmp.errors import CmpError
from appliance.cmp.header import request_header
from appliance.cmp.model import (
    Body,
    BodyType,
    CertReqBody,
    CertTemplate,
    InfoTypeAndValue,
    P10crBody,
    PKIHeader,
    PKIMessage,
    RevDetails,
    RrBody,
)
from appliance.cmp.outbox import Outcome, Row
from appliance.va.revocation import Reason

Spec = tuple[PKIHeader, BodyType, Body]  # one message to build: what build_message takes before protection


def upstream_certificates(conn: sqlite3.Connection, rows: Sequence[Row]) -> dict[int, bytes]:
    """For each rr and kur row, the upstream's certificate it names (by row id), where there is one: an rr's of
    the revoked certificate, a kur's of the certificate it updates."""
    found: dict[int, bytes] = {}
    for r in rows:
        if r.kind == "rr":
            row = conn.execute(
                "SELECT upstream_cert_der FROM outbox WHERE cert_serial=? AND kind != 'rr' AND state='done'"
                " AND upstream_cert_der IS NOT NULL ORDER BY id DESC LIMIT 1", (r.cert_serial,)).fetchone()  # fmt: skip
        elif r.kind == "kur":
            row = conn.execute(
                "SELECT p.upstream_cert_der FROM issuance n JOIN outbox p ON p.issuance_id = n.updates"
                " WHERE n.id = ? AND p.kind != 'rr' AND p.state = 'done' AND p.upstream_cert_der IS NOT NULL"
                " ORDER BY p.id DESC LIMIT 1", (r.issuance_id,)).fetchone()  # fmt: skip
        else:
            continue
        if row is not None:
            found[r.id] = bytes(row[0])
    return found


def revocation_reasons(conn: sqlite3.Connection, rows: Sequence[Row]) -> dict[str, x509.ReasonFlags]:
    out: dict[str, x509.ReasonFlags] = {}
    for r in rows:
        if r.kind == "rr":
            row = conn.execute(
                "SELECT reason FROM revocation WHERE cert_serial=?", (r.cert_serial,)
            ).fetchone()
            out[r.cert_serial] = Reason(row[0]).flag if row is not None else x509.ReasonFlags.unspecified
    return out


class RequestBuilder:
    def __init__(
        self,
        protector: Protector,
        sender: x509.GeneralName,
        recipient: x509.GeneralName,
        implicit_confirm: bool,
    ) -> None:
        self.protector = protector
        self.sender = sender
        self.recipient = recipient
        self.implicit_confirm = implicit_confirm

    def build(
        self, rows: Sequence[Row], upstream: dict[int, bytes], reasons: dict[str, x509.ReasonFlags]
    ) -> dict[int, PKIMessage | Outcome]:
        """Runs in a worker thread (HSM signatures). A failure of the HSM is not the record's: it propagates.
        The messages are signed together (build_messages: one HSM call for the batch with an HSM key)."""
        out: dict[int, PKIMessage | Outcome] = {}
        specs: list[tuple[int, Spec]] = []
        for r in rows:
            try:
                one = self._one(r, upstream.get(r.id), reasons)
            except (ValueError, TypeError, AssertionError, CmpError) as exc:
                one = Outcome("park", f"cannot build the upstream request: {exc}"[:300])
            if isinstance(one, Outcome):
                out[r.id] = one
            else:
                specs.append((r.id, one))
        if not specs:
            return out
        try:
            messages = build_messages([spec for _, spec in specs], protection=self.protector)
        except (ValueError, TypeError, AssertionError, CmpError):
            # One record that cannot be encoded must not park the batch: build them one by one to find it.
            for row_id, (header, body_type, body) in specs:
                try:
                    out[row_id] = build_message(header, body_type, body, protection=self.protector)
                except (ValueError, TypeError, AssertionError, CmpError) as exc:
                    out[row_id] = Outcome("park", f"cannot build the upstream request: {exc}"[:300])
            return out
        out.update((row_id, msg) for (row_id, _), msg in zip(specs, messages, strict=True))
        return out

    def _one(self, r: Row, upstream: bytes | None, reasons: dict[str, x509.ReasonFlags]) -> Spec | Outcome:
        header = request_header(sender=self.sender, recipient=self.recipient, transaction_id=r.transaction_id,
                                implicit_confirm=self.implicit_confirm and r.kind != "rr")  # fmt: skip
        if r.kind == "p10cr":
            assert r.csr_der is not None, "the record has no CSR"
            csr = x509.load_der_x509_csr(r.csr_der)
            return header, BodyType.P10CR, P10crBody(csr)
        if r.kind in ("cr", "kur"):
            assert r.public_key_der is not None and r.subject_der is not None, (
                "the record has no key or subject"
            )
            template = CertTemplate(subject=name_from_der(r.subject_der), public_key_der=r.public_key_der)
            controls: tuple[InfoTypeAndValue, ...] = ()
            if r.kind == "kur":
                if upstream is None:
                    return Outcome("fail", "the certificate this key update replaces never reached the upstream"
                                   " CA: there is nothing to update there")  # fmt: skip
                old = x509.load_der_x509_certificate(upstream)
                controls = (old_cert_id(old.issuer, old.serial_number),)
            body = CertReqBody((make_cert_request(template, ra_verified=True, controls=controls),))
            body_type = BodyType.KUR if r.kind == "kur" else BodyType.CR
            return header, body_type, body
        if upstream is None:
            return Outcome("fail", "no upstream certificate for this device: nothing to revoke")
        cert = x509.load_der_x509_certificate(upstream)
        details = RevDetails(cert.issuer, cert.serial_number, reasons.get(r.cert_serial))
        return header, BodyType.RR, RrBody((details,))
