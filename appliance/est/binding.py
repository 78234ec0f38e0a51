"""The channel binding of a TLS connection, which an EST client puts in its CSR's challengePassword to prove that
the key it certifies is the one holding this very TLS session (RFC 7030 3.5):

- TLS 1.2: tls-unique (RFC 5929), the first Finished message, from Python's ssl module;
- TLS 1.3: tls-exporter (RFC 9266), 32 bytes exported with the label "EXPORTER-Channel-Binding" and no context
  (tls-unique is not defined for TLS 1.3).

Python's ssl module (3.11 to 3.13) has no exporter, so `exporter` calls OpenSSL's SSL_export_keying_material
through ctypes on the SSL* of the connection. Finding that pointer relies on the layout of CPython's _ssl
objects (the SSL* follows the object header and the socket reference); it is used only on the CPython versions
whose layout is known, and only after a check that reads through the pointer and must agree with what the ssl
module itself reports (SSL_is_server, and the Finished message behind tls-unique). Where it cannot be used,
`binding` answers None for TLS 1.3 and the caller says so.
"""

from __future__ import annotations

import _ssl
import ctypes
import ssl
import sys
from typing import Final

EXPORTER_LABEL: Final = b"EXPORTER-Channel-Binding"
EXPORTER_LENGTH: Final = 32


class _Libssl:
    def __init__(self) -> None:
        # The _ssl extension's own handle: a symbol looked up through it is found in the libssl it was linked
        # against, the one that made this connection.
        lib = ctypes.CDLL(_ssl.__file__)
        self.export = lib.SSL_export_keying_material
        self.export.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p,
                                ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int]  # fmt: skip
        self.export.restype = ctypes.c_int
        self.is_server = lib.SSL_is_server
        self.is_server.argtypes = [ctypes.c_void_p]
        self.is_server.restype = ctypes.c_int
        self.finished = lib.SSL_get_finished
        self.peer_finished = lib.SSL_get_peer_finished
        for f in (self.finished, self.peer_finished):
            f.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
            f.restype = ctypes.c_size_t


def _load() -> _Libssl | None:
    known = sys.implementation.name == "cpython" and (3, 11) <= sys.version_info[:2] <= (3, 13)
    if not known or hasattr(sys, "gettotalrefcount"):  # a debug build lays its objects out differently
        return None
    try:
        return _Libssl()
    except (OSError, AttributeError):
        return None


_LIB: Final = _load()


def _ssl_pointer(obj: ssl.SSLObject | ssl.SSLSocket) -> int | None:
    inner = getattr(obj, "_sslobj", None)
    if _LIB is None or inner is None or type(inner).__name__ != "_SSLSocket":
        return None
    # struct PySSLSocket { PyObject_HEAD; PyObject *Socket; SSL *ssl; ... } in CPython 3.11 - 3.13.
    offset = object.__basicsize__ + ctypes.sizeof(ctypes.c_void_p)
    pointer = ctypes.c_void_p.from_address(id(inner) + offset).value
    if not pointer:
        return None
    # The pointer must be this connection's: the role and the Finished message read through it are the ones the
    # ssl module reports.
    if bool(_LIB.is_server(pointer)) != bool(obj.server_side):
        return None
    unique = obj.get_channel_binding("tls-unique")
    buf = ctypes.create_string_buffer(128)
    # Which Finished tls-unique is: the first one sent, as the ssl module picks it.
    first = _LIB.finished if obj.session_reused == bool(obj.server_side) else _LIB.peer_finished
    n = first(pointer, buf, len(buf))
    if unique is None or buf.raw[:n] != unique:
        return None
    return int(pointer)


def exporter(obj: ssl.SSLObject | ssl.SSLSocket) -> bytes | None:
    """The tls-exporter value of a TLS 1.3 connection (RFC 9266), or None when it cannot be had here."""
    pointer = _ssl_pointer(obj)
    if pointer is None or _LIB is None:
        return None
    out = ctypes.create_string_buffer(EXPORTER_LENGTH)
    if _LIB.export(pointer, out, EXPORTER_LENGTH, EXPORTER_LABEL, len(EXPORTER_LABEL), None, 0, 0) != 1:
        return None
    return out.raw


def binding(obj: ssl.SSLObject | ssl.SSLSocket) -> tuple[str, bytes | None]:
    """The connection's channel binding type and value: ("tls-unique", ...) under TLS 1.2,
    ("tls-exporter", ...) under TLS 1.3; the value is None when it cannot be had."""
    if obj.version() == "TLSv1.3":
        return "tls-exporter", exporter(obj)
    return "tls-unique", obj.get_channel_binding("tls-unique")
