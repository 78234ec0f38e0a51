"""The EST server in the daemon, with `curl` and `openssl` as the client (RFC 7030's own examples): every
operation and refusal, over the real TLS listener, issuing through the real core (SoftHSM2, SQLite)."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from appliance import stations_registry as reg
from appliance.daemon import Daemon
from appliance.production import reconcile, store
from appliance.production.users import Role, User
from hsm.softhsm import SoftHsmToken
from tests.appliance.conftest import put_on_line
from tests.appliance.est.support import PASSWORD, Curl, est_config, openssl_csr, station_status, write_pem
from tests.appliance.test_daemon import _config

pytestmark = pytest.mark.skipif(
    shutil.which("openssl") is None or shutil.which("curl") is None, reason="openssl and curl needed"
)


@pytest.fixture
async def est(
    softhsm_token: SoftHsmToken, production_journal_template: Path, tmp_path: Path
) -> AsyncIterator[Daemon]:
    cfg = est_config(_config(tmp_path / "state", softhsm_token, production_journal_template), tmp_path)
    async with Daemon(cfg) as d:
        yield d


@pytest.fixture
def curl(est: Daemon, tmp_path: Path) -> Curl:
    work = tmp_path / "curl"
    work.mkdir()
    return Curl(est, work)


def _serial(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)[0].value)


async def test_cacerts_is_the_issuing_chain_certs_only(est: Daemon, curl: Curl) -> None:
    for path in ("cacerts", "line1/cacerts", "st/cacerts"):
        answer = await curl(path)
        assert answer.status == 200, answer.text
        assert "application/pkcs7-mime; smime-type=certs-only" in answer.headers
        assert "content-transfer-encoding" not in answer.headers.lower()
        assert est.core is not None
        der = serialization.Encoding.DER
        assert {c.public_bytes(der) for c in answer.certificates()} == {
            c.public_bytes(der) for c in est.core.issuing_ca().chain
        }
    missing = await curl("nolabel/cacerts")
    assert missing.status == 404 and "no such EST label" in missing.text


async def test_csrattrs_name_the_device_serial_and_the_profiles_keys(curl: Curl) -> None:
    answer = await curl("csrattrs")
    assert answer.status == 200 and "application/csrattrs" in answer.headers
    parsed = subprocess.run(["openssl", "asn1parse", "-inform", "DER"], input=base64.b64decode(answer.body),
                            capture_output=True, check=True).stdout.decode()  # fmt: skip
    assert ":serialNumber" in parsed and ":id-ecPublicKey" in parsed and ":prime256v1" in parsed
    assert ":challengePassword" not in parsed  # the label does not require channel binding


async def test_simpleenroll_with_http_basic_issues_through_the_core(
    est: Daemon, curl: Curl, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="appliance.est")
    assert est.control is not None
    events = est.control.hub.bus.subscribe()
    assert events is not None
    _, csr = openssl_csr(tmp_path, "d1", "/serialNumber=SN-0001/CN=anything")
    answer = await curl("simpleenroll", *curl.basic(), body=csr)
    assert answer.status == 200, answer.text
    assert "application/pkcs7-mime; smime-type=certs-only" in answer.headers
    (cert,) = answer.certificates()
    assert _serial(cert) == "SN-0001"
    (row,) = est.journal.rows("device_serial=?", ("SN-0001",))
    assert row.state == "confirmed" and row.station == "fixture-1"
    assert row.cert_der == cert.public_bytes(serialization.Encoding.DER)
    # The control API's event stream says which front end issued it.
    while (event := await asyncio.wait_for(events.next_event(), 30)) is not None and event[
        "type"
    ] != "issued":
        pass
    assert event is not None and event["front_end"] == "est" and event["device_serial"] == "SN-0001"
    events.close()
    # The answer was lost: the same CSR again is answered with the same certificate.
    again = await curl("simpleenroll", *curl.basic(), body=csr)
    assert again.status == 200 and again.certificates() == [cert]
    assert len(est.journal.rows("device_serial=?", ("SN-0001",))) == 1
    # The station the label acts as has no link: the console sees kind "est" and its answers, never disconnected.
    station = await station_status(est, "fixture-1")
    assert station["kind"] == "est" and station["state"] == "issuing", station
    # An issuance is an event and an audit entry, not an INFO log line (no other front end logs one).
    assert not [
        r for r in caplog.records if r.name == "appliance.est.responder" and r.levelno >= logging.INFO
    ]


async def test_enrolment_refusals_say_why(est: Daemon, curl: Curl, tmp_path: Path) -> None:
    _, csr = openssl_csr(tmp_path, "d2", "/serialNumber=SN-0002")
    nobody = await curl("simpleenroll", body=csr)
    assert nobody.status == 401 and 'WWW-Authenticate: Basic realm="birthline est line1"' in nobody.headers
    assert nobody.text.startswith("NOT_AUTHORISED (6): ")
    wrong = await curl("simpleenroll", *curl.basic(password="guess"), body=csr)
    assert wrong.status == 401 and "wrong user name or password" in wrong.text
    other_user = await curl("simpleenroll", *curl.basic(user="someone", password=PASSWORD), body=csr)
    assert other_user.status == 401
    ctype = await curl("simpleenroll", *curl.basic(), "-H", "Content-Type: text/plain", body=csr)
    assert ctype.status == 415 and "application/pkcs10" in ctype.text
    big = await curl("simpleenroll", *curl.basic(), body=b"A" * (17 * 1024))
    assert big.status == 413
    junk = await curl("simpleenroll", *curl.basic(), body=b"not base64 at all!")
    assert junk.status == 400 and junk.text.startswith("BAD_CSR")
    not_csr = await curl("simpleenroll", *curl.basic(), body=b"AAAA")
    assert not_csr.status == 400 and "PKCS#10" in not_csr.text
    _, no_serial = openssl_csr(tmp_path, "d3", "/CN=no serial")
    assert (await curl("simpleenroll", *curl.basic(), body=no_serial)).status == 400
    _, outside = openssl_csr(tmp_path, "d4", "/serialNumber=OTHER-1")
    refused = await curl("simpleenroll", *curl.basic(), body=outside)
    assert refused.status == 403 and refused.text.startswith("NOT_AUTHORISED"), refused.text
    get = await curl("simpleenroll")
    assert get.status == 405 and "Allow: POST" in get.headers, get.headers  # RFC 9110 15.5.6
    post = await curl("cacerts", body=csr)
    assert post.status == 405 and "Allow: GET, HEAD" in post.headers, post.headers
    head = await curl("cacerts", "-I")  # GET implies HEAD
    assert head.status == 200 and "application/pkcs7-mime" in head.headers, head.headers
    assert (await curl("nosuchop")).status == 404
    assert est.journal.rows("device_serial=?", ("SN-0002",)) == []
    # Nothing of that stopped the listener: the right request is served.
    assert (await curl("simpleenroll", *curl.basic(), body=csr)).status == 200
    _, new_key = openssl_csr(tmp_path, "d2b", "/serialNumber=SN-0002")
    conflict = await curl("simpleenroll", *curl.basic(), body=new_key)
    assert conflict.status == 409 and conflict.text.startswith("DEVICE_ALREADY_ISSUED"), conflict.text


async def test_a_client_certificate_of_an_unknown_ca_fails_the_handshake(curl: Curl, tmp_path: Path) -> None:
    key, cert = tmp_path / "self.key", tmp_path / "self.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=stranger", "-days", "1"],
                   check=True, capture_output=True)  # fmt: skip
    _, csr = openssl_csr(tmp_path, "d9", "/serialNumber=SN-0009")
    (tmp_path / "d9.b64").write_bytes(csr)
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--cacert", str(curl.ca), "--cert", str(cert), "--key", str(key), "-u", "fixture:x", "-H",
        "Content-Type: application/pkcs10", "--data-binary", f"@{tmp_path / 'd9.b64'}", f"{curl.base}/simpleenroll",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode != 0 and out == b"", err  # the TLS handshake failed: no HTTP answer at all
    assert (await curl("cacerts")).status == 200


async def test_failed_basic_logins_are_paced_per_address(
    softhsm_token: SoftHsmToken, production_journal_template: Path, tmp_path: Path
) -> None:
    cfg = _config(tmp_path / "state", softhsm_token, production_journal_template)
    cfg = est_config(cfg, tmp_path, auth_failure_limit=2, auth_failure_window_s=3600.0)
    work = tmp_path / "w"
    work.mkdir()
    _, csr = openssl_csr(work, "d", "/serialNumber=SN-0003")
    async with Daemon(cfg) as d:
        curl = Curl(d, work)
        for _ in range(2):
            assert (await curl("simpleenroll", *curl.basic(password="guess"), body=csr)).status == 401
        paced = await curl("simpleenroll", *curl.basic(), body=csr)  # even the right password is not checked
        assert paced.status == 429 and "Retry-After:" in paced.headers, paced.headers
        assert d.journal.rows("device_serial=?", ("SN-0003",)) == []


async def test_a_successful_login_does_not_reset_the_failed_ones(
    softhsm_token: SoftHsmToken, production_journal_template: Path, tmp_path: Path
) -> None:
    """Wrong passwords on one label with a right login on another in between still add up to the limit."""
    cfg = _config(tmp_path / "state", softhsm_token, production_journal_template)
    cfg = est_config(cfg, tmp_path, auth_failure_limit=2, auth_failure_window_s=3600.0)
    work = tmp_path / "w"
    work.mkdir()
    _, csr = openssl_csr(work, "d", "/serialNumber=SN-0009")
    _, csr10 = openssl_csr(work, "e", "/serialNumber=SN-0010")
    async with Daemon(cfg) as d:
        curl = Curl(d, work)
        assert (await curl("simpleenroll", *curl.basic(password="guess"), body=csr)).status == 401
        ok = await curl("kg/simpleenroll", *curl.basic(), body=csr10)  # right, on another label
        assert ok.status == 200, ok.text
        assert (await curl("simpleenroll", *curl.basic(password="guess2"), body=csr)).status == 401
        paced = await curl("simpleenroll", *curl.basic(password="guess3"), body=csr)
        assert paced.status == 429 and "Retry-After:" in paced.headers, paced.text


async def _station(d: Daemon, name: str, out: Path) -> Path:
    assert d.core is not None
    creds = reg.add_station(d.journal, d.core.token, name, "lan", audit=d.core.audit, actor="alice")
    put_on_line(d.journal, name)
    return reg.write_bundle(creds, out / name)


async def test_simpleenroll_with_the_stations_tls_certificate(
    est: Daemon, curl: Curl, tmp_path: Path
) -> None:
    _, csr = openssl_csr(tmp_path, "d5", "/serialNumber=SN-0005")
    missing = await curl("st/simpleenroll", body=csr)
    assert missing.status == 403 and "not registered or is disabled" in missing.text
    bundle = await _station(est, "est-st", tmp_path)
    tls = ("--cert", str(bundle / "tls-client.crt"), "--key", str(bundle / "tls-client.key"))
    no_cert = await curl("st/simpleenroll", body=csr)
    assert no_cert.status == 403 and "TLS client certificate" in no_cert.text
    basic = await curl("st/simpleenroll", *curl.basic(), body=csr)  # the label takes no password
    assert basic.status == 403 and "TLS client certificate" in basic.text, basic.text
    ok = await curl("st/simpleenroll", *tls, body=csr)
    assert ok.status == 200, ok.text
    (row,) = est.journal.rows("device_serial=?", ("SN-0005",))
    assert row.station == "est-st"
    # Another station's certificate (same management CA) is not this label's station.
    other = await _station(est, "est-other", tmp_path)
    _, csr6 = openssl_csr(tmp_path, "d6", "/serialNumber=SN-0006")
    wrong = await curl("st/simpleenroll", "--cert", str(other / "tls-client.crt"), "--key",
                       str(other / "tls-client.key"), body=csr6)  # fmt: skip
    assert wrong.status == 403, wrong.text
    assert "trusted_ca" not in wrong.text and "EST label 'st'" in wrong.text, wrong.text
    # ... nor with a right password beside it, on a label that takes HTTP Basic (docs/est.md).
    other_tls = ("--cert", str(other / "tls-client.crt"), "--key", str(other / "tls-client.key"))
    both = await curl("line1/simpleenroll", *other_tls, *curl.basic(), body=csr6)
    assert both.status == 403, both.text
    no_basic = await curl("line1/simpleenroll", *other_tls, body=csr6)
    assert no_basic.status == 403 and "trusted_ca" not in no_basic.text and "HTTP Basic" in no_basic.text, (
        no_basic.text
    )
    # A password label does not take a station certificate in place of the password; a station's certificate on
    # another station's label is refused outright (403), whatever comes beside it (docs/est.md).
    refused = await curl("line1/simpleenroll", *tls, body=csr6)
    assert refused.status == 403 and "the label takes HTTP Basic" in refused.text, refused.text
    # Disabling the station stops its label at once.
    assert est.core is not None
    reg.set_enabled(est.journal, "est-st", False, audit=est.core.audit, actor="alice")
    disabled = await curl("st/simpleenroll", *tls, body=csr6)
    assert disabled.status == 403 and "disabled" in disabled.text


async def test_a_path_that_is_no_est_resource_is_refused_like_every_refusal(curl: Curl) -> None:
    """Paths outside /.well-known/est/[<label>/]<operation> get the documented one-line refusal with its reason
    code, not the HTTP library's own text (found by an outside test)."""
    for path in ("", "a/b/c", "line1/cacerts/"):
        answer = await curl(path)
        assert answer.status == 404, (path, answer.text)
        assert answer.text.startswith("BAD_REQUEST (") and "no such EST resource" in answer.text, answer.text
        assert "text/plain" in answer.headers


