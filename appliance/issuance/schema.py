"""The journal's schema: every table, index and trigger (SCHEMA), its version, and the migrations that bring a
journal of an earlier version up to it (migrate). The journal (journal.py) runs migrate, then SCHEMA, each time it
opens a journal for writing.

Much of the appliance's integrity lives here rather than in Python: the one-live-certificate-per-device and
public-key rules, the work-order unit bound to each intent and given back by a burn, the counters of the outbox
and RA request queues, the audit log's refusal of updates and deletes, and the revocations that a scrap or
rework starts.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

from appliance.errors import IssuanceFailed, ReasonCode

SCHEMA_VERSION = 6

# The outbox (appliance/cmp/forwarder.py, docs/cmp.md "The forwarder"): one row per record to send to the
# upstream CA. 'failed': the upstream refused the request for good; 'parked': the request could not be built or
# was refused as a message (malformed, wrong key identifier), so it is set aside with its reason and the rest go.
OUTBOX_TABLE = """
CREATE TABLE IF NOT EXISTS outbox (
    id                INTEGER PRIMARY KEY,
    kind              TEXT NOT NULL CHECK (kind IN ('p10cr', 'cr', 'kur', 'rr')),
    issuance_id       INTEGER REFERENCES issuance (id),
    cert_serial       TEXT NOT NULL,                          -- the local certificate
    transaction_id    BLOB NOT NULL,                          -- 16 random bytes, fixed at creation; no index
    csr_der           BLOB,                                   -- p10cr: the device's CSR, as received
    public_key_der    BLOB,                                   -- cr, kur: SubjectPublicKeyInfo
    subject_der       BLOB,                                   -- cr, kur: the subject (the local certificate's)
    request_der       BLOB,                                   -- the exact bytes sent, from the first send on
    state             TEXT NOT NULL DEFAULT 'queued'
        CHECK (state IN ('queued', 'sent', 'waiting', 'done', 'failed', 'parked')),
    attempts          INTEGER NOT NULL DEFAULT 0,
    next_attempt_at   REAL NOT NULL,
    last_error        TEXT,
    last_response_der BLOB,                                   -- 'waiting': the answer a pollReq follows up
    upstream_cert_der BLOB,                                   -- the upstream CA's certificate for the device
    created_at        REAL NOT NULL,
    done_at           REAL,
    ra_request_id     INTEGER REFERENCES ra_request (id)       -- RA mode: the request this row carries
);
"""

RA_REQUEST_TABLE = """
CREATE TABLE IF NOT EXISTS ra_request (
    id                INTEGER PRIMARY KEY,
    request_id        TEXT NOT NULL,
    station           TEXT NOT NULL,
    profile           TEXT NOT NULL,
    ca                TEXT NOT NULL,                          -- the work orders' CA name (authorisation scope)
    device_serial     TEXT NOT NULL,
    public_key_sha256 BLOB NOT NULL,
    csr_sha256        BLOB,
    state             TEXT NOT NULL CHECK (state IN ('pending', 'issued', 'confirmed', 'failed')),
    cert_serial       TEXT,                                   -- hex, the upstream certificate's
    cert_der          BLOB,
    chain_der         BLOB,                                   -- the issuers, nearest first, each DER, concatenated
    failure           TEXT,
    created_at        REAL NOT NULL,
    issued_at         REAL,
    confirmed_at      REAL,
    CHECK ((state IN ('issued', 'confirmed')) = (cert_der IS NOT NULL))
);
"""

# SCEP challenge passwords (appliance/scep/challenges.py, docs/scep.md): made by a supervisor for one device or
# for the devices of one work order, on one SCEP label; only the SHA-256 of the password is kept. A device
# challenge is bound at its first use to the public key that used it. A table of its own, created on every open
# (CREATE TABLE IF NOT EXISTS): nothing else refers to it, so no schema version is needed for it.
SCEP_CHALLENGE_TABLE = """
CREATE TABLE IF NOT EXISTS scep_challenge (
    id              INTEGER PRIMARY KEY,
    label           TEXT NOT NULL,
    secret_sha256   BLOB NOT NULL UNIQUE,
    device_serial   TEXT,                   -- for this device only (one-time)
    work_order      TEXT,                   -- within this work order only
    created_by      TEXT NOT NULL,
    created_at      REAL NOT NULL,
    expires_at      REAL NOT NULL,
    revoked_by      TEXT,
    revoked_at      REAL,
    used_key_sha256 BLOB,                   -- a device challenge: the key of its first use, the only one it serves
    first_used_at   REAL,
    last_used_at    REAL,
    uses            INTEGER NOT NULL DEFAULT 0,
    CHECK (device_serial IS NOT NULL OR work_order IS NOT NULL)
);
"""

# How many rows the outbox holds per (kind, state), and ra_request per state, kept by triggers in the
# transaction that changes them: `birthline upstream status` prints these depths, and counting them with
# GROUP BY read every row ever queued (one per certificate, for ever: 251 s with ten million; performance.md
# "Ten years of journal"). A trigger's cost is one small row update, on a page every batch already has dirty.
OUTBOX_COUNT_TABLE = """CREATE TABLE IF NOT EXISTS outbox_count (
    kind  TEXT NOT NULL,
    state TEXT NOT NULL,
    n     INTEGER NOT NULL,
    PRIMARY KEY (kind, state)
) WITHOUT ROWID"""
RA_REQUEST_COUNT_TABLE = """CREATE TABLE IF NOT EXISTS ra_request_count (
    state TEXT NOT NULL PRIMARY KEY,
    n     INTEGER NOT NULL
) WITHOUT ROWID"""
COUNT_TRIGGERS = """
CREATE TRIGGER IF NOT EXISTS outbox_count_insert AFTER INSERT ON outbox
    BEGIN
        INSERT INTO outbox_count (kind, state, n) VALUES (NEW.kind, NEW.state, 1)
            ON CONFLICT (kind, state) DO UPDATE SET n = n + 1;
    END;
CREATE TRIGGER IF NOT EXISTS outbox_count_update AFTER UPDATE OF kind, state ON outbox
    WHEN OLD.kind != NEW.kind OR OLD.state != NEW.state
    BEGIN
        UPDATE outbox_count SET n = n - 1 WHERE kind = OLD.kind AND state = OLD.state;
        INSERT INTO outbox_count (kind, state, n) VALUES (NEW.kind, NEW.state, 1)
            ON CONFLICT (kind, state) DO UPDATE SET n = n + 1;
    END;
CREATE TRIGGER IF NOT EXISTS outbox_count_delete AFTER DELETE ON outbox
    BEGIN
        UPDATE outbox_count SET n = n - 1 WHERE kind = OLD.kind AND state = OLD.state;
    END;
CREATE TRIGGER IF NOT EXISTS ra_request_count_insert AFTER INSERT ON ra_request
    BEGIN
        INSERT INTO ra_request_count (state, n) VALUES (NEW.state, 1) ON CONFLICT (state) DO UPDATE SET n = n + 1;
    END;
CREATE TRIGGER IF NOT EXISTS ra_request_count_update AFTER UPDATE OF state ON ra_request
    WHEN OLD.state != NEW.state
    BEGIN
        UPDATE ra_request_count SET n = n - 1 WHERE state = OLD.state;
        INSERT INTO ra_request_count (state, n) VALUES (NEW.state, 1) ON CONFLICT (state) DO UPDATE SET n = n + 1;
    END;
CREATE TRIGGER IF NOT EXISTS ra_request_count_delete AFTER DELETE ON ra_request
    BEGIN
        UPDATE ra_request_count SET n = n - 1 WHERE state = OLD.state;
    END;
"""

# The public-key rule of `issuance` (see SCHEMA): created by SCHEMA, and by the 4 -> 5 migration in the
# transaction that drops the index it replaces, so that no writer ever sees the journal without it.
KEY_RULE_STATEMENTS = (
    "CREATE INDEX IF NOT EXISTS issuance_key ON issuance (public_key_sha256)",
    """CREATE TRIGGER IF NOT EXISTS issuance_key_once BEFORE INSERT ON issuance
    WHEN NEW.state != 'burned' AND EXISTS (
        SELECT 1 FROM issuance WHERE public_key_sha256 = NEW.public_key_sha256 AND state != 'burned')
    BEGIN SELECT RAISE(ABORT, 'UNIQUE constraint failed: issuance public_key_sha256 (a live row has this key)'); END""",
    """CREATE TRIGGER IF NOT EXISTS issuance_key_fixed BEFORE UPDATE OF public_key_sha256 ON issuance
    WHEN NEW.public_key_sha256 IS NOT OLD.public_key_sha256
    BEGIN SELECT RAISE(ABORT, 'the public key of an issuance row never changes'); END""",
    """CREATE TRIGGER IF NOT EXISTS issuance_burned_stays BEFORE UPDATE OF state ON issuance
    WHEN OLD.state = 'burned' AND NEW.state != 'burned'
    BEGIN SELECT RAISE(ABORT, 'a burned issuance row stays burned'); END""",
)
KEY_RULE = "".join(f"{statement};\n" for statement in KEY_RULE_STATEMENTS)

SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS ca (
    name          TEXT PRIMARY KEY,
    role          TEXT NOT NULL CHECK (role IN ('root', 'issuing', 'management')),
    key_label     TEXT NOT NULL UNIQUE,
    key_algorithm TEXT NOT NULL,
    parent        TEXT,
    state         TEXT NOT NULL CHECK (state IN ('awaiting-certificate', 'active')),
    subject       TEXT NOT NULL,
    csr_der       BLOB,
    cert_der      BLOB,
    chain_pem     BLOB,            -- PEM certificates above this CA, nearest first
    created_at    REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS issuance (
    id                INTEGER PRIMARY KEY,
    request_id        TEXT NOT NULL,
    station           TEXT NOT NULL,
    profile           TEXT NOT NULL,
    ca                TEXT NOT NULL,
    device_serial     TEXT NOT NULL,
    public_key_sha256 BLOB NOT NULL,
    csr_sha256        BLOB NOT NULL,
    cert_serial       TEXT NOT NULL UNIQUE,   -- hex; burned rows keep theirs so it is never reused
    tbs_sha256        BLOB NOT NULL,
    state             TEXT NOT NULL
        CHECK (state IN ('intent', 'issued', 'confirmed', 'burned', 'reworked', 'scrapped')),
    cert_der          BLOB,
    burn_reason       TEXT,
    created_at        REAL NOT NULL,
    issued_at         REAL,
    confirmed_at      REAL,
    updates           INTEGER,                -- key update (CMP kur): the row of the certificate this one updates
    updated_by        INTEGER,                -- the row of the certificate that updated this one (then not live)
    CHECK ((state IN ('issued', 'confirmed', 'reworked', 'scrapped')) = (cert_der IS NOT NULL))
);
-- A reworked row gives way to the device's next issuance, an updated one to its key update; a scrapped one keeps
-- its device serial taken.
CREATE UNIQUE INDEX IF NOT EXISTS issuance_live_device
    ON issuance (ca, device_serial) WHERE state NOT IN ('burned', 'reworked') AND updated_by IS NULL;
CREATE INDEX IF NOT EXISTS issuance_updates ON issuance (updates) WHERE updates IS NOT NULL;
-- A device key is certified once: no two rows that are not burned share a public key (a burned intent's signature
-- was never released, so its key may come back). A plain index on the key and triggers, not a UNIQUE index
-- partial on state != 'burned': SQLite rewrites a partial index's entry whenever a column of its WHERE changes, so
-- each certificate's intent, issued and confirmed steps each wrote a random page of ten years of keys to the WAL
-- (docs/performance.md "Ten years of journal"). The rule holds as the index held it: an insert of a live row is
-- checked; a row's key never changes; a burned row never becomes live again. Schema 4 -> 5 creates them (KEY_RULE).
"""
    + KEY_RULE
    + """
CREATE INDEX IF NOT EXISTS issuance_request ON issuance (station, request_id);
-- `revoke --device` looks a device up under every CA and in every state: without this, a scan of ten years.
CREATE INDEX IF NOT EXISTS issuance_by_device ON issuance (device_serial);
-- Every start of the issuance core burns the intents a crash left and reads the time of the last issuance (its
-- clock check, also the status document's): without these, two reads of every row, seconds on ten years.
-- Intents live for one batch, so issuance_intent holds a handful of rows; created_at grows with the row id, so
-- issuance_created is appended at its end.
CREATE INDEX IF NOT EXISTS issuance_intent ON issuance (state) WHERE state = 'intent';
CREATE INDEX IF NOT EXISTS issuance_created ON issuance (created_at);
CREATE TABLE IF NOT EXISTS stations (
    name            TEXT PRIMARY KEY,
    kind            TEXT NOT NULL CHECK (kind IN ('serial', 'lan')),
    port            TEXT,                   -- serial: the device path the station is bound to
    baud            INTEGER,
    key             BLOB NOT NULL CHECK (length(key) = 32),   -- the station secret: never logged
    enabled         INTEGER NOT NULL DEFAULT 1,
    tls_cert_der    BLOB,                   -- LAN: the station's current TLS client certificate
    tls_fingerprint BLOB,                   -- LAN: SHA-256 of tls_cert_der
    created_at      REAL NOT NULL,
    rotated_at      REAL,
    line            TEXT                    -- the production line (appliance/production); NULL: none
);
-- A station request id answered from an earlier issuance (same device and key, new request id), so that its
-- CONFIRM finds the certificate.
CREATE TABLE IF NOT EXISTS station_request (
    station     TEXT NOT NULL,
    request_id  TEXT NOT NULL,
    cert_serial TEXT NOT NULL,
    PRIMARY KEY (station, request_id)
);
CREATE UNIQUE INDEX IF NOT EXISTS stations_serial_port ON stations (port) WHERE kind = 'serial';
-- Stations an operator paused from the control API (appliance/issuance/pauses.py): refused STATION_PAUSED
-- until resumed; kept across restarts.
CREATE TABLE IF NOT EXISTS station_pause (
    station    TEXT PRIMARY KEY,
    paused_by  TEXT NOT NULL,
    reason     TEXT NOT NULL,
    paused_at  REAL NOT NULL
);
-- The tamper-evident audit log (appliance/audit, docs/audit.md): a hash chain with checkpoints signed in the HSM.
CREATE TABLE IF NOT EXISTS audit (
    seq       INTEGER PRIMARY KEY,                             -- 1, 2, 3, ... with no gaps
    time      REAL NOT NULL,
    actor     TEXT NOT NULL,
    event     TEXT NOT NULL,
    data      TEXT NOT NULL,                                   -- canonical JSON
    prev_hash BLOB NOT NULL CHECK (length(prev_hash) = 32),
    hash      BLOB NOT NULL CHECK (length(hash) = 32)
);
CREATE TABLE IF NOT EXISTS audit_checkpoint (
    seq       INTEGER PRIMARY KEY,                             -- the claim (audit entry) this signature signs
    head_hash BLOB NOT NULL CHECK (length(head_hash) = 32),
    time      REAL NOT NULL,
    key_label TEXT NOT NULL,
    signature BLOB NOT NULL
);
-- The checkpoint claims (audit.checkpoint entries): finding the last one stays O(log n) as the log grows, and
-- costs nothing for other entries. appliance/audit/log.py queries it with this exact WHERE.
CREATE INDEX IF NOT EXISTS audit_claims ON audit (seq) WHERE event = 'audit.checkpoint';
CREATE TABLE IF NOT EXISTS audit_key (
    label      TEXT PRIMARY KEY,
    public_key BLOB NOT NULL,                                  -- SubjectPublicKeyInfo DER
    created_at REAL NOT NULL
);
-- Append-only against mistakes in our own code (an attacker with the file can drop these; the chain catches that).
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
-- Production control (appliance/production, docs/production.md): tenants, products, lines, work orders with
-- quotas and allowlists, rework and scrap, and the people allowed to change them.
CREATE TABLE IF NOT EXISTS tenant (
    name         TEXT PRIMARY KEY,
    display_name TEXT NOT NULL,
    created_at   REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS product (
    name           TEXT PRIMARY KEY,
    tenant         TEXT NOT NULL REFERENCES tenant (name),
    profile        TEXT NOT NULL,
    ca             TEXT NOT NULL,
    key_algorithms TEXT NOT NULL,                             -- comma-separated, a subset of the profile's
    created_at     REAL NOT NULL,
    -- local: the appliance's issuing CA signs at once; upstream: RA mode, the upstream CA issues (docs/cmp.md)
    issuance_mode  TEXT NOT NULL DEFAULT 'local' CHECK (issuance_mode IN ('local', 'upstream')),
    -- a key update (CMP kur) revokes the certificate it replaces (reason superseded) once the new one is confirmed
    revoke_on_update INTEGER NOT NULL DEFAULT 0 CHECK (revoke_on_update IN (0, 1))
);
CREATE TABLE IF NOT EXISTS production_line (
    name        TEXT PRIMARY KEY,
    description TEXT NOT NULL DEFAULT '',
    created_at  REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS work_order (
    id           TEXT PRIMARY KEY,
    product      TEXT NOT NULL REFERENCES product (name),
    quantity     INTEGER NOT NULL CHECK (quantity > 0),
    consumed     INTEGER NOT NULL DEFAULT 0,                  -- units taken: see work_order_unit
    pattern      TEXT,                                        -- anchored, checked safe (production/allowlist.py)
    valid_from   REAL,
    valid_to     REAL,
    state        TEXT NOT NULL CHECK (state IN ('draft', 'active', 'closed')),
    created_at   REAL NOT NULL,
    activated_at REAL,
    closed_at    REAL,
    CHECK (consumed >= 0 AND consumed <= quantity)
);
CREATE TABLE IF NOT EXISTS work_order_line (
    work_order TEXT NOT NULL REFERENCES work_order (id),
    line       TEXT NOT NULL REFERENCES production_line (name),
    PRIMARY KEY (work_order, line)
);
CREATE INDEX IF NOT EXISTS work_order_line_by_line ON work_order_line (line);
CREATE TABLE IF NOT EXISTS work_order_serial (
    work_order TEXT NOT NULL REFERENCES work_order (id),
    serial     TEXT NOT NULL,
    PRIMARY KEY (work_order, serial)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS work_order_range (
    work_order TEXT NOT NULL REFERENCES work_order (id),
    prefix     TEXT NOT NULL,
    first      INTEGER NOT NULL,
    last       INTEGER NOT NULL,
    width      INTEGER NOT NULL,
    CHECK (0 <= first AND first <= last)
);
CREATE INDEX IF NOT EXISTS work_order_range_wo ON work_order_range (work_order);
-- One row per issuance the work-order policy authorised, written in the intent's own transaction. A 'new' unit
-- takes one unit of work_order.consumed; a 'rework' unit (a supervisor's rework grant) takes none. issuance_id
-- is bound by the trigger below when the core inserts the intent; released = 1 once that intent is burned.
CREATE TABLE IF NOT EXISTS work_order_unit (
    id            INTEGER PRIMARY KEY,
    work_order    TEXT NOT NULL REFERENCES work_order (id),
    device_serial TEXT NOT NULL,
    kind          TEXT NOT NULL CHECK (kind IN ('new', 'rework')),
    rework_id     INTEGER,
    issuance_id   INTEGER UNIQUE,
    released      INTEGER NOT NULL DEFAULT 0,
    created_at    REAL NOT NULL,
    ra_request_id INTEGER                                     -- RA mode: bound to ra_request instead
);
CREATE UNIQUE INDEX IF NOT EXISTS work_order_unit_ra ON work_order_unit (ra_request_id)
    WHERE ra_request_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS work_order_unit_wo ON work_order_unit (work_order);
CREATE INDEX IF NOT EXISTS work_order_unit_unbound ON work_order_unit (device_serial) WHERE issuance_id IS NULL;
CREATE TABLE IF NOT EXISTS rework (
    id            INTEGER PRIMARY KEY,
    ca            TEXT NOT NULL,
    device_serial TEXT NOT NULL,
    old_issuance  INTEGER NOT NULL UNIQUE,
    work_order    TEXT NOT NULL,
    authorised_by TEXT NOT NULL,
    reason        TEXT NOT NULL,
    created_at    REAL NOT NULL,
    used          INTEGER NOT NULL DEFAULT 0                  -- 1 while a live issuance uses this grant
);
CREATE UNIQUE INDEX IF NOT EXISTS rework_open ON rework (ca, device_serial) WHERE used = 0;
CREATE TABLE IF NOT EXISTS scrap (
    issuance_id   INTEGER PRIMARY KEY,
    device_serial TEXT NOT NULL,
    cert_serial   TEXT NOT NULL,
    work_order    TEXT,
    authorised_by TEXT NOT NULL,
    reason        TEXT NOT NULL,
    created_at    REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS users (
    name          TEXT PRIMARY KEY,
    role          TEXT NOT NULL CHECK (role IN ('operator', 'supervisor', 'administrator', 'auditor')),
    password_hash TEXT NOT NULL,                              -- scrypt$n$r$p$salt$hash (production/users.py)
    enabled       INTEGER NOT NULL DEFAULT 1,
    failed_logins INTEGER NOT NULL DEFAULT 0,
    locked_until  REAL,
    created_at    REAL NOT NULL,
    changed_at    REAL NOT NULL
);
-- The policy inserts its unit just before the core inserts the intent, in the same SAVEPOINT: bind them.
CREATE TRIGGER IF NOT EXISTS work_order_unit_bind AFTER INSERT ON issuance
    BEGIN
        UPDATE work_order_unit SET issuance_id = NEW.id
            WHERE issuance_id IS NULL AND ra_request_id IS NULL AND device_serial = NEW.device_serial;
    END;
-- A burned intent (crash recovery, HSM or store failure) never released a certificate: give its quota unit
-- or rework grant back in the same transaction as the burn, so consumed always equals the live units.
CREATE TRIGGER IF NOT EXISTS work_order_unit_release AFTER UPDATE OF state ON issuance
    WHEN OLD.state = 'intent' AND NEW.state = 'burned'
    BEGIN
        UPDATE work_order SET consumed = consumed - 1
            WHERE id = (SELECT work_order FROM work_order_unit
                        WHERE issuance_id = NEW.id AND kind = 'new' AND released = 0);
        UPDATE rework SET used = 0
            WHERE id = (SELECT rework_id FROM work_order_unit
                        WHERE issuance_id = NEW.id AND kind = 'rework' AND released = 0);
        UPDATE work_order_unit SET released = 1 WHERE issuance_id = NEW.id;
    END;
-- A burned key-update intent never released a certificate: the certificate it was to replace is live again.
CREATE TRIGGER IF NOT EXISTS issuance_update_release AFTER UPDATE OF state ON issuance
    WHEN OLD.state = 'intent' AND NEW.state = 'burned' AND NEW.updates IS NOT NULL
    BEGIN
        UPDATE issuance SET updated_by = NULL WHERE id = NEW.updates AND updated_by = NEW.id;
    END;
-- Revocation and validation (appliance/va, docs/revocation.md): one row per revoked certificate, never deleted.
-- change_seq orders every insert and reason change, so the CRL publisher and the OCSP cache see what changed.
CREATE TABLE IF NOT EXISTS revocation (
    cert_serial       TEXT PRIMARY KEY REFERENCES issuance (cert_serial),
    ca                TEXT NOT NULL,
    reason            TEXT NOT NULL CHECK (reason IN ('unspecified', 'keyCompromise', 'cACompromise',
                          'affiliationChanged', 'superseded', 'cessationOfOperation', 'privilegeWithdrawn')),
    revoked_at        REAL NOT NULL,                          -- revocationDate
    invalidity_date   REAL,                                   -- RFC 5280 5.3.2; NULL: not known
    actor             TEXT NOT NULL,
    source            TEXT NOT NULL CHECK (source IN ('cli', 'scrap', 'rework', 'cmp', 'upstream')),
    forwarded_at      REAL,                                   -- the CMP forwarder's seam: NULL until sent as rr
    reason_changed_at REAL,                                   -- set when the reason was raised to keyCompromise
    change_seq        INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS revocation_by_ca ON revocation (ca, change_seq);
CREATE INDEX IF NOT EXISTS revocation_by_seq ON revocation (change_seq);
CREATE INDEX IF NOT EXISTS revocation_unforwarded ON revocation (revoked_at) WHERE forwarded_at IS NULL;
CREATE TRIGGER IF NOT EXISTS revocation_seq_insert AFTER INSERT ON revocation
    BEGIN
        UPDATE revocation SET change_seq = (SELECT COALESCE(MAX(change_seq), 0) + 1 FROM revocation)
            WHERE cert_serial = NEW.cert_serial;
    END;
CREATE TRIGGER IF NOT EXISTS revocation_seq_update AFTER UPDATE OF reason, invalidity_date ON revocation
    BEGIN
        UPDATE revocation SET change_seq = (SELECT COALESCE(MAX(change_seq), 0) + 1 FROM revocation)
            WHERE cert_serial = NEW.cert_serial;
    END;
-- Scrap and rework revoke in their own transaction (their audit entries name the supervisor and the serial).
CREATE TRIGGER IF NOT EXISTS revocation_on_scrap AFTER INSERT ON scrap
    BEGIN
        INSERT OR IGNORE INTO revocation (cert_serial, ca, reason, revoked_at, actor, source)
            SELECT NEW.cert_serial, ca, 'cessationOfOperation', NEW.created_at, NEW.authorised_by, 'scrap'
            FROM issuance WHERE id = NEW.issuance_id;
    END;
CREATE TRIGGER IF NOT EXISTS revocation_on_rework AFTER INSERT ON rework
    BEGIN
        INSERT OR IGNORE INTO revocation (cert_serial, ca, reason, revoked_at, actor, source)
            SELECT cert_serial, ca, 'superseded', NEW.created_at, NEW.authorised_by, 'rework'
            FROM issuance WHERE id = NEW.old_issuance;
    END;
-- Scraps and reworks recorded before revocation existed (idempotent: runs at every open).
INSERT OR IGNORE INTO revocation (cert_serial, ca, reason, revoked_at, actor, source)
    SELECT s.cert_serial, i.ca, 'cessationOfOperation', s.created_at, s.authorised_by, 'scrap'
    FROM scrap s JOIN issuance i ON i.id = s.issuance_id;
INSERT OR IGNORE INTO revocation (cert_serial, ca, reason, revoked_at, actor, source)
    SELECT i.cert_serial, i.ca, 'superseded', r.created_at, r.authorised_by, 'rework'
    FROM rework r JOIN issuance i ON i.id = r.old_issuance;
-- The latest CRL per issuing CA, signed in the HSM; served from here, never signed on the request path.
CREATE TABLE IF NOT EXISTS crl (
    ca             TEXT PRIMARY KEY,
    crl_number     INTEGER NOT NULL CHECK (crl_number > 0),   -- monotonic per CA (RFC 5280 5.2.3)
    this_update    REAL NOT NULL,
    next_update    REAL NOT NULL,
    revoked_count  INTEGER NOT NULL,
    revocation_seq INTEGER NOT NULL,                          -- MAX(revocation.change_seq) of the CA it lists
    der            BLOB NOT NULL
);
-- Delegated OCSP signing certificates (id-kp-OCSPSigning, ocsp-nocheck), each with its own HSM key.
CREATE TABLE IF NOT EXISTS ocsp_signer (
    cert_serial TEXT PRIMARY KEY,
    ca          TEXT NOT NULL,
    key_label   TEXT NOT NULL UNIQUE,
    cert_der    BLOB NOT NULL,
    not_before  REAL NOT NULL,
    not_after   REAL NOT NULL,
    created_at  REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS ocsp_signer_by_ca ON ocsp_signer (ca, not_after);
-- The upstream outbox (appliance/cmp/forwarder.py, docs/cmp.md "The forwarder"): one row per record to send to
-- the upstream CA. Issuances write theirs in the transaction that marks them 'issued'; revocations get theirs
-- from the trigger below, in the revocation's own transaction. request_der is built (and RA-protected) at the
-- first send, then kept: every retry sends the same bytes with the same transaction_id.
"""
    + OUTBOX_TABLE
    + """CREATE INDEX IF NOT EXISTS outbox_by_ra ON outbox (ra_request_id) WHERE ra_request_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS outbox_open ON outbox (next_attempt_at) WHERE state IN ('queued', 'sent', 'waiting');
-- The forwarder takes open rows oldest first; done rows accumulate for ever and must not be scanned each pass.
CREATE INDEX IF NOT EXISTS outbox_open_by_id ON outbox (id) WHERE state IN ('queued', 'sent', 'waiting');
-- The queue's oldest open record (the forwarder's age limits, every pass): MIN(created_at) otherwise reads every
-- open row from the table, about a second with 100,000 queued.
CREATE INDEX IF NOT EXISTS outbox_open_created ON outbox (created_at) WHERE state IN ('queued', 'sent', 'waiting');
-- `upstream status` lists the newest parked and failed records: without this it read the outbox backwards until
-- it found 20 of them, all of it when there are none (45 s with a million records).
CREATE INDEX IF NOT EXISTS outbox_aside ON outbox (id) WHERE state IN ('parked', 'failed');
CREATE INDEX IF NOT EXISTS outbox_by_issuance ON outbox (issuance_id);
CREATE INDEX IF NOT EXISTS outbox_by_serial ON outbox (cert_serial, kind);
CREATE UNIQUE INDEX IF NOT EXISTS outbox_one_rr ON outbox (cert_serial) WHERE kind = 'rr';
CREATE TRIGGER IF NOT EXISTS outbox_on_revocation AFTER INSERT ON revocation WHEN NEW.source != 'upstream'
    BEGIN
        INSERT OR IGNORE INTO outbox (kind, cert_serial, transaction_id, next_attempt_at, created_at)
            VALUES ('rr', NEW.cert_serial, randomblob(16), NEW.revoked_at, NEW.revoked_at);
    END;
-- RA mode (docs/cmp.md "Upstream issuance mode"): a device request authorised here (work order, quota,
-- allowlist) whose certificate the UPSTREAM CA issues. Written with its outbox row in one transaction; the
-- forwarder stores the upstream's certificate and chain here; the station, told PENDING, polls until then.
--   pending   - authorised, queued or sent upstream
--   issued    - the upstream's certificate is stored; it is released to the station from now on
--   confirmed - the station (or CMP client) confirmed it stored the certificate
--   failed    - the upstream rejected the request for good (`failure` says why); its unit is given back
"""
    + RA_REQUEST_TABLE
    + """CREATE UNIQUE INDEX IF NOT EXISTS ra_live_device ON ra_request (ca, device_serial) WHERE state != 'failed';
CREATE UNIQUE INDEX IF NOT EXISTS ra_live_key ON ra_request (public_key_sha256) WHERE state != 'failed';
CREATE INDEX IF NOT EXISTS ra_by_request ON ra_request (station, request_id);
CREATE INDEX IF NOT EXISTS ra_by_device ON ra_request (ca, device_serial);  -- every issuance looks here
CREATE TRIGGER IF NOT EXISTS work_order_unit_bind_ra AFTER INSERT ON ra_request
    BEGIN
        UPDATE work_order_unit SET ra_request_id = NEW.id
            WHERE issuance_id IS NULL AND ra_request_id IS NULL AND device_serial = NEW.device_serial;
    END;
-- An upstream rejection issued nothing: give the unit (or rework grant) back, as a burned intent does.
CREATE TRIGGER IF NOT EXISTS work_order_unit_release_ra AFTER UPDATE OF state ON ra_request
    WHEN OLD.state = 'pending' AND NEW.state = 'failed'
    BEGIN
        UPDATE work_order SET consumed = consumed - 1
            WHERE id = (SELECT work_order FROM work_order_unit
                        WHERE ra_request_id = NEW.id AND kind = 'new' AND released = 0);
        UPDATE rework SET used = 0
            WHERE id = (SELECT rework_id FROM work_order_unit
                        WHERE ra_request_id = NEW.id AND kind = 'rework' AND released = 0);
        UPDATE work_order_unit SET released = 1 WHERE ra_request_id = NEW.id;
    END;
"""
    + SCEP_CHALLENGE_TABLE
    + OUTBOX_COUNT_TABLE
    + ";\n"
    + RA_REQUEST_COUNT_TABLE
    + ";\n"
    + COUNT_TRIGGERS
)

