-- A journal written by schema 2 (Birthline before key update and parked records), for the migration test.
BEGIN TRANSACTION;
CREATE TABLE audit (
    seq       INTEGER PRIMARY KEY,                             -- 1, 2, 3, ... with no gaps
    time      REAL NOT NULL,
    actor     TEXT NOT NULL,
    event     TEXT NOT NULL,
    data      TEXT NOT NULL,                                   -- canonical JSON
    prev_hash BLOB NOT NULL CHECK (length(prev_hash) = 32),
    hash      BLOB NOT NULL CHECK (length(hash) = 32)
);
CREATE TABLE audit_checkpoint (
    seq       INTEGER PRIMARY KEY,                             -- the claim (audit entry) this signature signs
    head_hash BLOB NOT NULL CHECK (length(head_hash) = 32),
    time      REAL NOT NULL,
    key_label TEXT NOT NULL,
    signature BLOB NOT NULL
);
CREATE TABLE audit_key (
    label      TEXT PRIMARY KEY,
    public_key BLOB NOT NULL,                                  -- SubjectPublicKeyInfo DER
    created_at REAL NOT NULL
);
CREATE TABLE ca (
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
CREATE TABLE crl (
    ca             TEXT PRIMARY KEY,
    crl_number     INTEGER NOT NULL CHECK (crl_number > 0),   -- monotonic per CA (RFC 5280 5.2.3)
    this_update    REAL NOT NULL,
    next_update    REAL NOT NULL,
    revoked_count  INTEGER NOT NULL,
    revocation_seq INTEGER NOT NULL,                          -- MAX(revocation.change_seq) of the CA it lists
    der            BLOB NOT NULL
);
CREATE TABLE issuance (
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
    CHECK ((state IN ('issued', 'confirmed', 'reworked', 'scrapped')) = (cert_der IS NOT NULL))
);
INSERT INTO "issuance" VALUES(1,'r1','fixture-1','idevid','issuing','SN-0001',X'01',X'02','0a1b',X'03','issued',X'3000',NULL,1.0,1.0,NULL);
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
INSERT INTO "meta" VALUES('schema_version','2');
CREATE TABLE ocsp_signer (
    cert_serial TEXT PRIMARY KEY,
    ca          TEXT NOT NULL,
    key_label   TEXT NOT NULL UNIQUE,
    cert_der    BLOB NOT NULL,
    not_before  REAL NOT NULL,
    not_after   REAL NOT NULL,
    created_at  REAL NOT NULL
);
CREATE TABLE outbox (
    id                INTEGER PRIMARY KEY,
    kind              TEXT NOT NULL CHECK (kind IN ('p10cr', 'cr', 'rr')),
    issuance_id       INTEGER REFERENCES issuance (id),
    cert_serial       TEXT NOT NULL,                          -- the local certificate
    transaction_id    BLOB NOT NULL UNIQUE,                   -- 16 random bytes, fixed at creation
    csr_der           BLOB,                                   -- p10cr: the device's CSR, as received
    public_key_der    BLOB,                                   -- cr: SubjectPublicKeyInfo
    subject_der       BLOB,                                   -- cr: the subject (the local certificate's)
    request_der       BLOB,                                   -- the exact bytes sent, from the first send on
    state             TEXT NOT NULL DEFAULT 'queued'
        CHECK (state IN ('queued', 'sent', 'waiting', 'done', 'failed')),
    attempts          INTEGER NOT NULL DEFAULT 0,
    next_attempt_at   REAL NOT NULL,
    last_error        TEXT,
    last_response_der BLOB,                                   -- 'waiting': the answer a pollReq follows up
    upstream_cert_der BLOB,                                   -- the upstream CA's certificate for the device
    created_at        REAL NOT NULL,
    done_at           REAL,
    ra_request_id     INTEGER REFERENCES ra_request (id)       -- RA mode: the request this row carries
);
INSERT INTO "outbox" VALUES(1,'p10cr',1,'0a1b',X'00112233445566778899AABBCCDDEEFF',X'3000',NULL,NULL,NULL,'done',0,1.0,NULL,NULL,X'3001',1.0,2.0,NULL);
INSERT INTO "outbox" VALUES(2,'rr',NULL,'0a1b',X'FFEEDDCCBBAA99887766554433221100',NULL,NULL,NULL,NULL,'sent',2,5.0,'upstream unreachable',NULL,NULL,1.0,NULL,NULL);
CREATE TABLE product (
    name           TEXT PRIMARY KEY,
    tenant         TEXT NOT NULL REFERENCES tenant (name),
    profile        TEXT NOT NULL,
    ca             TEXT NOT NULL,
    key_algorithms TEXT NOT NULL,                             -- comma-separated, a subset of the profile's
    created_at     REAL NOT NULL,
    -- local: the appliance's issuing CA signs at once; upstream: RA mode, the upstream CA issues (docs/cmp.md)
    issuance_mode  TEXT NOT NULL DEFAULT 'local' CHECK (issuance_mode IN ('local', 'upstream'))
);
INSERT INTO "product" VALUES('sensor','acme','idevid','issuing','ec-p256',1.0,'local');
CREATE TABLE production_line (
    name        TEXT PRIMARY KEY,
    description TEXT NOT NULL DEFAULT '',
    created_at  REAL NOT NULL
);
INSERT INTO "production_line" VALUES('L1','',1.0);
CREATE TABLE ra_request (
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
CREATE TABLE revocation (
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
CREATE TABLE rework (
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
CREATE TABLE scrap (
    issuance_id   INTEGER PRIMARY KEY,
    device_serial TEXT NOT NULL,
    cert_serial   TEXT NOT NULL,
    work_order    TEXT,
    authorised_by TEXT NOT NULL,
    reason        TEXT NOT NULL,
    created_at    REAL NOT NULL
);
CREATE TABLE station_request (
    station     TEXT NOT NULL,
    request_id  TEXT NOT NULL,
    cert_serial TEXT NOT NULL,
    PRIMARY KEY (station, request_id)
);
CREATE TABLE stations (
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
CREATE TABLE tenant (
    name         TEXT PRIMARY KEY,
    display_name TEXT NOT NULL,
    created_at   REAL NOT NULL
);
INSERT INTO "tenant" VALUES('acme','Acme',1.0);
CREATE TABLE users (
    name          TEXT PRIMARY KEY,
    role          TEXT NOT NULL CHECK (role IN ('operator', 'supervisor', 'administrator', 'auditor')),
    password_hash TEXT NOT NULL,                              -- scrypt$n$r$p$salt$hash (production/users.py)
    enabled       INTEGER NOT NULL DEFAULT 1,
    failed_logins INTEGER NOT NULL DEFAULT 0,
    locked_until  REAL,
    created_at    REAL NOT NULL,
    changed_at    REAL NOT NULL
);
CREATE TABLE work_order (
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
INSERT INTO "work_order" VALUES('WO-1','sensor',10,1,'SN-[0-9]+',NULL,NULL,'active',1.0,NULL,NULL);
CREATE TABLE work_order_line (
    work_order TEXT NOT NULL REFERENCES work_order (id),
    line       TEXT NOT NULL REFERENCES production_line (name),
    PRIMARY KEY (work_order, line)
);
CREATE TABLE work_order_range (
    work_order TEXT NOT NULL REFERENCES work_order (id),
    prefix     TEXT NOT NULL,
    first      INTEGER NOT NULL,
    last       INTEGER NOT NULL,
    width      INTEGER NOT NULL,
    CHECK (0 <= first AND first <= last)
);
CREATE TABLE work_order_serial (
    work_order TEXT NOT NULL REFERENCES work_order (id),
    serial     TEXT NOT NULL,
    PRIMARY KEY (work_order, serial)
) WITHOUT ROWID;
CREATE TABLE work_order_unit (
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
INSERT INTO "work_order_unit" VALUES(1,'WO-1','SN-0001','new',NULL,1,0,1.0,NULL);
CREATE UNIQUE INDEX issuance_live_device
    ON issuance (ca, device_serial) WHERE state NOT IN ('burned', 'reworked');
CREATE UNIQUE INDEX issuance_live_key
    ON issuance (public_key_sha256) WHERE state != 'burned';
CREATE INDEX issuance_request ON issuance (station, request_id);
CREATE UNIQUE INDEX stations_serial_port ON stations (port) WHERE kind = 'serial';
CREATE INDEX audit_claims ON audit (seq) WHERE event = 'audit.checkpoint';
CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE INDEX work_order_line_by_line ON work_order_line (line);
CREATE INDEX work_order_range_wo ON work_order_range (work_order);
CREATE UNIQUE INDEX work_order_unit_ra ON work_order_unit (ra_request_id)
    WHERE ra_request_id IS NOT NULL;
CREATE INDEX work_order_unit_wo ON work_order_unit (work_order);
CREATE INDEX work_order_unit_unbound ON work_order_unit (device_serial) WHERE issuance_id IS NULL;
CREATE UNIQUE INDEX rework_open ON rework (ca, device_serial) WHERE used = 0;
CREATE TRIGGER work_order_unit_bind AFTER INSERT ON issuance
    BEGIN
        UPDATE work_order_unit SET issuance_id = NEW.id
            WHERE issuance_id IS NULL AND ra_request_id IS NULL AND device_serial = NEW.device_serial;
    END;
CREATE TRIGGER work_order_unit_release AFTER UPDATE OF state ON issuance
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
CREATE INDEX revocation_by_ca ON revocation (ca, change_seq);
CREATE INDEX revocation_by_seq ON revocation (change_seq);
CREATE INDEX revocation_unforwarded ON revocation (revoked_at) WHERE forwarded_at IS NULL;
CREATE TRIGGER revocation_seq_insert AFTER INSERT ON revocation
    BEGIN
        UPDATE revocation SET change_seq = (SELECT COALESCE(MAX(change_seq), 0) + 1 FROM revocation)
            WHERE cert_serial = NEW.cert_serial;
    END;
CREATE TRIGGER revocation_seq_update AFTER UPDATE OF reason, invalidity_date ON revocation
    BEGIN
        UPDATE revocation SET change_seq = (SELECT COALESCE(MAX(change_seq), 0) + 1 FROM revocation)
            WHERE cert_serial = NEW.cert_serial;
    END;
CREATE TRIGGER revocation_on_scrap AFTER INSERT ON scrap
    BEGIN
        INSERT OR IGNORE INTO revocation (cert_serial, ca, reason, revoked_at, actor, source)
            SELECT NEW.cert_serial, ca, 'cessationOfOperation', NEW.created_at, NEW.authorised_by, 'scrap'
            FROM issuance WHERE id = NEW.issuance_id;
    END;
CREATE TRIGGER revocation_on_rework AFTER INSERT ON rework
    BEGIN
        INSERT OR IGNORE INTO revocation (cert_serial, ca, reason, revoked_at, actor, source)
            SELECT cert_serial, ca, 'superseded', NEW.created_at, NEW.authorised_by, 'rework'
            FROM issuance WHERE id = NEW.old_issuance;
    END;
CREATE INDEX ocsp_signer_by_ca ON ocsp_signer (ca, not_after);
CREATE INDEX outbox_by_ra ON outbox (ra_request_id) WHERE ra_request_id IS NOT NULL;
CREATE INDEX outbox_open ON outbox (next_attempt_at) WHERE state IN ('queued', 'sent', 'waiting');
CREATE INDEX outbox_open_by_id ON outbox (id) WHERE state IN ('queued', 'sent', 'waiting');
CREATE INDEX outbox_by_issuance ON outbox (issuance_id);
CREATE INDEX outbox_by_serial ON outbox (cert_serial, kind);
CREATE UNIQUE INDEX outbox_one_rr ON outbox (cert_serial) WHERE kind = 'rr';
CREATE TRIGGER outbox_on_revocation AFTER INSERT ON revocation WHEN NEW.source != 'upstream'
    BEGIN
        INSERT OR IGNORE INTO outbox (kind, cert_serial, transaction_id, next_attempt_at, created_at)
            VALUES ('rr', NEW.cert_serial, randomblob(16), NEW.revoked_at, NEW.revoked_at);
    END;
CREATE UNIQUE INDEX ra_live_device ON ra_request (ca, device_serial) WHERE state != 'failed';
CREATE UNIQUE INDEX ra_live_key ON ra_request (public_key_sha256) WHERE state != 'failed';
CREATE INDEX ra_by_request ON ra_request (station, request_id);
CREATE INDEX ra_by_device ON ra_request (ca, device_serial);
CREATE TRIGGER work_order_unit_bind_ra AFTER INSERT ON ra_request
    BEGIN
        UPDATE work_order_unit SET ra_request_id = NEW.id
            WHERE issuance_id IS NULL AND ra_request_id IS NULL AND device_serial = NEW.device_serial;
    END;
CREATE TRIGGER work_order_unit_release_ra AFTER UPDATE OF state ON ra_request
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
COMMIT;