async def test_a_certificate_the_label_does_not_take_gets_the_basic_challenge(
    est: Daemon, curl: Curl, tmp_path: Path
) -> None:
    """On a label that takes HTTP Basic, a TLS client certificate it does not take (here a device certificate of
    this appliance, which renews itself at simplereenroll) and no password is answered 401 with the challenge,
    as without a certificate, saying why the certificate was not taken: a client that sends Basic only when
    challenged (curl --anyauth, libest) then logs in. Found by an outside test: it was a 403."""
    key, csr = openssl_csr(tmp_path, "d20", "/serialNumber=SN-0020")
    (device,) = (await curl("simpleenroll", *curl.basic(), body=csr)).certificates()
    tls = ("--cert", str(write_pem(tmp_path / "d20.pem", device)), "--key", str(key))
    _, csr21 = openssl_csr(tmp_path, "d21", "/serialNumber=SN-0021")
    challenged = await curl("simpleenroll", *tls, body=csr21)
    assert challenged.status == 401, challenged.text
    assert "WWW-Authenticate: Basic" in challenged.headers, challenged.headers
    assert "needs HTTP Basic" in challenged.text and "renews itself at simplereenroll" in challenged.text
    assert est.journal.rows("device_serial=?", ("SN-0021",)) == []
    answered = await curl("simpleenroll", *tls, "--anyauth", *curl.basic(), body=csr21)
    assert answered.status == 200, answered.text
    assert [r.station for r in est.journal.rows("device_serial=?", ("SN-0021",))] == ["fixture-1"]


