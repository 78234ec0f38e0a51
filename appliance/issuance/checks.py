"""The journal checks of one request before its intent: the device's live certificate (a retry gets it again, a
key update replaces it, anything else is refused), its RA-mode request, the key held by another device, and the
serial. Each query runs only where the batch's `Present` (conflicts.py) says the journal may hold a match."""

from __future__ import annotations

import sqlite3

from appliance.der import split_certificates
from appliance.errors import IssuancePending, IssuanceRefused, ReasonCode
from appliance.issuance.conflicts import Present
from appliance.issuance.items import IssueResult, Item
from appliance.issuance.journal import IssuanceRow, work_order_of
from appliance.issuance.policy import AuthorisationPolicy


def check_conflicts(
    conn: sqlite3.Connection, item: Item, present: Present, *, ca: str, policy: AuthorisationPolicy,
    observed: bool, retry_s: float | None,
) -> None:  # fmt: skip
    """Each query runs only where the batch's `present` says the journal may hold a match (conflicts.py)."""
    assert item.prep is not None
    req, key_hash = item.request, item.prep.public_key_sha256
    row = (
        conn.execute(
            f"SELECT {IssuanceRow.COLUMNS} FROM issuance WHERE ca=? AND device_serial=?"
            " AND state NOT IN ('burned', 'reworked') AND updated_by IS NULL",
            (ca, req.device_serial),
        ).fetchone()
        if req.device_serial in present.devices
        else None
    )
    if row is None and req.replaces is not None:
        raise IssuanceRefused(
            f"certificate {req.replaces} is not the current certificate of device {req.device_serial!r}",
            ReasonCode.NOT_AUTHORISED,
            {"cert_serial": req.replaces},
        )
    if row is not None:
        existing = IssuanceRow.from_row(row)
        if existing.state == "scrapped":
            # Never hand out a scrapped device's certificate again, not even to a retry with the same key.
            raise IssuanceRefused(
                f"device {req.device_serial!r} was scrapped (certificate {existing.cert_serial})",
                ReasonCode.DEVICE_SCRAPPED,
                {"cert_serial": existing.cert_serial},
            )
        if existing.public_key_sha256 == key_hash and existing.cert_serial != req.replaces:
            if existing.cert_der is None:
                raise IssuanceRefused("a request for this device is in progress; retry", ReasonCode.BUSY)
            if existing.station != req.station:
                policy.authorise_retry(conn, req, "issuance_id", existing.id)
            item.reuse = existing
            if observed:  # the retry counts under its certificate's work order and product
                wo = work_order_of(conn, existing.id)
                row = (
                    conn.execute("SELECT product FROM work_order WHERE id=?", (wo,)).fetchone()
                    if wo
                    else None
                )
                item.origin = (wo, str(row[0]) if row is not None else None)
            return
        if req.replaces is not None and existing.cert_serial != req.replaces:
            raise IssuanceRefused(
                f"certificate {req.replaces} is not the current certificate of device {req.device_serial!r}"
                f" (that is {existing.cert_serial})",
                ReasonCode.NOT_AUTHORISED,
                {"cert_serial": req.replaces},
            )
        if req.replaces is not None and existing.state in ("issued", "confirmed"):
            # Key update: the device's current certificate (which authenticated the request) is replaced.
            item.update = existing
        else:
            revoked = conn.execute(
                "SELECT reason FROM revocation WHERE cert_serial=?", (existing.cert_serial,)
            ).fetchone()
            now_ = f", revoked ({revoked[0]})" if revoked is not None else ""
            raise IssuanceRefused(
                f"device {req.device_serial!r} already has a certificate (serial {existing.cert_serial}{now_})"
                " for a different key; a new key needs an authorised rework (`birthline device rework"
                " SERIAL`)",
                ReasonCode.DEVICE_ALREADY_ISSUED,
                {"cert_serial": existing.cert_serial},
            )
    if req.device_serial in present.ra_devices:
        check_upstream(conn, item, ca=ca, policy=policy, retry_s=retry_s)
    if item.ra_done is not None:
        return
    other = (
        conn.execute(
            "SELECT device_serial FROM issuance WHERE public_key_sha256=? AND state!='burned'"
            " UNION ALL SELECT device_serial FROM ra_request WHERE public_key_sha256=? AND state!='failed'",
            (key_hash, key_hash),
        ).fetchone()
        if key_hash in present.keys
        else None
    )
    if other is not None:
        raise IssuanceRefused(
            "this public key is already certified for another device", ReasonCode.KEY_ALREADY_CERTIFIED
        )
    serial = item.prep.serial_hex
    if (
        serial in present.serials
        and conn.execute("SELECT 1 FROM issuance WHERE cert_serial=?", (serial,)).fetchone()
    ):
        # 2^-63 odds; refuse rather than ever reuse a serial.
        raise IssuanceRefused("certificate serial collision; retry", ReasonCode.BUSY)


def check_upstream(
    conn: sqlite3.Connection, item: Item, *, ca: str, policy: AuthorisationPolicy, retry_s: float | None
) -> None:
    """The device's RA-mode request, if it has one: the same key is answered from it (pending, the upstream's
    certificate, or the upstream's final refusal); another key is refused while it is live."""
    assert item.prep is not None
    req = item.request
    row = conn.execute(
        "SELECT id, state, public_key_sha256, cert_serial, cert_der, chain_der, failure, station FROM ra_request"
        " WHERE ca=? AND device_serial=? ORDER BY id DESC LIMIT 1",
        (ca, req.device_serial),
    ).fetchone()
    if row is None:
        return
    ra_id, state, key_hash, cert_serial, cert_der, chain_der, failure, station = row
    if key_hash == item.prep.public_key_sha256:
        if station != req.station:
            policy.authorise_retry(conn, req, "ra_request_id", ra_id)
        if state == "pending":
            raise IssuancePending(
                "the upstream CA has not issued this certificate yet", retry_s or 5.0, ra_id
            )
        if state == "failed":
            raise IssuanceRefused(
                f"the upstream CA refused this request: {failure}", ReasonCode.UPSTREAM_REJECTED,
                {"ra_request": ra_id},
            )  # fmt: skip
        item.ra_done = IssueResult(cert_der, split_certificates(chain_der or b""), cert_serial,
                                   req.device_serial, ra_id, True, upstream=True)  # fmt: skip
    elif state != "failed":
        raise IssuanceRefused(
            f"device {req.device_serial!r} already has a request at the upstream CA (RA mode) for a"
            f" different key ({state}); another key is accepted only if the upstream refuses that one",
            ReasonCode.DEVICE_ALREADY_ISSUED,
            {"ra_request": ra_id},
        )
