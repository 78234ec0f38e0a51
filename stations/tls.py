"""The TLS policy of the LAN station link, applied by both ends: the appliance's listener and the fixture client.

TLS 1.2 or 1.3 only. Under TLS 1.2 only ECDHE key exchange with an AEAD cipher (AES-GCM, ChaCha20-Poly1305)
is offered, so every connection has forward secrecy and no CBC suite (Lucky13-style padding oracles) is
negotiable; TLS 1.3's suites are all AEAD and OpenSSL's defaults are kept. Renegotiation is refused: in TLS 1.2
it lets a peer make the server repeat the handshake's public-key work inside one connection.
"""

from __future__ import annotations

import ssl

__all__ = ["TLS12_CIPHERS", "apply_tls_policy"]

TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!PSK"


def apply_tls_policy(ctx: ssl.SSLContext) -> ssl.SSLContext:
    """Restrict `ctx` (client or server) to the station link's versions and suites."""
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION
    return ctx