async def test_simplereenroll_rekeys_and_the_journal_links_old_and_new(
    est: Daemon, curl: Curl, tmp_path: Path
) -> None:
    key, csr = openssl_csr(tmp_path, "d7", "/serialNumber=SN-0007")
    (old,) = (await curl("simpleenroll", *curl.basic(), body=csr)).certificates()
    old_pem = write_pem(tmp_path / "old.pem", old)
    subject = "/serialNumber=SN-0007"  # the test profile's subject is the serial alone
    assert old.subject.rfc4514_string() == "2.5.4.5=SN-0007"
    tls = ("--cert", str(old_pem), "--key", str(key))

    same_key = await curl("simplereenroll", *tls, body=openssl_csr(tmp_path, "same", subject, key)[1])
    assert same_key.status == 400 and "new key" in same_key.text
    _, other_subject = openssl_csr(tmp_path, "subj", "/serialNumber=SN-0007/CN=else")
    bad = await curl("simplereenroll", *tls, body=other_subject)
    assert bad.status == 400 and "subject" in bad.text
    new_key, new_csr = openssl_csr(tmp_path, "d7b", subject)
    no_cert = await curl("simplereenroll", *curl.basic(), body=new_csr)
    # 403, not a 401 without a challenge (RFC 9110 15.5.2): no HTTP authentication scheme sends a certificate.
    assert no_cert.status == 403 and "certificate being renewed" in no_cert.text

    renewed = await curl("simplereenroll", *tls, body=new_csr)
    assert renewed.status == 200, renewed.text
    (new,) = renewed.certificates()
    assert new.subject == old.subject and new.serial_number != old.serial_number
    rows = {r.cert_serial: r for r in est.journal.rows("device_serial=?", ("SN-0007",))}
    assert rows[f"{old.serial_number:x}"].updated_by == rows[f"{new.serial_number:x}"].id
    # The answer was lost: the same CSR with the same (old) certificate gets the same new certificate.
    retried = await curl("simplereenroll", *tls, body=new_csr)
    assert retried.status == 200, retried.text
    assert retried.certificates() == [new]
    # The renewal counts under the work order of the certificate it replaced (production.md): the export lists it.
    exported = [
        c.cert_serial for c in reconcile.certificates(est.journal, "WO-1") if c.device_serial == "SN-0007"
    ]
    assert exported == [f"{old.serial_number:x}", f"{new.serial_number:x}"]
    # The replaced certificate renews nothing more.
    _, third = openssl_csr(tmp_path, "d7c", subject)
    again = await curl("simplereenroll", *tls, body=third)
    assert again.status == 403 and "replaced" in again.text
    # The new one does.
    newer = await curl("simplereenroll", "--cert", str(write_pem(tmp_path / "new.pem", new)), "--key",
                       str(new_key), body=third)  # fmt: skip
    assert newer.status == 200, newer.text


