"""The EST server's HTTP side (RFC 7030 3.2.2), served over TLS only, through appliance.httplisten.HttpListener:

    GET  /.well-known/est/cacerts                 POST /.well-known/est/simpleenroll
    GET  /.well-known/est/csrattrs                POST /.well-known/est/simplereenroll
                                                  POST /.well-known/est/serverkeygen  (labels with serverkeygen)
    ... and the same under /.well-known/est/<label>/ for a label of [est.labels]

The listener is TLS, always: there is no plain-HTTP EST, so HTTP Basic never travels in the clear. A TLS client
certificate is optional at the handshake (a fixture with only a password has none); when one is sent, OpenSSL
verifies it against the anchors loaded into the context (the management CA, this appliance's CAs, the labels'
idevid_roots) and the handshake fails if it does not chain; which anchor counts for which label is decided per
request (appliance/est/auth.py).

Refusals are the HTTP status and a one-line text body (RFC 7030 4.2.3); 413 for a body above the limit (judged
before reading it), 415 for a POST that is not application/pkcs10, 404 for an unknown label or operation.
"""

from __future__ import annotations

import secrets
import ssl
from collections.abc import Callable, Iterable
from pathlib import Path

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from appliance.errors import ReasonCode
from appliance.est.auth import TlsPeer
from appliance.est.binding import binding
from appliance.est.errors import EstError, refuse
from appliance.est.responder import EstResponder
from appliance.est.wire import (
    CT_CERTS_ONLY,
    CT_CSRATTRS,
    CT_PKCS8,
    CT_PKCS10,
    certs_only,
    encode_body,
    multipart,
)
from appliance.httpbody import read_limited

RESPONDER_KEY: web.AppKey[EstResponder] = web.AppKey("est", EstResponder)
PREFIX = "/.well-known/est"
_GET = ("cacerts", "csrattrs")
_POST = ("simpleenroll", "simplereenroll", "serverkeygen")


