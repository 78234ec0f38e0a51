"""The validation authority over HTTP (aiohttp): CRLs and OCSP on the appliance's LAN side.

    GET  /crl/<ca-name>.crl        the latest full CRL, DER (application/pkix-crl)
    POST /ocsp                     RFC 6960 request body (application/ocsp-request)
    GET  /ocsp/<base64 request>    RFC 6960 appendix A.1 (standard or URL-safe base64, percent-encoded or not)

These URLs are what profiles put in crl_urls (CRL Distribution Points) and ocsp_url (AIA): for a VA at
http://HOST:PORT they are http://HOST:PORT/crl/<issuing-ca>.crl and http://HOST:PORT/ocsp.

A request body longer than the limit is refused from its Content-Length before a byte of it is read (and
while reading, for chunked bodies), with an OCSP malformedRequest answer and the connection closed. Nothing
here signs a CRL, and OCSP answers come from the responder's cache whenever it has one.

Every request, OCSP or CRL, is first paced to its client's request rate (OcspResponder.admit, one budget per
client for both): a client over it waits, its connection displaceable meanwhile (appliance.httplisten.held); one
far over it gets OCSP tryLater, or for a CRL 503 with Retry-After. A request whose connection is gone by then is
not worked on.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import email.utils
import time
import urllib.parse

from aiohttp import web
from cryptography.x509 import ocsp

from appliance.httpbody import read_limited
from appliance.httplisten import HttpListener, gone, held
from appliance.va.ocsp import MALFORMED, TRY_LATER, OcspAnswer
from appliance.va.service import ValidationAuthority

OCSP_RESPONSE_TYPE = "application/ocsp-response"
CRL_TYPE = "application/pkix-crl"
VA_KEY: web.AppKey[ValidationAuthority] = web.AppKey("va", ValidationAuthority)


def _http_date(t: float) -> str:
    return email.utils.format_datetime(dt.datetime.fromtimestamp(int(t), dt.UTC), usegmt=True)


def _max_age(va: ValidationAuthority, next_update: float) -> int:
    return max(0, min(va.settings.http_max_age_s, int(next_update - time.time())))


def _ocsp_response(
    request: web.Request, va: ValidationAuthority, answer: OcspAnswer, *, get: bool
) -> web.Response:
    headers = {"Content-Type": OCSP_RESPONSE_TYPE}
    if answer.status != ocsp.OCSPResponseStatus.SUCCESSFUL or not answer.cacheable or not get:
        headers["Cache-Control"] = "no-store"
    else:
        assert answer.next_update is not None and answer.produced_at is not None
        headers.update({
            "Cache-Control": f"public, max-age={_max_age(va, answer.next_update)}, no-transform, must-revalidate",
            "ETag": answer.etag, "Last-Modified": _http_date(answer.produced_at),
            "Expires": _http_date(answer.next_update),
        })  # fmt: skip
        if answer.etag in request.headers.getall("If-None-Match", []):
            return web.Response(status=304, headers={k: v for k, v in headers.items() if k != "Content-Type"})
    return web.Response(body=answer.der, headers=headers)


def _peer(request: web.Request) -> str:
    # The TCP peer, never a forwarded-for header: it is whom the OCSP signing budget is charged to.
    return request.remote or "unknown"


class _Gone(ConnectionResetError):
    """The connection ended while its request was held: nothing is worked on or answered (the listener's
    middleware drops the request quietly)."""


async def _admit(request: web.Request, va: ValidationAuthority) -> bool:
    """Pace the client (see the module docstring): True within its rate. _Gone when the connection ended."""
    with held(request):
        admitted = await va.responder.admit(_peer(request))
    if gone(request):
        raise _Gone
    return admitted


async def ocsp_post(request: web.Request) -> web.Response:
    va = request.app[VA_KEY]
    if not await _admit(request, va):
        return _ocsp_response(request, va, TRY_LATER, get=False)
    body = await read_limited(request, va.settings.max_request_bytes)
    if body is None:
        response = _ocsp_response(request, va, MALFORMED, get=False)
        response.force_close()  # the rest of the body is never read
        return response
    return _ocsp_response(request, va, await va.responder.aanswer(body, _peer(request)), get=False)


def decode_get_request(raw_path_tail: str, limit: int) -> bytes | None:
    """The DER request of RFC 6960 A.1 from the path after /ocsp/, or None when it is not base64 or too long."""
    if len(raw_path_tail) > 3 * limit:  # percent-encoding at most triples base64's 4/3
        return None
    text = urllib.parse.unquote(raw_path_tail).replace(" ", "+").strip()
    text = text.replace("-", "+").replace("_", "/")
    text += "=" * (-len(text) % 4)
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    return data if len(data) <= limit else None


async def ocsp_get(request: web.Request) -> web.Response:
    va = request.app[VA_KEY]
    if not await _admit(request, va):
        return _ocsp_response(request, va, TRY_LATER, get=True)
    tail = request.rel_url.raw_path.split("/ocsp/", 1)[-1]
    der = decode_get_request(tail, va.settings.max_request_bytes)
    answer = MALFORMED if der is None else await va.responder.aanswer(der, _peer(request))
    return _ocsp_response(request, va, answer, get=True)


async def crl_get(request: web.Request) -> web.Response:
    va = request.app[VA_KEY]
    if not await _admit(request, va):
        raise web.HTTPServiceUnavailable(
            text="too many requests (from this address, or from all while certificates are issued): retry\n",
            headers={"Retry-After": "1", "Cache-Control": "no-store"},
        )
    info = va.crls.current(request.match_info["name"])
    if info is None:
        raise web.HTTPNotFound(text="no such CRL\n")
    etag = f'"{info.ca}-{info.number}"'
    headers = {
        "Content-Type": CRL_TYPE,
        "Cache-Control": f"public, max-age={_max_age(va, info.next_update)}, no-transform, must-revalidate",
        "ETag": etag, "Last-Modified": _http_date(info.this_update), "Expires": _http_date(info.next_update),
    }  # fmt: skip
    if etag in request.headers.getall("If-None-Match", []):
        del headers["Content-Type"]
        return web.Response(status=304, headers=headers)
    return web.Response(body=info.der, headers=headers)


def make_app(va: ValidationAuthority) -> web.Application:
    """The VA's HTTP application; the ValidationAuthority must be entered for as long as the app serves."""
    app = web.Application(client_max_size=va.settings.max_request_bytes + 1)
    app[VA_KEY] = va
    app.router.add_get("/crl/{name}.crl", crl_get)
    app.router.add_post("/ocsp", ocsp_post)
    app.router.add_post("/ocsp/", ocsp_post)
    app.router.add_get("/ocsp/{request:.+}", ocsp_get)
    return app


# The VA's listener is the appliance's one bounded HTTP listener (caps, header/body/idle deadlines); the CMP
# server is served by the same class.
VaServer = HttpListener