async def test_plain_http_and_garbage_on_the_est_port_get_no_answer(est: Daemon, curl: Curl) -> None:
    """EST is TLS only: a plain HTTP request (with HTTP Basic in it) or garbage is never answered in the clear,
    and the listener goes on serving."""
    assert est.est_server is not None
    host, port = est.est_server.address
    for data in (b"GET /.well-known/est/cacerts HTTP/1.1\r\nHost: x\r\nAuthorization: Basic Zm9vOmJhcg==\r\n\r\n",
                 bytes(range(256)) * 8):  # fmt: skip
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(data)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 60)  # the server closes the connection
        writer.close()
        assert b"HTTP/1.1" not in answer and b"BEGIN" not in answer
    assert (await curl("cacerts")).status == 200


async def test_a_lost_renewal_is_answered_again_when_the_product_revokes_what_it_replaced(
    est: Daemon, curl: Curl, tmp_path: Path
) -> None:
    """With `product key-update revoke` the old certificate is revoked (superseded) once the renewal is
    delivered; a client that lost the answer still gets the same certificate for the same CSR, and nothing else."""
    assert est.core is not None
    store.set_product_key_update(
        est.journal, est.core.audit, User("alice", Role.ADMINISTRATOR), "sensor", True
    )
    key, csr = openssl_csr(tmp_path, "d8", "/serialNumber=SN-0008")
    (old,) = (await curl("simpleenroll", *curl.basic(), body=csr)).certificates()
    tls = ("--cert", str(write_pem(tmp_path / "old8.pem", old)), "--key", str(key))
    _, new_csr = openssl_csr(tmp_path, "d8b", "/serialNumber=SN-0008")
    (new,) = (await curl("simplereenroll", *tls, body=new_csr)).certificates()
    revoked = est.journal.call(lambda: est.journal.conn.execute(
        "SELECT reason FROM revocation WHERE cert_serial=?", (f"{old.serial_number:x}",)).fetchone())  # fmt: skip
    assert revoked is not None and revoked[0] == "superseded"
    again = await curl("simplereenroll", *tls, body=new_csr)
    assert again.status == 200, again.text
    assert again.certificates() == [new]
    _, other = openssl_csr(tmp_path, "d8c", "/serialNumber=SN-0008")
    refused = await curl("simplereenroll", *tls, body=other)
    assert refused.status == 403, refused.text


