"""The crash campaign's own CMP client: the project's CMP code (appliance/cmp/build.py, parse.py, header.py,
protection.py) speaking to the daemon over HTTP, as tests/appliance/cmp/* build and check messages.

One enrolment is ir (MAC, PasswordBasedMac with the label's secret, POP by the device key) -> ip; in RA mode
"waiting" -> pollReq / pollRep until the ip with the upstream's certificate; then certConf -> pkiConf. Every
answer is parsed with parse_message, matched to the request it answers (check_response: transactionID, nonces)
and its MAC verified with the label's secret before anything in it is believed. A refusal (a CMP error or an ip
rejection) raises CmpRefused; anything else going wrong (connection refused or cut by the kill, HTTP errors,
bad protection) raises CmpBroken.
"""

from __future__ import annotations

import asyncio

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from appliance.cmp.build import build_message, make_cert_request
from appliance.cmp.errors import CmpError
from appliance.cmp.header import check_response, follow_up_header, request_header
from appliance.cmp.model import (
    BodyType,
    CertConfBody,
    CertRepBody,
    CertReqBody,
    CertStatus,
    CertTemplate,
    ErrorBody,
    PKIMessage,
    PKIStatus,
    PollRepBody,
    PollReqBody,
)
from appliance.cmp.parse import parse_message
from appliance.cmp.protection import MacProtector, verify_mac

SPKI = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo


class CmpBroken(Exception):
    """No usable answer: the connection failed, the HTTP status was not 200, or the answer did not check out."""


class CmpRefused(Exception):
    """The server refused the request (error body, or a certificate response with status rejection)."""


async def _exchange(
    session: aiohttp.ClientSession, url: str, request: PKIMessage, secret: bytes
) -> PKIMessage:
    try:
        async with session.post(url, data=request.der, headers={"Content-Type": "application/pkixcmp"}) as r:
            body = await r.read()
            if r.status != 200:
                raise CmpBroken(f"HTTP {r.status}")
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise CmpBroken(f"{type(exc).__name__}: {exc}") from None
    try:
        answer = parse_message(body)
        check_response(answer, request.header)
        verify_mac(answer, secret)
    except CmpError as exc:
        raise CmpBroken(f"the answer does not check out: {exc}") from None
    if answer.body_type is BodyType.ERROR:
        assert isinstance(answer.body, ErrorBody)
        raise CmpRefused("error: " + " ".join(answer.body.status.status_string))
    return answer


async def enrol(
    url: str,
    kid: str,
    secret: bytes,
    key: ec.EllipticCurvePrivateKey,
    serial: str,
    *,
    timeout_s: float = 20.0,
) -> bytes:
    """The certificate (DER) the server issued for `serial` and `key`, confirmed with certConf."""
    subject = x509.Name([x509.NameAttribute(NameOID.SERIAL_NUMBER, serial)])
    sender = x509.DirectoryName(subject)
    recipient = x509.DirectoryName(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Birthline")]))
    mac = MacProtector(secret, kid.encode(), iterations=500)
    template = CertTemplate(subject=subject, public_key_der=key.public_key().public_bytes(*SPKI))
    body = CertReqBody((make_cert_request(template, pop_key=key),))
    request = build_message(request_header(sender=sender, recipient=recipient, sender_kid=kid.encode()),
                            BodyType.IR, body, protection=mac)  # fmt: skip
    client_timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(timeout=client_timeout) as session:
        answer = await _exchange(session, url, request, secret)
        while True:
            if answer.body_type is BodyType.POLLREP:
                assert isinstance(answer.body, PollRepBody)
                # checkAfter is whole seconds (at least 1); the campaign's upstream answers within a fraction
                await asyncio.sleep(0.3)
            elif answer.body_type is BodyType.IP:
                assert isinstance(answer.body, CertRepBody)
                (response,) = answer.body.responses
                if response.status.status is PKIStatus.REJECTION:
                    raise CmpRefused("rejection: " + " ".join(response.status.status_string))
                if response.status.status in (PKIStatus.ACCEPTED, PKIStatus.GRANTED_WITH_MODS):
                    if response.certificate is None:
                        raise CmpBroken("an accepted ip without a certificate")
                    cert = response.certificate
                    break
                if response.status.status is not PKIStatus.WAITING:
                    raise CmpBroken(f"ip status {response.status.status.name}")
            else:
                raise CmpBroken(f"unexpected {answer.body_type.asn1_name}")
            request = build_message(follow_up_header(answer.header, sender=sender, sender_kid=kid.encode()),
                                    BodyType.POLLREQ, PollReqBody((0,)), protection=mac)  # fmt: skip
            answer = await _exchange(session, url, request, secret)
        if cert.public_key().public_bytes(*SPKI) != key.public_key().public_bytes(*SPKI):
            raise CmpBroken("the certificate is not for the requested key")
        request = build_message(follow_up_header(answer.header, sender=sender, sender_kid=kid.encode()),
                                BodyType.CERTCONF, CertConfBody((CertStatus.for_certificate(cert),)),
                                protection=mac)  # fmt: skip
        answer = await _exchange(session, url, request, secret)
        if answer.body_type is not BodyType.PKICONF:
            raise CmpBroken(f"certConf answered with {answer.body_type.asn1_name}")
    return cert.public_bytes(serialization.Encoding.DER)
