"""OCSP answers made ahead of time and in batches (appliance/va/presign.py), and the OCSP line listener
(appliance/va/fastpath.py): hand-built bytes equal cryptography's, a revoked certificate's pre-produced good
answer is never served once the responder has seen the revocation, and pipelined HTTP answers come in order."""

from __future__ import annotations

import asyncio
import datetime as dt
import random
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from cryptography.x509.oid import NameOID

from appliance.config import parse_config
from appliance.errors import ConfigError
from appliance.va import revocation as rv
from appliance.va.fastpath import OcspListener
from appliance.va.ocsp import EXTENDED_REVOKE_OID, OcspResponder
from appliance.va.presign import ResponseMaker, plain_request
from appliance.va.service import ValidationAuthority, VaSettings
from tests.appliance.va.conftest import DEVICES, Va
from tests.appliance.va.test_openssl import Files, ocsp_query
from tests.ports import free_ports

C = ocsp.OCSPCertStatus
_HASHES: list[hashes.HashAlgorithm] = [hashes.SHA1(), hashes.SHA256(), hashes.SHA384(), hashes.SHA512()]  # noqa: S303
_REASONS = [None, *(f for f in x509.ReasonFlags if f not in (x509.ReasonFlags.unspecified,))]


def _responder_cert(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test OCSP Responder")])
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(99).not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )  # fmt: skip


