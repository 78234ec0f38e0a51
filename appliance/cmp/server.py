"""The CMP server (RFC 9483 Lightweight CMP over RFC 9811 HTTP) on the appliance's LAN side.

    POST /.well-known/cmp[/<operation>]              the configured default label
    POST /.well-known/cmp/p/<label>[/<operation>]    a label of [cmp.labels]

This module is the HTTP side: 415 for another Content-Type, 413 for a body above the limit (judged from
Content-Length before reading), 404 for an unknown label; the CMP answer (HTTP 200, or 400 for bytes that are no
PKIMessage) comes from CmpResponder (appliance/cmp/responder.py). Labels are appliance/cmp/labels.py, who may sign
appliance/cmp/trust.py, certificate requests appliance/cmp/enrol.py, revocation appliance/cmp/revoke.py
(docs/cmp.md "The server").
"""

from __future__ import annotations

from aiohttp import web

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
    data = await read_limited(request, responder.settings.max_message_bytes)
    if data is None:
        response = web.Response(status=413, text="CMP message too large\n")
        response.force_close()  # the rest of the body is never read
        return response
    status, answer = await responder.handle(label, data)
    return web.Response(status=status, body=answer, content_type=CONTENT_TYPE)


def make_cmp_app(responder: CmpResponder) -> web.Application:
    """The CMP server's HTTP application; serve it with appliance.va.http.VaServer (any app on host:port)."""
    app = web.Application(client_max_size=responder.settings.max_message_bytes + 1)
    app[RESPONDER_KEY] = responder
    for path in ("/.well-known/cmp", "/.well-known/cmp/{operation}", "/.well-known/cmp/p/{label}",
                 "/.well-known/cmp/p/{label}/{operation}"):  # fmt: skip
        app.router.add_post(path, cmp_post)
    return app