async def test_est_layer_refusals_are_audited_within_a_budget(
    softhsm_token: SoftHsmToken, production_journal_template: Path, tmp_path: Path
) -> None:
    """A wrong password, no credentials, a replaced certificate: each refusal of the EST layer is an audit entry
    (est.refused, never the password), the first refusal_burst of a window in full and the rest summarised."""
    import json

    from appliance.audit.log import AuditLog
    from appliance.issuance.journal import Journal

    cfg = _config(tmp_path / "state", softhsm_token, production_journal_template)
    cfg = est_config(cfg, tmp_path, auth_failure_limit=100)
    cfg = dataclasses.replace(cfg, issuance=dataclasses.replace(cfg.issuance, refusal_burst=2))
    work = tmp_path / "w"
    work.mkdir()
    _, csr = openssl_csr(work, "d", "/serialNumber=SN-0011")
    async with Daemon(cfg) as d:
        curl = Curl(d, work)
        for _ in range(3):
            wrong = await curl("simpleenroll", *curl.basic(password="not-it"), body=csr)
            assert wrong.status == 401
        assert (await curl("line1/simpleenroll", body=csr)).status == 401
    with Journal(cfg.journal.path) as journal:  # the summary is written at shutdown
        entries = [e for e in AuditLog(journal).entries() if e.event.startswith("est.")]
    full = [json.loads(e.data) for e in entries if e.event == "est.refused"]
    assert [(f["label"], f["operation"], f["status"], f["code"]) for f in full] == [
        ("line1", "simpleenroll", 401, "NOT_AUTHORISED")
    ] * 2
    assert all(e.actor == "est:line1" for e in entries)
    (summary,) = [json.loads(e.data) for e in entries if e.event == "est.refusals-suppressed"]
    assert summary["suppressed"] == {"NOT_AUTHORISED": 2}
    assert summary["label"] == "line1" and "station" not in summary, summary  # a label, not a station
    assert "not-it" not in " ".join(e.data for e in entries)