_OUTBOX_COLUMNS = (
    "id, kind, issuance_id, cert_serial, transaction_id, csr_der, public_key_der, subject_der, request_der, state,"
    " attempts, next_attempt_at, last_error, last_response_der, upstream_cert_der, created_at, done_at,"
    " ra_request_id"
)

# Schema 1 -> 2 (RA mode): columns that CREATE TABLE IF NOT EXISTS cannot add to an existing table. Run before
# SCHEMA, whose new indexes use them.
MIGRATIONS = {
    1: (
        RA_REQUEST_TABLE,
        "ALTER TABLE product ADD COLUMN issuance_mode TEXT NOT NULL DEFAULT 'local'"
        " CHECK (issuance_mode IN ('local', 'upstream'))",
        "ALTER TABLE work_order_unit ADD COLUMN ra_request_id INTEGER",
        "ALTER TABLE outbox ADD COLUMN ra_request_id INTEGER REFERENCES ra_request (id)",
    ),
    # Schema 2 -> 3 (key update, parked upstream records): two issuance columns and the live-device index that
    # uses one, the product's revoke_on_update, and the outbox rebuilt for its new kind and state (SQLite cannot
    # change a CHECK in place). The trigger that writes rr rows is dropped first so that no trigger names the
    # table while it is swapped; SCHEMA creates it again, and the outbox's indexes, right after.
    2: (
        "ALTER TABLE issuance ADD COLUMN updates INTEGER",
        "ALTER TABLE issuance ADD COLUMN updated_by INTEGER",
        "DROP INDEX IF EXISTS issuance_live_device",
        "ALTER TABLE product ADD COLUMN revoke_on_update INTEGER NOT NULL DEFAULT 0"
        " CHECK (revoke_on_update IN (0, 1))",
        "DROP TRIGGER IF EXISTS outbox_on_revocation",
        OUTBOX_TABLE.replace("CREATE TABLE IF NOT EXISTS outbox (", "CREATE TABLE outbox_v3 ("),
        f"INSERT INTO outbox_v3 ({_OUTBOX_COLUMNS}) SELECT {_OUTBOX_COLUMNS} FROM outbox",
        "DROP TABLE outbox",
        "ALTER TABLE outbox_v3 RENAME TO outbox",
    ),
    # Schema 3 -> 4: the depth counters, counted once from the rows (SCHEMA's triggers keep them from then on).
    3: (
        OUTBOX_COUNT_TABLE,
        RA_REQUEST_COUNT_TABLE,
        "INSERT INTO outbox_count (kind, state, n) SELECT kind, state, COUNT(*) FROM outbox GROUP BY kind, state",
        "INSERT INTO ra_request_count (state, n) SELECT state, COUNT(*) FROM ra_request GROUP BY state",
    ),
    # Schema 4 -> 5: the public-key uniqueness moves from a partial UNIQUE index to a plain index and triggers, in
    # one transaction (building the index reads the table once: 10 to 13 s for ten million rows).
    4: ("DROP INDEX IF EXISTS issuance_live_key", *KEY_RULE_STATEMENTS),
    # Schema 5 -> 6: the outbox's transaction_id loses its UNIQUE constraint, and with it the index SQLite kept for
    # it. Nothing looks a row up by it (the forwarder matches replies to the requests it holds in memory), its
    # 16 bytes are random (RFC 9483 3.1: a collision is about a 2^-65 chance at 2^32 rows), and an index on random
    # bytes put every certificate's outbox row on a random page of an index nearly as large as the key index:
    # the journal thread's CPU a certificate grew with the journal, and on a large journal that was a random read
    # from disk a certificate after a restart (docs/performance.md "Rounds"). SQLite drops a constraint only by
    # rebuilding the table: as in 2 above, every row copied in one transaction, the rr trigger dropped first and
    # recreated by SCHEMA with the outbox's triggers and indexes (its depth counters are not touched: the copy
    # fires no trigger of the old table, and DROP TABLE none at all).
    5: (
        "DROP TRIGGER IF EXISTS outbox_on_revocation",
        OUTBOX_TABLE.replace("CREATE TABLE IF NOT EXISTS outbox (", "CREATE TABLE outbox_v6 ("),
        f"INSERT INTO outbox_v6 ({_OUTBOX_COLUMNS}) SELECT {_OUTBOX_COLUMNS} FROM outbox",
        "DROP TABLE outbox",
        "ALTER TABLE outbox_v6 RENAME TO outbox",
    ),
}


