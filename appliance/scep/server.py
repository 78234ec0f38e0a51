"""The SCEP server's HTTP side (RFC 8894 4.1): one URL per label, plain HTTP (the messages are signed and
encrypted themselves), served by the bounded listener every HTTP front end uses (appliance/httplisten.py).

    GET  /scep/<label>?operation=GetCACaps                 text/plain, one capability a line
    GET  /scep/<label>?operation=GetCACert                 application/x-x509-ca-ra-cert (certificates only)
    GET  /scep/<label>?operation=PKIOperation&message=B64  application/x-pki-message
    POST /scep/<label>?operation=PKIOperation              the pkiMessage as the body
    ... /scep?operation=...                                the same for [scep] default_label (404 without)

A path segment after the label (/scep/<label>/pkiclient.exe, as some clients append) is ignored. 404 for an
unknown label, 400 for an unknown operation or a message parameter that is not base64, 413 for a body above
`max_message_bytes` (judged from Content-Length before reading), 415 for a POST that says it is something else
than a pkiMessage; everything a pkiMessage can be answered with comes from ScepResponder.

A PKIOperation is admitted against its peer's budget and the shared one (appliance/admission.py) once its
message is in, before anything is done with it: over them, held up to pace_max_delay_s, then HTTP 503 with
Retry-After and the connection closed (docs/scep.md "Unauthenticated peers"). GetCACaps and GetCACert are answered
from memory (bytes built at start), cost no more than the HTTP exchange, and are not budgeted.
"""

from __future__ import annotations

import base64
import binascii
import urllib.parse

from aiohttp import web

from appliance.admission import Busy
from appliance.httpbody import read_limited
from appliance.httplisten import holder
from appliance.scep.responder import Answer, ScepResponder

CA_RA_CERT = "application/x-x509-ca-ra-cert"
# What a POSTed pkiMessage may say it is: RFC 8894's type, or what clients send (micromdm's scepclient:
# application/octet-stream, which is also what aiohttp reports for a body without a Content-Type).
POST_TYPES = frozenset({"application/x-pki-message", "application/octet-stream"})

RESPONDER_KEY: web.AppKey[ScepResponder] = web.AppKey("scep", ScepResponder)


def _text(status: int, text: str) -> web.Response:
    return web.Response(status=status, text=text + "\n")


def _query(request: web.Request) -> dict[str, str]:
    """The query parameters, decoded without turning '+' into a space: clients send base64 in `message` with
    '+' escaped (%2B) or not at all."""
    out: dict[str, str] = {}
    for part in request.rel_url.raw_query_string.split("&"):
        name, _, value = part.partition("=")
        out.setdefault(urllib.parse.unquote(name), urllib.parse.unquote(value))
    return out


def _label(request: web.Request, responder: ScepResponder) -> str | None:
    label = request.match_info.get("label", responder.default_label)
    return label if label and label in responder.labels else None


async def _operate(request: web.Request, responder: ScepResponder, label: str, data: bytes) -> web.Response:
    """Admitted once the message is in, before anything is done with it: a body still arriving costs only its
    connection (bounded by the listener), so trickling bodies never spend the budget all peers share. The TCP
    peer, never a forwarded-for header, is whom the budget is charged to."""
    try:
        ticket = await responder.admit(request.remote, holding=holder(request))
    except Busy as busy:
        response = web.Response(status=503, headers={"Retry-After": str(busy.retry_after_s)},
                                text=f"busy: retry after {busy.retry_after_s} s\n")  # fmt: skip
        response.force_close()
        return response
    return _response(await responder.operate(label, data, ticket=ticket))


def _response(answer: Answer) -> web.Response:
    return web.Response(status=answer.status, body=answer.body, content_type=answer.content_type,
                        headers=dict(answer.headers))  # fmt: skip


async def scep_get(request: web.Request) -> web.StreamResponse:
    responder = request.app[RESPONDER_KEY]
    label = _label(request, responder)
    if label is None:
        return _text(404, "no such SCEP label")
    params = _query(request)
    operation = params.get("operation", "")
    if operation == "GetCACaps":
        return web.Response(body=responder.capabilities(label), content_type="text/plain")
    if operation == "GetCACert":
        return web.Response(body=responder.ca_certificates(), content_type=CA_RA_CERT)
    if operation == "PKIOperation":
        text = "".join(params.get("message", "").split())
        if len(text) > responder.max_message_bytes * 4 // 3 + 4:
            return _text(413, "pkiMessage too large")
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            return _text(400, "the message parameter is not base64")
        if not data:
            return _text(400, "PKIOperation needs a message parameter")
        return await _operate(request, responder, label, data)
    return _text(400, "unknown operation: GetCACaps, GetCACert and PKIOperation are offered")


async def scep_post(request: web.Request) -> web.StreamResponse:
    responder = request.app[RESPONDER_KEY]
    label = _label(request, responder)
    if label is None:
        return _text(404, "no such SCEP label")
    if _query(request).get("operation", "PKIOperation") != "PKIOperation":
        return _text(400, "only PKIOperation is sent with POST")
    if request.content_type not in POST_TYPES:
        response = _text(415, "Content-Type must be application/x-pki-message")
        response.force_close()
        return response
    try:
        data = await read_limited(request, responder.max_message_bytes)
    except ConnectionError:
        # The peer went away (perhaps displaced while a request was held to its budget): nobody to answer.
        response = _text(400, "connection lost")
        response.force_close()
        return response
    if data is None:
        response = _text(413, "pkiMessage too large")
        response.force_close()  # the rest of the body is never read
        return response
    if not data:
        return _text(400, "PKIOperation needs a pkiMessage as the body")
    return await _operate(request, responder, label, data)


def make_scep_app(responder: ScepResponder) -> web.Application:
    """The SCEP server's HTTP application; serve it with appliance.httplisten.HttpListener."""
    app = web.Application(client_max_size=responder.max_message_bytes + 1)
    app[RESPONDER_KEY] = responder
    for path in ("/scep", "/scep/{label}", "/scep/{label}/{tail}"):
        app.router.add_get(path, scep_get)
        app.router.add_post(path, scep_post)
    return app
