"""PasswordBasedMac (RFC 4211 4.4) computed by OpenSSL's libcrypto, outside the GIL.

PBM is OWF^iterationCount(secret || salt), then HMAC with that key: a loop of hashes that in Python holds the
interpreter lock for its whole length (30-45 ms for 100,000 SHA-256 rounds), so while a worker thread derives a
hostile message's key the event loop and the issuance threads barely run. libcrypto has the same algorithm,
`OSSL_CRMF_pbm_new` (what `openssl cmp` itself uses), and ctypes releases the GIL for the length of a foreign
call: the derivation then costs a core's time, not the whole process's.

The library is the libcrypto Python's own hashlib is linked with (libcrypto.so.3 on the appliance), loaded once.
Before it is used it must agree with the Python implementation on a fixed vector; if it cannot be loaded, is
older than OpenSSL 3.0, or disagrees, `pbm_mac` returns None and the caller computes in Python.
`OSSL_CRMF_pbm_new` enforces 100..100,000 iterations itself; the caller checks its own (lower) policy first.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import hmac
import threading
from collections.abc import Callable

from appliance.cmp import _der, oids

_LOCK = threading.Lock()
_IMPL: Callable[[bytes, bytes, bytes], bytes | None] | None = None
_LOADED = False


def python_pbm_key(owf: str, secret: bytes, salt: bytes, iterations: int) -> bytes:
    """The PBM key in Python: the reference the C implementation is checked against, and the fallback."""
    new = getattr(hashlib, owf)  # the named constructor: a third faster than hashlib.new per round
    key: bytes = new(secret + salt).digest()
    for _ in range(iterations - 1):
        key = new(key).digest()
    return key


def _load() -> Callable[[bytes, bytes, bytes], bytes | None] | None:
    lib = None
    for name in ("libcrypto.so.3", ctypes.util.find_library("crypto")):
        if not name:
            continue
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError:
            continue
    if lib is None:
        return None
    try:
        version = lib.OpenSSL_version_num
        version.restype = ctypes.c_ulong
        version.argtypes = []
        if version() < 0x30000000:
            return None
        d2i = lib.d2i_OSSL_CRMF_PBMPARAMETER
        d2i.restype = ctypes.c_void_p
        d2i.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_char_p), ctypes.c_long]
        free_params = lib.OSSL_CRMF_PBMPARAMETER_free
        free_params.restype = None
        free_params.argtypes = [ctypes.c_void_p]
        pbm_new = lib.OSSL_CRMF_pbm_new
        pbm_new.restype = ctypes.c_int
        pbm_new.argtypes = [
            ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t,
            ctypes.c_char_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_size_t),
        ]  # fmt: skip
        crypto_free = lib.CRYPTO_free
        crypto_free.restype = None
        crypto_free.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]
        clear_errors = lib.ERR_clear_error
        clear_errors.restype = None
        clear_errors.argtypes = []
    except AttributeError:
        return None

    def mac(params_der: bytes, secret: bytes, data: bytes) -> bytes | None:
        """The PBM of `data` with `secret` under PBMParameter `params_der`; None when libcrypto refuses."""
        cursor = ctypes.c_char_p(params_der)
        params = d2i(None, ctypes.byref(cursor), len(params_der))
        if not params:
            clear_errors()
            return None
        out = ctypes.c_void_p()
        out_len = ctypes.c_size_t(0)
        try:
            # The GIL is released for the length of this call (ctypes.CDLL).
            if pbm_new(None, None, params, data, len(data), secret, len(secret), ctypes.byref(out),
                       ctypes.byref(out_len)) != 1 or not out.value:  # fmt: skip
                clear_errors()
                return None
            try:
                return ctypes.string_at(out.value, out_len.value)
            finally:
                crypto_free(out, b"", 0)
        finally:
            free_params(params)

    return mac


def _self_test(impl: Callable[[bytes, bytes, bytes], bytes | None]) -> bool:
    """libcrypto must compute exactly what the Python reference computes (SHA-256 / HMAC-SHA256 and SHA-512 /
    HMAC-SHA512, as the DER this package builds them)."""
    salt, secret, data = bytes(range(16)), b"birthline self-test secret", b"protected part" * 7
    for owf, owf_oid, mac_oid in (("sha256", oids.SHA256, oids.HMAC_WITH_SHA256),
                                  ("sha512", oids.SHA512, oids.HMAC_WITH_SHA512)):  # fmt: skip
        params = _der.sequence(_der.octet_string(salt), _der.algorithm_identifier(owf_oid), _der.integer(257),
                               _der.algorithm_identifier(mac_oid))  # fmt: skip
        expected = hmac.new(python_pbm_key(owf, secret, salt, 257), data, owf).digest()
        if impl(params, secret, data) != expected:
            return False
    return True


def native() -> Callable[[bytes, bytes, bytes], bytes | None] | None:
    """libcrypto's PBM, checked against the Python reference, or None when it is not usable here."""
    global _IMPL, _LOADED  # noqa: PLW0603 - loaded once per process
    with _LOCK:
        if not _LOADED:
            impl = _load()
            _IMPL = impl if impl is not None and _self_test(impl) else None
            _LOADED = True
        return _IMPL