def statements(script: str) -> list[str]:
    """The SQL statements of `script`, each whole (a trigger's body with its own semicolons included), for running
    one at a time inside a transaction: executescript would COMMIT the transaction first."""
    out: list[str] = []
    buf = ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            out.append(buf.strip())
            buf = ""
    if any(part.strip() and not part.strip().startswith("--") for part in buf.splitlines()):
        raise ValueError(f"an incomplete SQL statement at the end of the script: {buf.strip()[:80]!r}")
    return out


def _version(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    return int(row[0]) if row is not None else SCHEMA_VERSION


def _refuse_unsupported(version: int) -> None:
    if version > SCHEMA_VERSION or (version < SCHEMA_VERSION and version not in MIGRATIONS):
        raise IssuanceFailed(
            f"journal schema {version} is not the supported {SCHEMA_VERSION} (and cannot be migrated to it)",
            ReasonCode.JOURNAL_UNAVAILABLE,
        )


# meta keys `migrated:<version>`: a migration not yet in the audit log (appliance/runtime.py record_start).
MIGRATED_PREFIX = "migrated:"

# How much free disk a migration that rebuilds a table needs, as a multiple of that table's size (its rows and
# indexes): the copy in the database file, and the WAL holding the new table and, with SQLite's secure_delete (on
# in Debian's build), the old one's pages zeroed, both at once during the checkpoint that follows the COMMIT
# (bench/migration.py measured 2.6 to 2.7 times).
REBUILD_ROOM = 3.0
# The table each migration rebuilds, if any.
REBUILDS = {2: "outbox", 5: "outbox"}


def _table_bytes(conn: sqlite3.Connection, table: str) -> int:
    """The bytes of `table` and its indexes, from SQLite's dbstat (a read of the table's pages); where this SQLite
    has no dbstat, the whole database file, which is more than the table."""
    try:
        row = conn.execute(
            "SELECT SUM(pgsize) FROM dbstat WHERE name IN (SELECT name FROM sqlite_master WHERE tbl_name = ?)",
            (table,),
        ).fetchone()
        return int(row[0] or 0)
    except sqlite3.Error:
        count, size = (
            conn.execute("PRAGMA page_count").fetchone()[0],
            conn.execute("PRAGMA page_size").fetchone()[0],
        )
        return int(count) * int(size)


def _check_room(conn: sqlite3.Connection, version: int) -> None:
    """Refuse a rebuild that the disk has no room for, before it starts: one that ran out of space part way would
    roll back (or, in its checkpoint after the COMMIT, leave a journal that can no longer be written)."""
    table = REBUILDS.get(version)
    if table is None:
        return
    path = Path(conn.execute("PRAGMA database_list").fetchone()[2])
    need = int(_table_bytes(conn, table) * REBUILD_ROOM)
    free = shutil.disk_usage(path.parent).free
    if free < need:
        raise IssuanceFailed(
            f"migrating the journal from schema {version} to {version + 1} rebuilds its {table} table and needs"
            f" about {need / 1e9:.1f} GB free on {path.parent} ({REBUILD_ROOM:g} times the table); {free / 1e9:.1f}"
            " GB are free: make room, then start again (nothing was changed)",
            ReasonCode.JOURNAL_UNAVAILABLE,
        )


def migrate(conn: sqlite3.Connection, *, starting: Callable[[int], None] | None = None) -> int:
    """Bring an older journal up to SCHEMA_VERSION, one version per transaction (a crash leaves a whole one), and
    return how many versions it moved. `starting(version)` is called before each version's migration (the
    daemon tells systemd that its start will take longer).

    The version is read again under the write lock: a second process that opened the journal at the same time
    (a CLI command beside the starting daemon) finds it migrated and leaves it alone, rather than running a
    migration twice. The last migration runs the whole SCHEMA in its own transaction, so that no writer ever sees
    the migrated journal without the triggers and indexes a migration dropped with a table it rebuilt."""
    if not conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'").fetchone():
        return 0  # a new journal: SCHEMA creates it whole
    version = _version(conn)
    _refuse_unsupported(version)
    moved = 0
    while version < SCHEMA_VERSION:
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = _version(conn)
            _refuse_unsupported(version)
            if version == SCHEMA_VERSION:
                conn.execute("COMMIT")
                break
            _check_room(conn, version)
            if starting is not None:
                starting(version)
            began = time.monotonic()
            for statement in MIGRATIONS[version]:
                conn.execute(statement)
            version += 1
            if version == SCHEMA_VERSION:
                for statement in statements(SCHEMA):
                    conn.execute(statement)
            conn.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(version),))
            # For the audit log, which the daemon's next start writes it to (journal.migrated): the journal
            # cannot sign here, and a command that migrated it may have no audit key at hand.
            note = {
                "from": version - 1,
                "to": version,
                "at": time.time(),
                "seconds": time.monotonic() - began,
            }
            conn.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                (f"{MIGRATED_PREFIX}{version}", json.dumps(note, sort_keys=True)),
            )
            conn.execute("COMMIT")
            moved += 1
        except BaseException:
            if conn.in_transaction:  # SQLite rolls back by itself on some errors (a full disk)
                conn.execute("ROLLBACK")
            raise
    return moved
