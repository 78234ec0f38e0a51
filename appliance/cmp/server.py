"""The CMP server (RFC 9483 Lightweight CMP over RFC 9811 HTTP) on the appliance's LAN side.

    POST /.well-known/cmp[/<operation>]              the configured default label
    POST /.well-known/cmp/p/<label>[/<operation>]    a label of [cmp.labels]

This module is the HTTP side. Every request is first admitted against its peer's budget and the shared one
(appliance/admission.py) before a byte of its body is read: over them, HTTP 503 with Retry-After and the
connection closed. Then 404 for an unknown label, 415 for another Content-Type, 413 for a body above the limit
(judged from Content-Length before reading); the CMP answer (HTTP 200, or 400 for bytes that are no PKIMessage)
comes from CmpResponder (appliance/cmp/responder.py). Labels are appliance/cmp/labels.py, who may sign
appliance/cmp/trust.py, certificate requests appliance/cmp/enrol.py, revocation appliance/cmp/revoke.py
(docs/cmp.md "The server").
"""

from __future__ import annotations

from aiohttp import web

from appliance.admission import Busy
from appliance.cmp.enrol import csr_subject
from appliance.cmp.labels import (
    CmpLabel,
    CmpSettings,
    device_serial_of,
    labels_from_config,
    read_secret_file,
    settings_from_config,
)
from appliance.cmp.responder import CmpResponder
from appliance.httpbody import read_limited
from appliance.httplisten import holder

CONTENT_TYPE = "application/pkixcmp"
RA_KEY_LABEL = "cmp-ra"

__all__ = [
    "CONTENT_TYPE",
    "RA_KEY_LABEL",
    "RESPONDER_KEY",
    "CmpLabel",
    "CmpResponder",
    "CmpSettings",
    "cmp_post",
    "csr_subject",
    "device_serial_of",
    "labels_from_config",
    "make_cmp_app",
    "read_secret_file",
    "settings_from_config",
]


# -- HTTP ------------------------------------------------------------------------------------------------------------
RESPONDER_KEY: web.AppKey[CmpResponder] = web.AppKey("cmp", CmpResponder)


async def cmp_post(request: web.Request) -> web.StreamResponse:
    responder = request.app[RESPONDER_KEY]
    label = request.match_info.get("label", responder.settings.default_label)
    if not label or label not in responder.labels:
        return web.Response(status=404, text="no such CMP label\n")
    if request.content_type != CONTENT_TYPE:
        response = web.Response(status=415, text=f"Content-Type must be {CONTENT_TYPE}\n")
        response.force_close()
        return response
    try:
        data = await read_limited(request, responder.settings.max_message_bytes)
    except ConnectionError:
        # The peer went away (perhaps while its request was held to its budget): nobody to answer, and a peer's
        # doing, so no traceback in the log.
        response = web.Response(status=400, text="connection lost\n")
        response.force_close()
        return response
    if data is None:
        response = web.Response(status=413, text="CMP message too large\n")
        response.force_close()  # the rest of the body is never read
        return response
    try:
        # Admitted once the body is in, before anything is done with it: a body still arriving costs only its
        # connection (bounded by the listener: per-peer caps, body_timeout_s, displaceable meanwhile), so
        # trickling bodies from a few addresses never spend the budget all peers share. The TCP peer, never a
        # forwarded-for header, is whom the budget is charged to.
        ticket = await responder.admit(request.remote, holding=holder(request))
    except Busy as busy:
        response = web.Response(status=503, headers={"Retry-After": str(busy.retry_after_s)},
                                text=f"busy: retry after {busy.retry_after_s} s\n")  # fmt: skip
        response.force_close()
        return response
    status, answer = await responder.handle(label, data, ticket=ticket)
    return web.Response(status=status, body=answer, content_type=CONTENT_TYPE)


def make_cmp_app(responder: CmpResponder) -> web.Application:
    """The CMP server's HTTP application; serve it with appliance.va.http.VaServer (any app on host:port)."""
    app = web.Application(client_max_size=responder.settings.max_message_bytes + 1)
    app[RESPONDER_KEY] = responder
    for path in ("/.well-known/cmp", "/.well-known/cmp/{operation}", "/.well-known/cmp/p/{label}",
                 "/.well-known/cmp/p/{label}/{operation}"):  # fmt: skip
        app.router.add_post(path, cmp_post)
    return app