def server_context(
    cert: Path,
    key: Path,
    anchors: Iterable[x509.Certificate],
    policy: Callable[[ssl.SSLContext], ssl.SSLContext],
) -> ssl.SSLContext:
    """The EST listener's TLS: the appliance's server certificate, client certificates optional and verified
    against `anchors`. `policy` restricts versions and suites: the daemon passes the station link's
    (stations/tls.py apply_tls_policy), which the appliance core does not import itself (pyproject.toml's
    import-linter contracts)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    policy(ctx)
    ctx.load_cert_chain(cert, key)
    pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in anchors)
    if pem:
        ctx.load_verify_locations(cadata=pem.decode())
    ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


def _tls(request: web.Request) -> TlsPeer:
    obj = request.transport.get_extra_info("ssl_object") if request.transport is not None else None
    if not isinstance(obj, ssl.SSLObject | ssl.SSLSocket):
        raise refuse(400, ReasonCode.BAD_REQUEST, "EST is served over TLS only")
    der = obj.getpeercert(binary_form=True)
    cert = None
    if der:
        try:
            cert = x509.load_der_x509_certificate(der)
        except ValueError:
            raise refuse(400, ReasonCode.BAD_REQUEST, "the TLS client certificate does not decode") from None
    return TlsPeer(obj.version() or "", cert, (), binding(obj))


def _error(exc: EstError) -> web.Response:
    headers = {}
    if exc.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, round(exc.retry_after_s)))
    if exc.basic_realm is not None:
        headers["WWW-Authenticate"] = f'Basic realm="{exc.basic_realm}", charset="UTF-8"'
    if exc.allow is not None:
        headers["Allow"] = exc.allow  # RFC 9110 15.5.6: a 405 MUST say what is allowed
    response = web.Response(status=exc.status, body=exc.body(), headers=headers, content_type="text/plain",
                            charset="utf-8")  # fmt: skip
    if exc.status == 413:
        response.force_close()  # the rest of the body is never read
    return response


async def _read(request: web.Request, responder: EstResponder) -> bytes:
    if request.content_type != CT_PKCS10:
        raise refuse(415, ReasonCode.BAD_REQUEST, f"Content-Type must be {CT_PKCS10}")
    body = await read_limited(request, responder.settings.max_request_bytes)
    if body is None:
        raise refuse(413, ReasonCode.BAD_CSR, f"the body is above the limit of"
                     f" {responder.settings.max_request_bytes} bytes")  # fmt: skip
    return body


async def est_handler(request: web.Request) -> web.StreamResponse:
    responder = request.app[RESPONDER_KEY]
    operation = request.match_info["operation"]
    try:
        label = responder.label(request.match_info.get("label"))
        if operation in _GET and request.method in ("GET", "HEAD"):  # GET implies HEAD (RFC 9110 9.3.2)
            if operation == "cacerts":
                return _ok(responder.cacerts(label), CT_CERTS_ONLY)
            return _ok(responder.csrattrs(label), CT_CSRATTRS)
        if operation in _POST and request.method == "POST":
            tls = _tls(request)
            body = await _read(request, responder)
            if operation == "serverkeygen":
                key, issued = await responder.serverkeygen(label, tls, request.headers.get("Authorization"),
                                                           request.remote or "?", body)  # fmt: skip
                p7 = certs_only([x509.load_der_x509_certificate(issued.certificate)])
                content_type, parts = multipart([(CT_PKCS8, key), (CT_CERTS_ONLY, p7)],
                                                f"est-{secrets.token_hex(12)}")  # fmt: skip
                return web.Response(
                    body=parts, headers={"Content-Type": content_type, "Cache-Control": "no-store"}
                )
            if operation == "simpleenroll":
                issued = await responder.simpleenroll(label, tls, request.headers.get("Authorization"),
                                                      request.remote or "?", body)  # fmt: skip
            else:
                issued = await responder.simplereenroll(label, tls, body)
            p7 = certs_only([x509.load_der_x509_certificate(issued.certificate)])
            return _ok(p7, CT_CERTS_ONLY)
        if operation in (*_GET, *_POST):
            get = operation in _GET
            raise refuse(405, ReasonCode.BAD_REQUEST, f"{operation} is {'GET' if get else 'POST'}",
                         allow="GET, HEAD" if get else "POST")  # fmt: skip
        raise refuse(404, ReasonCode.BAD_REQUEST, "no such EST operation")
    except EstError as exc:
        # A configured label only (an unknown one from the path is "-": the budget is kept per label).
        name = request.match_info.get("label") or responder.settings.default_label
        known = operation if operation in (*_GET, *_POST) else "-"
        await responder.refused(name if name in responder.labels else "-", known, request.remote or "?", exc)
        return _error(exc)


async def elsewhere(request: web.Request) -> web.StreamResponse:
    """Any other path: refused as every EST refusal is (status, one line with the reason code), not with the HTTP
    library's own text, and audited under label "-"."""
    exc = refuse(404, ReasonCode.BAD_REQUEST,
                 f"no such EST resource: the paths are {PREFIX}/<operation> and {PREFIX}/<label>/<operation>")  # fmt: skip
    await request.app[RESPONDER_KEY].refused("-", "-", request.remote or "?", exc)
    return _error(exc)


def _ok(der: bytes, content_type: str) -> web.Response:
    """A successful answer: base64 of the DER (RFC 8951 3.1), no Content-Transfer-Encoding."""
    return web.Response(body=encode_body(der), headers={"Content-Type": content_type})


def make_est_app(responder: EstResponder) -> web.Application:
    """The EST server's HTTP application; serve it with HttpListener(..., tls=TlsServing(server_context(...)))."""
    app = web.Application(client_max_size=responder.settings.max_request_bytes + 1)
    app[RESPONDER_KEY] = responder
    for path in (f"{PREFIX}/{{operation}}", f"{PREFIX}/{{label}}/{{operation}}"):
        app.router.add_route("*", path, est_handler)
    app.router.add_route("*", "/{path:.*}", elsewhere)  # last: the routes above match first
    return app


__all__ = ["PREFIX", "EstResponder", "make_est_app", "server_context"]