def _utc(t: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(t, dt.UTC)


def test_hand_built_response_data_equals_cryptography_byte_for_byte() -> None:
    """Many random answers of every kind: the hand-built ResponseData, and the whole response with the same
    signature spliced in, are exactly what cryptography's builder makes."""
    rng = random.Random(15)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _responder_cert(key)
    maker = ResponseMaker(cert, hashes.SHA256())
    kinds = {"good": 0, "unknown": 0, "revoked": 0, "non-issued": 0, "nonce": 0}
    for _ in range(400):
        alg = rng.choice(_HASHES)
        name_hash, key_hash = rng.randbytes(alg.digest_size), rng.randbytes(alg.digest_size)
        serial = rng.getrandbits(rng.randint(1, 159))
        this_update = rng.randint(0, 4_000_000_000)
        next_update = this_update + rng.randint(1, 10**6)
        kind = rng.choice(["good", "unknown", "revoked", "non-issued"])
        kinds[kind] += 1
        status, revoked_at, reason = C.GOOD, None, None
        if kind == "unknown":
            status = C.UNKNOWN
        elif kind == "revoked":
            status, revoked_at, reason = C.REVOKED, rng.randint(0, this_update), rng.choice(_REASONS)
        elif kind == "non-issued":
            status, revoked_at, reason = C.REVOKED, 0, x509.ReasonFlags.certificate_hold
        nonce = rng.randbytes(rng.randint(1, 32)) if rng.random() < 0.3 else None
        kinds["nonce"] += nonce is not None
        builder = (
            ocsp.OCSPResponseBuilder()
            .add_response_by_hash(
                name_hash,
                key_hash,
                serial,
                alg,
                status,
                _utc(this_update),
                _utc(next_update),
                None if revoked_at is None else _utc(revoked_at),
                reason,
            )
            .responder_id(ocsp.OCSPResponderEncoding.HASH, cert)
            .certificates([cert])
        )
        if kind == "non-issued":
            builder = builder.add_extension(
                x509.UnrecognizedExtension(EXTENDED_REVOKE_OID, b"\x05\x00"), False
            )
        if nonce is not None:
            builder = builder.add_extension(x509.OCSPNonce(nonce), critical=False)
        theirs = builder.sign(key, hashes.SHA256())
        ours = maker.make(
            alg.name, name_hash, key_hash, serial, status, this_update, next_update, revoked_at, reason,
            extended_revoke=kind == "non-issued", nonce=nonce,
            produced_at=int(theirs.produced_at_utc.timestamp()),
        )  # fmt: skip
        assert ours.tbs == theirs.tbs_response_bytes
        assert ours.response(theirs.signature) == theirs.public_bytes(serialization.Encoding.DER)
    assert min(kinds.values()) > 20, kinds


def test_plain_request_is_the_encoding_clients_send() -> None:
    rng = random.Random(5019)
    for _ in range(200):
        alg = rng.choice(_HASHES)
        name_hash, key_hash = rng.randbytes(alg.digest_size), rng.randbytes(alg.digest_size)
        serial = rng.getrandbits(rng.randint(1, 159))
        theirs = (
            ocsp.OCSPRequestBuilder()
            .add_certificate_by_hash(name_hash, key_hash, serial, alg)
            .build()
            .public_bytes(serialization.Encoding.DER)
        )
        assert plain_request(alg.name, name_hash, key_hash, serial) == theirs


def _parse(answer: Any) -> ocsp.OCSPResponse:
    assert answer is not None
    return ocsp.load_der_ocsp_response(answer.der if hasattr(answer, "der") else answer)


def _check_signed(va: Va, responder: OcspResponder, resp: ocsp.OCSPResponse) -> None:
    signer = responder.signer("issuing")
    assert signer is not None and resp.certificates == [signer.cert]
    key = signer.cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and resp.signature_hash_algorithm is not None
    key.verify(resp.signature, resp.tbs_response_bytes, ec.ECDSA(resp.signature_hash_algorithm))


def _revoke(va: Va, device: str) -> None:
    va.journal.call(
        va.journal.transaction,
        lambda c: rv.revoke_in_transaction(
            c, va.audit, "sam", [(va.serial(device), "issuing", device)], rv.Reason.KEY_COMPROMISE, rv.Source.CLI,
            now=time.time(),
        ),
        "revoking",
    )  # fmt: skip


async def test_presigned_answers_and_a_revocation_drops_the_good_one(va: Va) -> None:
    responder = OcspResponder(va.journal, va.token, va.audit, presign_max=100, validity_s=3600)
    await asyncio.to_thread(responder.load)
    made = await responder.presign()
    assert made >= len(DEVICES)
    assert await responder.presign() == 0  # all fresh: nothing to sign again
    signed = responder.signed
    for device in DEVICES:
        resp = _parse(responder.fast(va.request(device)))  # the bytes openssl / cryptography send
        assert resp.certificate_status == C.GOOD and resp.serial_number == va.cert(device).serial_number
        _check_signed(va, responder, resp)
        assert resp.next_update_utc is not None
        assert resp.next_update_utc - resp.this_update_utc == dt.timedelta(seconds=3600)
        assert resp.this_update_utc <= dt.datetime.now(dt.UTC)
    assert responder.signed == signed  # served without a signature

    req = va.request("SN-0002")
    _revoke(va, "SN-0002")
    await responder.arefresh()  # what the poll (or VA.changed(), in-process) does
    assert responder.fast(req) is None  # the pre-produced GOOD answer is gone ...
    assert _parse(await responder.aanswer(req)).certificate_status == C.REVOKED  # ... the next one says so
    await responder.presign()
    again = _parse(responder.fast(req))
    assert (
        again.certificate_status == C.REVOKED and again.revocation_reason == x509.ReasonFlags.key_compromise
    )


async def test_a_revocation_while_its_batch_is_signed_is_not_stored(va: Va) -> None:
    responder = OcspResponder(va.journal, va.token, va.audit, presign_max=100)
    await asyncio.to_thread(responder.load)
    signing = responder._signing["issuing"]
    real = signing.key

    class RevokingKey:
        async def asign_many(self, items: list[bytes]) -> list[bytes]:
            _revoke(va, "SN-0003")  # another process revokes while the HSM signs ...
            await responder.arefresh()  # ... and the poll sees it before the batch is stored
            return list(await real.asign_many(items))

    signing.key = RevokingKey()
    await responder.presign()
    signing.key = real
    assert responder.fast(va.request("SN-0003")) is None
    assert _parse(responder.fast(va.request("SN-0001"))).certificate_status == C.GOOD
    assert _parse(await responder.aanswer(va.request("SN-0003"))).certificate_status == C.REVOKED


async def _read_response(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line[15:]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")
    )
    return head, await reader.readexactly(length)


def _post(body: bytes) -> bytes:
    return b"POST /ocsp HTTP/1.1\r\nHost: va\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


async def test_line_listener_answers_pipelined_requests_in_order(va: Va) -> None:
    responder = OcspResponder(va.journal, va.token, va.audit, presign_max=100)
    await asyncio.to_thread(responder.load)
    await responder.presign()
    _revoke(va, "SN-0005")
    await responder.arefresh()
    nonce = bytes(range(16))
    import base64

    get_path = base64.b64encode(va.request("SN-0004")).decode()
    async with OcspListener(responder, "127.0.0.1", free_ports(1)) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        signed = responder.signed
        writer.write(
            _post(va.request("SN-0000")) + f"GET /ocsp/{get_path} HTTP/1.1\r\nHost: va\r\n\r\n".encode()
            + _post(va.request("SN-0002")) + _post(va.request("SN-0001", nonce=nonce)) + _post(va.request("SN-0005"))
        )  # fmt: skip
        answers = [await _read_response(reader) for _ in range(5)]
        order = ("SN-0000", "SN-0004", "SN-0002", "SN-0001", "SN-0005")
        parsed = [ocsp.load_der_ocsp_response(body) for _, body in answers]
        assert [r.serial_number for r in parsed] == [va.cert(d).serial_number for d in order]
        assert [r.certificate_status for r in parsed] == [C.GOOD, C.GOOD, C.GOOD, C.GOOD, C.REVOKED]
        assert parsed[3].extensions.get_extension_for_class(x509.OCSPNonce).value.nonce == nonce
        assert b"max-age=" in answers[1][0] and b"no-store" in answers[0][0]
        assert server.fast == 3  # the first three from their bytes alone, pre-produced
        assert responder.signed == signed + 2  # the nonce answer and the revoked one
        # A body over the limit: malformedRequest, and the connection ends without reading it.
        writer.write(b"POST /ocsp HTTP/1.1\r\nContent-Length: 100000\r\n\r\n")
        _, body = await _read_response(reader)
        assert ocsp.load_der_ocsp_response(body).response_status == ocsp.OCSPResponseStatus.MALFORMED_REQUEST
        assert await reader.read() == b""
        writer.close()


@pytest.mark.parametrize("head", [b"GET /crl/x.crl HTTP/1.1\r\n\r\n", b"BREW /ocsp HTTP/1.1\r\n\r\n"])
async def test_line_listener_refuses_what_it_does_not_serve(va: Va, head: bytes) -> None:
    responder = OcspResponder(va.journal, va.token, va.audit)
    await asyncio.to_thread(responder.load)
    async with OcspListener(responder, "127.0.0.1", free_ports(1)) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(head)
        assert (await reader.read()).startswith(b"HTTP/1.1 404")
        writer.close()


async def test_openssl_against_the_line_listener_of_a_presigning_va(va: Va, tmp_path: Path) -> None:
    """The VA as the daemon runs it with [va] presign_max and ocsp_listen: its poll makes the answers, and
    openssl (-no_nonce: answered from bytes alone; -nonce: signed fresh) verifies them through the listener."""
    root, issuing = tmp_path / "root.pem", tmp_path / "issuing.pem"
    root.write_bytes(va.root.certificate.public_bytes(serialization.Encoding.PEM))
    issuing.write_bytes(va.issuing.certificate.public_bytes(serialization.Encoding.PEM))
    files = Files(root, issuing, tmp_path)
    good = files.cert("good", va.cert("SN-0001"))
    settings = VaSettings(presign_max=100, poll_s=0.05)
    async with ValidationAuthority(va.journal, va.token, va.audit, settings) as authority:
        responder = authority.responder
        deadline = time.monotonic() + 60
        while responder.presigned < len(DEVICES):
            assert time.monotonic() < deadline, "the poll never pre-signed"
            await asyncio.sleep(0.05)
        async with OcspListener(responder, "127.0.0.1", free_ports(1)) as server:
            signed = responder.signed
            rc, out = await ocsp_query(server.url, files, good, "-no_nonce")
            assert rc == 0 and "Response verify OK" in out and f"{good}: good" in out, out
            assert server.fast == 1 and responder.signed == signed
            rc, out = await ocsp_query(server.url, files, good, "-nonce")
            assert rc == 0 and "Response verify OK" in out and f"{good}: good" in out, out
            assert "WARNING: no nonce in response" not in out and responder.signed == signed + 1


def test_config_keys_reach_the_line_listener_and_presigning(tmp_path: Path) -> None:
    base = {"hsm": {"module": "m", "token_label": "t", "pin_file": "p"}}
    va = parse_config({**base, "va": {"ocsp_listen": "127.0.0.1:7460", "presign_max": 5000, "presign_batch": 64}},
                      base_dir=tmp_path).va  # fmt: skip
    assert va.ocsp_address == ("127.0.0.1", 7460)
    assert (va.settings.presign_max, va.settings.presign_batch) == (5000, 64)
    defaults = parse_config(base, base_dir=tmp_path).va
    assert defaults.ocsp_address is None and defaults.settings.presign_max == 0
    with pytest.raises(ConfigError) as info:
        parse_config({**base, "va": {"ocsp_listen": "nowhere", "presign_batch": 0}}, base_dir=tmp_path)
    assert {p.where for p in info.value.problems} == {"va.ocsp_listen", "va.presign_batch"}
    with pytest.raises(ConfigError) as info:
        parse_config(
            {**base, "va": {"listen": "127.0.0.1:7451", "ocsp_listen": "127.0.0.1:7451"}}, base_dir=tmp_path
        )
    assert "va.ocsp_listen" in str(info.value)


async def test_line_listener_stops_reading_a_client_that_does_not_read(va: Va) -> None:
    """Pipelined requests from a client that never reads its answers: the listener stops reading once its send
    buffer is full, instead of piling answers up in memory; when the client reads, every answer arrives."""
    responder = OcspResponder(
        va.journal, va.token, va.audit, presign_max=100, request_rate=1e6, request_burst=10**6
    )
    await asyncio.to_thread(responder.load)
    await responder.presign()
    request = _post(va.request("SN-0000"))
    count = 20_000  # ~2 MB of requests, ~20 MB of answers
    async with OcspListener(responder, "127.0.0.1", free_ports(1)) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.transport.set_write_buffer_limits(high=64 * 1024 * 1024)  # our side never pauses
        writer.write(request * count)
        deadline = time.monotonic() + 60
        while not any(not c.reading and not c.writable for c in server.conns):
            assert time.monotonic() < deadline, "the listener never stopped reading"
            await asyncio.sleep(0.01)
        (conn,) = server.conns
        assert conn.transport is not None
        assert conn.transport.get_write_buffer_size() < 8 * 1024 * 1024
        assert server.requests < count
        for _ in range(count):
            _, body = await _read_response(reader)
        assert ocsp.load_der_ocsp_response(body).certificate_status == C.GOOD
        assert server.requests == count
        writer.close()


async def test_nonce_answers_sign_one_batch_while_the_one_before_is_finished(va: Va) -> None:
    """Fresh answers (a nonce each) are signed in batches, two batches in flight (SIGN_BATCHES_IN_FLIGHT): the
    HSM signs the next batch while the answers of the one before are verified, and a third waits. Each answer
    still echoes its nonce and verifies."""
    from appliance.va.ocsp_batches import SIGN_BATCHES_IN_FLIGHT

    responder = OcspResponder(va.journal, va.token, va.audit, max_inflight_signs=64)
    await asyncio.to_thread(responder.load)
    signing = responder._signing["issuing"]
    real = signing.key
    calls: list[int] = []
    release = asyncio.Event()
    active = [0, 0]  # now, most at once

    class HoldingKey:
        async def asign_many(self, items: list[bytes]) -> list[bytes]:
            calls.append(len(items))
            active[0] += 1
            active[1] = max(active[1], active[0])
            try:
                await release.wait()
                return list(await real.asign_many(items))
            finally:
                active[0] -= 1

    signing.key = HoldingKey()
    nonces = [bytes([i]) * 16 for i in range(9)]

    def ask(i: int) -> asyncio.Task[Any]:
        return asyncio.create_task(responder.aanswer(va.request(f"SN-{i % 6:04d}", nonce=nonces[i])))

    async def until(what: str, cond: Any) -> None:
        deadline = time.monotonic() + 120  # a hang guard, not a timing assertion
        while not cond():
            assert time.monotonic() < deadline, what
            await asyncio.sleep(0.005)

    tasks = [ask(0)]
    await until("the first batch at the HSM", lambda: len(calls) == 1)
    tasks += [ask(i) for i in range(1, 6)]
    await until("a second batch at the HSM while the first is held", lambda: len(calls) == 2)
    tasks += [ask(i) for i in range(6, 9)]
    await until("three more answers queued behind two batches", lambda: len(responder._to_sign) >= 3)
    assert len(calls) == 2 and active[0] == SIGN_BATCHES_IN_FLIGHT == 2  # the third batch waits
    release.set()
    answers = [await t for t in tasks]
    signing.key = real
    assert sum(calls) == 9 and len(calls) >= 3 and active[1] == 2
    for nonce, answer in zip(nonces, answers, strict=True):
        resp = _parse(answer)
        assert resp.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce == nonce
        signer = resp.certificates[0].public_key()
        assert isinstance(signer, ec.EllipticCurvePublicKey) and resp.signature_hash_algorithm is not None
        signer.verify(resp.signature, resp.tbs_response_bytes, ec.ECDSA(resp.signature_hash_algorithm))


async def test_changes_are_remembered_only_during_a_presign_pass(va: Va) -> None:
    """Every issuance and revocation the refresh sees is a change; only a presign pass needs them (to keep an
    answer signed before its change out of the cache). Kept outside a pass they grew by one entry per
    certificate for as long as the daemon ran (~400 bytes each: a leak found with tracemalloc over 12,000
    devices)."""
    responder = OcspResponder(va.journal, va.token, va.audit, presign_max=100)
    await asyncio.to_thread(responder.load)
    await responder.arefresh()
    _revoke(va, "SN-0001")
    await responder.arefresh()
    assert responder._changed == set()  # no pass running: nothing kept
    assert await responder.presign() > 0
    assert responder._changed == set()  # a pass forgets its changes when it ends
    # ... and still honours them while it runs (test_a_revocation_while_its_batch_is_signed_is_not_stored).
