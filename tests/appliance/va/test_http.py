"""The VA over HTTP on 127.0.0.1: CRL and OCSP (POST and GET), caching headers, size limits, shutdown."""

from __future__ import annotations

import asyncio
import base64
import urllib.parse
from collections.abc import AsyncIterator

import aiohttp
import pytest
from cryptography import x509
from cryptography.x509 import ocsp

from appliance.va import revocation as rv
from appliance.va.crl import CrlPublisher
from appliance.va.http import VaServer, make_app
from appliance.va.ocsp import OcspResponder
from appliance.va.service import ValidationAuthority, VaSettings
from tests.appliance.va.conftest import Va

S = ocsp.OCSPResponseStatus


@pytest.fixture
async def served(va: Va) -> AsyncIterator[tuple[ValidationAuthority, str]]:
    settings = VaSettings(poll_s=0.05, max_request_bytes=1024)
    authority = ValidationAuthority(va.journal, va.token, va.audit, settings)
    async with authority, VaServer(make_app(authority), "127.0.0.1", 0) as server:
        assert server.address[0] == "127.0.0.1"
        yield authority, server.url


async def post(url: str, body: bytes) -> tuple[aiohttp.ClientResponse, bytes]:
    async with (
        aiohttp.ClientSession() as s,
        s.post(url + "/ocsp", data=body, headers={"Content-Type": "application/ocsp-request"}) as r,
    ):
        return r, await r.read()


async def test_crl_download_with_cache_headers_and_conditional_get(
    va: Va, served: tuple[ValidationAuthority, str]
) -> None:
    _, url = served
    async with aiohttp.ClientSession() as s:
        async with s.get(url + "/crl/issuing.crl") as r:
            assert r.status == 200 and r.headers["Content-Type"] == "application/pkix-crl"
            crl = x509.load_der_x509_crl(await r.read())
            etag = r.headers["ETag"]
            assert (
                "max-age=" in r.headers["Cache-Control"]
                and r.headers["Last-Modified"]
                and r.headers["Expires"]
            )
        assert crl.is_signature_valid(va.issuing.certificate.public_key())  # type: ignore[arg-type]
        async with s.get(url + "/crl/issuing.crl", headers={"If-None-Match": etag}) as r:
            assert r.status == 304
        for missing in ("/crl/root.crl", "/crl/nope.crl", "/crl/issuing"):
            async with s.get(url + missing) as r:
                assert r.status == 404


async def test_crl_follows_a_revocation(va: Va, served: tuple[ValidationAuthority, str]) -> None:
    authority, url = served
    await asyncio.to_thread(
        rv.revoke, va.journal, va.audit, va.supervisor, device_serial="SN-0001", reason="keyCompromise"
    )
    authority.changed()
    serial = va.cert("SN-0001").serial_number
    async with aiohttp.ClientSession() as s:
        for _ in range(100):
            async with s.get(url + "/crl/issuing.crl") as r:
                crl = x509.load_der_x509_crl(await r.read())
            if crl.get_revoked_certificate_by_serial_number(serial) is not None:
                break
            await asyncio.sleep(0.02)
    assert crl.get_revoked_certificate_by_serial_number(serial) is not None


async def test_ocsp_post_and_get_forms(va: Va, served: tuple[ValidationAuthority, str]) -> None:
    _, url = served
    req = va.request("SN-0001")
    r, body = await post(url, req)
    assert r.status == 200 and r.headers["Content-Type"] == "application/ocsp-response"
    assert r.headers["Cache-Control"] == "no-store"
    assert ocsp.load_der_ocsp_response(body).certificate_status == ocsp.OCSPCertStatus.GOOD
    b64 = base64.b64encode(req).decode()
    forms = [urllib.parse.quote(b64, safe=""), b64, base64.urlsafe_b64encode(req).decode().rstrip("=")]
    async with aiohttp.ClientSession() as s:
        for form in forms:
            async with s.get(url + "/ocsp/" + form) as g:
                assert g.status == 200
                resp = ocsp.load_der_ocsp_response(await g.read())
                assert resp.certificate_status == ocsp.OCSPCertStatus.GOOD, form
                assert "public, max-age=" in g.headers["Cache-Control"] and g.headers["ETag"]
                etag = g.headers["ETag"]
        async with s.get(url + "/ocsp/" + forms[0], headers={"If-None-Match": etag}) as g:
            assert g.status == 304
        async with s.get(url + "/ocsp/not*base64!") as g:
            assert ocsp.load_der_ocsp_response(await g.read()).response_status == S.MALFORMED_REQUEST
            assert g.headers["Cache-Control"] == "no-store"


async def test_oversize_and_malformed_bodies_get_malformed_request_and_the_server_stays_up(
    va: Va, served: tuple[ValidationAuthority, str]
) -> None:
    _, url = served
    for body in (b"x" * 5000, b"", b"\x30\x03\x02\x01\x01"):
        r, data = await post(url, body)
        assert r.status == 200 and ocsp.load_der_ocsp_response(data).response_status == S.MALFORMED_REQUEST

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"y" * 512

    async with aiohttp.ClientSession() as s, s.post(url + "/ocsp", data=chunks()) as r:
        assert ocsp.load_der_ocsp_response(await r.read()).response_status == S.MALFORMED_REQUEST
    r, data = await post(url, va.request("SN-0001"))
    assert ocsp.load_der_ocsp_response(data).certificate_status == ocsp.OCSPCertStatus.GOOD


async def test_shutdown_stops_the_named_tasks(va: Va) -> None:
    authority = ValidationAuthority(va.journal, va.token, va.audit, VaSettings(poll_s=0.05))
    async with authority:
        names = {t.get_name() for t in asyncio.all_tasks()}
        assert {CrlPublisher.TASK_NAME, OcspResponder.TASK_NAME} <= names
        assert authority.crls.running and authority.responder.running
    names = {t.get_name() for t in asyncio.all_tasks()}
    assert not {CrlPublisher.TASK_NAME, OcspResponder.TASK_NAME} & names
    assert not authority.crls.running and not authority.responder.running
